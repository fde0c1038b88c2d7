"""Data prep end to end: `optctl data prep`, `prepare_dataset` and the Prefect flow on generated corpora.

What is checked here and nowhere else: a build killed with SIGKILL and re-run continues from its finished
units and publishes byte-identical output; planted duplicates are removed through the whole pipeline with
the right winner; Reddit dumps become one document per thread; bad input is quarantined without stopping
the run; S3 in and out; the flow and the library agree on the dataset.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

from opt import storage
from opt.config import load_config
from opt.data.build import DUPLICATES_FILE
from opt.data.clean import normalize
from opt.data.indexed import IndexedDataset
from opt.data.manifest import MANIFEST_FILE, DatasetManifest
from opt.data.minhash import tokenize
from opt.data.prep import prepare_dataset
from opt.data.tokenizer import EOS_ID, load_tokenizer
from opt.data.units import read_docs
from opt.data.workdir import WorkDir
from tests.conftest import SAMPLE

OPTCTL = Path(sys.executable).with_name("optctl")
NGRAM = 5

# --- corpora -------------------------------------------------------------------------------------------


@functools.cache
def _paragraphs() -> tuple[str, ...]:
    """Distinct paragraphs (5+ words) of the bundled Python docs: real prose to recombine into documents."""
    paras = (p.strip() for line in SAMPLE.read_text(encoding="utf-8").splitlines() for p in json.loads(line)["text"].split("\n\n"))
    return tuple(dict.fromkeys(p for p in paras if len(p.split()) >= 5))


def _prose(rng: random.Random, paragraphs: int) -> str:
    return "\n\n".join(rng.sample(_paragraphs(), paragraphs))


def _encode(path: Path, lines: list[bytes]) -> Path:
    """NDJSON lines written plain, gzip- or zstd-compressed by the file's suffix."""
    data = b"".join(line + b"\n" for line in lines)
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor(level=3).compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _record(text: str, doc_id: str) -> bytes:
    return json.dumps({"text": text, "meta": {"pile_set_name": "python-docs", "id": doc_id}}).encode()


def _pile_files(files: int, docs_per_file: int, seed: int = 0) -> list[list[bytes]]:
    """The lines of `files` Pile-style files of recombined paragraphs (~2.4 KB, ~360 words a document).

    From the second file on, each file also holds an exact copy and a near copy (one sentence appended,
    5-gram Jaccard ~0.98) of documents of the previous file.
    """
    rng = random.Random(seed)
    texts: list[list[str]] = []
    for f in range(files):
        docs = [_prose(rng, 20) for _ in range(docs_per_file)]
        if f:
            docs.insert(5, texts[f - 1][3])
            docs.insert(10, texts[f - 1][7] + " This paragraph was revised for the second edition.")
        texts.append(docs)
    return [[_record(t, f"f{f}-d{k}") for k, t in enumerate(docs)] for f, docs in enumerate(texts)]


def _pile_corpus(root: Path, files: int = 8, docs_per_file: int = 100) -> Path:
    """`_pile_files` written as .jsonl, .jsonl.gz and .jsonl.zst in turn (~250 KB each, uncompressed, by default)."""
    for f, lines in enumerate(_pile_files(files, docs_per_file)):
        _encode(root / f"part-{f:02d}{('.jsonl', '.jsonl.gz', '.jsonl.zst')[f % 3]}", lines)
    return root


# --- running and inspecting builds ---------------------------------------------------------------------


def _cfg(root: str | Path, sources: list[dict[str, str]], *extra: str) -> Any:
    overrides = [f"storage.root={root}", "data.workers=1", "data.tokenizer.vocab_size=512", "data.sources=" + json.dumps(sources)]
    return load_config(None, overrides + list(extra))


def _shard_docs(manifest: DatasetManifest, source: str) -> list[str]:
    """Every document packed for `source` (train then valid), decoded with the dataset's tokenizer."""
    tok = load_tokenizer(manifest.file_uri("tokenizer/tokenizer.json"))
    out = []
    for split in ("train", "valid"):
        tokens = IndexedDataset(manifest.file_uri(f"{split}/{source}")).tokens()
        assert tokens.size and tokens[-1] == EOS_ID  # the stream is whole documents, each ending with </s>
        out += [tok.decode(doc[:-1].tolist()) for doc in np.split(tokens, np.flatnonzero(tokens == EOS_ID)[:-1] + 1)]
    return out


def _quarantine(manifest: DatasetManifest, source: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in storage.read_text(manifest.file_uri(f"quarantine/{source}.jsonl")).splitlines()]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mtimes(paths: list[Path]) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in paths}


def _markers(home: Path, stage: str) -> list[Path]:
    """Completion markers of a stage (in-flight atomic writes are hidden `.tmp-*` files, not `*.json`)."""
    return sorted(home.glob(f"work/datasets/*/done/{stage}/*.json"))


def _marked_files(home: Path, stages: tuple[str, ...]) -> list[Path]:
    """The markers of `stages` and every output they vouch for."""
    out = []
    for stage in stages:
        for marker in _markers(home, stage):
            out.append(marker)
            out += [marker.parents[2] / rel for rel in json.loads(marker.read_text())["outputs"]]
    return out


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "OPT_HOME": str(home)}
    env.pop("TOKENIZERS_PARALLELISM", None)  # what a user's shell has: the tokenizer's threads must not change the bytes
    return env


def _kill_when(cmd: list[str], home: Path, log: Path, ready: Callable[[], bool]) -> None:
    """Start `cmd` in its own process group and SIGKILL the whole group as soon as `ready()` holds."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=_env(home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    killed = False
    try:
        deadline = time.monotonic() + 120
        while not killed and proc.poll() is None and time.monotonic() < deadline:
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.002)
    finally:
        if proc.poll() is None and not killed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed and proc.returncode == -signal.SIGKILL, f"not killed mid-way (exit {proc.returncode}):\n{log.read_text()}"


def _run(cmd: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, env=_env(home), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


# --- 1. kill and resume --------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_build_resumes_to_byte_identical_output_and_a_finished_one_is_reused(tmp_path: Path) -> None:
    corpus = _pile_corpus(tmp_path / "corpus")
    store, home = tmp_path / "store", tmp_path / "home"
    cmd = [str(OPTCTL), "data", "prep", "--source", f"pile:{corpus}", "--out", str(store), "--workers", "1", "--no-progress"]
    manifests = lambda: list(store.glob(f"datasets/*/{MANIFEST_FILE}"))  # noqa: E731

    # Run A: uninterrupted, from nothing.
    first = _run(cmd, home)
    assert "(prepared)" in first.stdout
    near = r"^near duplicates: exact Jaccard >= 0.95 on \d+ LSH candidate pairs \(10 x 12 bands\): \d+ checked, \d+ rejected$"
    assert re.search(near, first.stdout, re.M), first.stdout
    (dataset,) = store.glob("datasets/*")
    golden = _snapshot(dataset)
    manifest = DatasetManifest.from_json(golden[MANIFEST_FILE].decode())
    assert (manifest.sources["corpus"].exact_duplicates, manifest.sources["corpus"].near_duplicates) == (7, 7)
    shutil.rmtree(store)
    shutil.rmtree(home)

    # Run B: killed while cleaning (2+ units finished, nothing published) ...
    _kill_when(cmd, home, tmp_path / "b1.log", lambda: len(_markers(home, "clean")) >= 2 and not manifests())
    assert not manifests()
    cleaned = _mtimes(_marked_files(home, ("clean",)))
    assert len(_markers(home, "clean")) >= 2

    # ... resumed and killed again while tokenizing (so after dedup and the tokenizer) ...
    _kill_when(cmd, home, tmp_path / "b2.log", lambda: bool(_markers(home, "tokenize")) and not manifests())
    assert not manifests()
    assert _mtimes(list(cleaned)) == cleaned  # the units finished before the first kill were not redone
    finished = _mtimes(_marked_files(home, ("clean", "dedup", "tokenizer", "tokenize")))
    assert len(_markers(home, "clean")) == 8 and _markers(home, "dedup") and _markers(home, "tokenizer")

    # ... and resumed to the end: only the missing units ran, and the bytes are run A's.
    resumed = _run(cmd, home)
    assert "(prepared)" in resumed.stdout
    assert _mtimes(list(finished)) == finished
    assert _snapshot(dataset).keys() == golden.keys()
    assert _snapshot(dataset) == golden

    # A finished dataset is a no-op: reused, no file of the store or the work dir rewritten.
    published = _mtimes([p for p in store.rglob("*") if p.is_file()])
    work = _mtimes(_marked_files(home, ("clean", "dedup", "tokenizer", "tokenize", "pack")))
    again = _run(cmd, home)
    assert f"dataset {manifest.dataset_id} (reused)" in again.stdout
    assert _mtimes(list(published)) == published and _mtimes(list(work)) == work


# --- 2. planted duplicates -----------------------------------------------------------------------------


def _shingles(words: list[str]) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + NGRAM]) for i in range(len(words) - NGRAM + 1)}


def _jaccard(x: str, y: str) -> float:
    """Exact word 5-gram Jaccard under MinHasher's normalisation (lowercase, \\w+ words)."""
    a, b = (_shingles([w.decode() for w in tokenize(t)]) for t in (x, y))
    return len(a & b) / len(a | b)


def _base_docs(count: int, size: int = 400) -> list[list[str]]:
    """`count` distinct `size`-word windows of the sample corpus, each sharing under 20% of its shingles with the others."""
    seen: set[tuple[str, ...]] = set()
    out = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        words = [w.decode() for w in tokenize(json.loads(line)["text"])]
        for start in range(0, len(words) - size + 1, size):
            window = words[start : start + size]
            sh = _shingles(window)
            if len(sh & seen) < 0.2 * len(sh):
                seen |= sh
                out.append(window)
                if len(out) == count:
                    return out
    raise AssertionError(f"the sample corpus has fewer than {count} distinct {size}-word windows")


class _Planter:
    """Places documents into files in two phases (phase-1 lines come before phase-2 lines in each file)."""

    def __init__(self, root: Path) -> None:
        self.files = {"web": [root / "web" / "00.jsonl", root / "web" / "01.jsonl.gz"], "books": [root / "books" / "00.jsonl.zst"]}
        self.phases: dict[Path, list[list[tuple[str, str]]]] = {f: [[], []] for fs in self.files.values() for f in fs}
        self.fresh = (f"zq{k}" for k in range(10**6))  # words that occur nowhere in the corpus

    def put(self, file: Path, phase: int, doc_id: str, text: str) -> None:
        self.phases[file][phase].append((doc_id, text))

    def write(self) -> dict[str, dict[str, Any]]:
        """Writes every file; returns doc id -> {source, file, line, id, text, priority}."""
        where: dict[str, dict[str, Any]] = {}
        for s, (source, files) in enumerate(self.files.items()):
            for file in files:
                docs = self.phases[file][0] + self.phases[file][1]
                _encode(file, [_record(t, i) for i, t in docs])
                for line, (doc_id, text) in enumerate(docs, start=1):
                    where[doc_id] = {
                        "source": source,
                        "file": str(file),
                        "line": line,
                        "id": doc_id,
                        "text": text,
                        "priority": (s, str(file), line),
                    }
        return where

    def edges(self, words: list[str]) -> str:
        """1% of 400 words changed where it costs least: 2 at each end alter 4 of 396 shingles (J = 392/400 = 0.98).

        The same 4 words spread through the interior would alter 20 (J = 0.90): below the threshold.
        """
        w = list(words)
        w[0], w[1], w[-2], w[-1] = (next(self.fresh) for _ in range(4))
        return " ".join(w)

    def interior(self, words: list[str]) -> str:
        """One interior word changed: 5 of 396 shingles (J = 391/401 = 0.975)."""
        w = list(words)
        w[len(w) // 2] = next(self.fresh)
        return " ".join(w)

    def appended(self, words: list[str]) -> str:
        """Four words appended: 4 new shingles (J = 396/400 = 0.99)."""
        return " ".join(words + [next(self.fresh) for _ in range(4)])

    def rewritten(self, words: list[str], share: float, rng: np.random.Generator) -> str:
        w = list(words)
        for p in rng.choice(len(w), size=int(share * len(w)), replace=False):
            w[int(p)] = next(self.fresh)
        return " ".join(w)


def test_planted_duplicates_are_removed_with_the_right_winner_and_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPT_HOME", str(tmp_path / "home"))
    rng = np.random.default_rng(0)
    plant = _Planter(tmp_path / "in")
    (web0, web1), (books,) = plant.files["web"], plant.files["books"]
    bases = iter(_base_docs(60))
    pairs: list[tuple[str, str, str]] = []  # (document a, document b, kind) planted as duplicates
    negatives: list[tuple[str, str]] = []  # planted as clearly distinct (J < 0.8)
    for r in range(3):
        for g, (a, b, kind, copy) in enumerate(
            [
                ((web0, 0), (web0, 1), "exact", " ".join),  # same file: the later line goes
                ((web1, 0), (web0, 1), "exact", " ".join),  # the copy is in an earlier file: the original goes
                ((web1, 1), (books, 0), "exact", lambda w: "  ".join(w).upper() + "\n"),  # case/space folded; web wins
                ((web0, 0), (books, 1), "near", plant.edges),
                ((books, 0), (web1, 1), "near", plant.edges),  # earlier source beats earlier line and file name
                ((web1, 0), (web0, 1), "near", plant.interior),
                ((web0, 0), (web0, 1), "near", plant.appended),
            ]
        ):
            words = next(bases)
            plant.put(*a, f"g{g}r{r}-orig", " ".join(words))
            plant.put(*b, f"g{g}r{r}-copy", copy(words))
            pairs.append((f"g{g}r{r}-orig", f"g{g}r{r}-copy", kind))
        for n, (a, b, share) in enumerate([((web0, 0), (books, 1), 0.1), ((web1, 0), (web1, 1), 0.2)]):
            words = next(bases)
            plant.put(*a, f"n{n}r{r}-orig", " ".join(words))
            plant.put(*b, f"n{n}r{r}-copy", plant.rewritten(words, share, rng))
            negatives.append((f"n{n}r{r}-orig", f"n{n}r{r}-copy"))
    for k, words in enumerate(bases):  # the rest are unrelated fillers spread over the files
        plant.put([web0, web1, books][k % 3], k % 2, f"filler{k}", " ".join(words))
    docs = plant.write()
    for a, b, kind in pairs:  # labels are the exact Jaccard, not the construction's intent
        j = _jaccard(docs[a]["text"], docs[b]["text"])
        assert j == 1.0 if kind == "exact" else 0.97 <= j < 1.0, (a, b, j)
    assert all(_jaccard(docs[a]["text"], docs[b]["text"]) < 0.8 for a, b in negatives)

    cfg = _cfg(
        tmp_path / "store", [{"name": "web", "kind": "pile", "uri": str(web0.parent)}, {"name": "books", "kind": "pile", "uri": str(books)}]
    )
    manifest, reused = prepare_dataset(cfg.data, cfg.storage.root)
    assert not reused

    # The loser of each planted pair is the lower-priority one: later source, then later file, then later line.
    expected = {}
    for a, b, kind in pairs:
        winner, loser = sorted((docs[a], docs[b]), key=lambda d: d["priority"])
        expected[loser["id"]] = (winner["id"], kind)
    report = [json.loads(line) for line in storage.read_text(manifest.file_uri(DUPLICATES_FILE)).splitlines()]
    found = {r["id"]: (r["duplicate_of"]["id"], r["kind"]) for r in report}
    true_pos = {k for k, v in found.items() if expected.get(k, (None,))[0] == v[0]}
    recall, precision = len(true_pos) / len(expected), len(true_pos) / len(found)
    assert recall == 1.0 and precision == 1.0, (recall, precision, found, expected)
    assert {k for k, v in expected.items() if v[1] == "exact"} <= true_pos  # exact detection is not probabilistic
    for r in report:
        if r["id"] in true_pos:
            meta = lambda d: {k: d[k] for k in ("source", "file", "line", "id")}  # noqa: E731
            assert {k: r[k] for k in ("source", "file", "line", "id")} == meta(docs[r["id"]])
            assert r["duplicate_of"] == meta(docs[found[r["id"]][0]])
            assert r["kind"] == expected[r["id"]][1]
            if r["kind"] == "exact":
                assert r["similarity"] == 1.0 and "estimate" not in r
            else:  # the exact Jaccard of the shingle sets, the MinHash estimate beside it
                assert r["similarity"] == round(_jaccard(docs[r["id"]]["text"], docs[found[r["id"]][0]]["text"]), 4)
                assert abs(r["estimate"] - r["similarity"]) < 0.06
    assert not {a for pair in negatives for a in pair} & set(found)

    for name in ("web", "books"):
        st, mine = manifest.sources[name], [r for r in report if r["source"] == name]
        assert st.docs_in == sum(d["source"] == name for d in docs.values()) and st.dropped == {}
        assert (st.exact_duplicates, st.near_duplicates) == (
            sum(r["kind"] == "exact" for r in mine),
            sum(r["kind"] == "near" for r in mine),
        )
        assert st.train_docs + st.valid_docs == st.docs_in - len(mine)
    assert sum(s.exact_duplicates for s in manifest.sources.values()) == sum(k == "exact" for *_, k in pairs)
    near = manifest.dedup
    assert (near["decision"], near["bands"], near["rows"]) == ("exact_jaccard", 10, 12)
    assert near["candidate_pairs"] >= near["checked"] >= sum(k == "near" for *_, k in pairs) and near["rejected"] >= 0
    assert near["checked"] - near["rejected"] >= sum(k == "near" for *_, k in pairs) and near["candidate_docs"] >= 24

    # The packed shards hold exactly the surviving documents: no removed text, no survivor twice.
    packed = Counter(_shard_docs(manifest, "web") + _shard_docs(manifest, "books"))
    assert packed == Counter(normalize(d["text"]) for d in docs.values() if d["id"] not in found)
    assert not any(packed[normalize(docs[k]["text"])] for k in found if docs[k]["text"] != docs[found[k][0]]["text"])


# --- 3. Reddit -----------------------------------------------------------------------------------------


def _sub(sid: str, title: str, selftext: str = "") -> dict[str, Any]:
    return {"id": sid, "title": title, "selftext": selftext, "subreddit": "learnpython", "created_utc": 1546300800}


def _com(cid: str, sid: str, parent: str | None, body: str) -> dict[str, Any]:
    return {
        "id": cid,
        "link_id": f"t3_{sid}",
        "parent_id": f"t1_{parent}" if parent else f"t3_{sid}",
        "body": body,
        "created_utc": 1546300900,
    }


def _ndjson(records: list[dict[str, Any] | bytes]) -> list[bytes]:
    return [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]


def test_reddit_threads_become_one_document_each_with_the_longest_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPT_HOME", str(tmp_path / "home"))
    dumps = tmp_path / "reddit"
    body = {
        "a": "Rayleigh scattering of sunlight by the molecules of the air.",
        "a1": "Shorter wavelengths scatter much more strongly than longer ones do.",
        "a1x": "So the scattered blue light reaches our eyes from every direction.",
        "b": "Because the ocean reflects it, obviously.",
        "b1": "That is a popular myth that has been debunked many times.",
        "c": "Start with the official tutorial and write small programs every day.",
        "c1a": "I agree, and also read other people's code on GitHub.",
        "c1b": "Reading code helped me more than any book ever did.",
        "d": "Pick a project you care about and build it step by step.",
        "d1": "Automating a boring task at work is a great first project.",
        "e": "collections, especially defaultdict and Counter, saves me every day.",
        "e1": "Counter is underrated; most_common alone is worth the import.",
        "e2": "Late to the party, but pathlib deserves a mention too.",
        "e3": "pathlib changed how I write every script that touches files.",
        "f": "functools.lru_cache for quick memoisation.",
    }
    s1_head = ["Why is the sky blue during the day?", "I have always wondered and never found a good answer."]
    s2_title = "What is the best way to learn Python as a beginner?"
    s3_head = ["Show me your favourite standard library module", "Mine is itertools: loops got so much cleaner."]
    rs = _encode(
        dumps / "RS_2019-01.zst",
        _ndjson([
            _sub("s1", *s1_head),
            _sub("s2", s2_title),
            b'{"id": "s8", "title": "caf\xe9 au lait"}',  # latin-1, not UTF-8
            {"id": "s9", "selftext": "a submission without a title"},
            _sub("s3", *s3_head),
            _sub("s4", "[deleted]", "[removed]"),  # nothing left to read
        ]),
    )  # fmt: skip
    jan = _encode(
        dumps / "RC_2019-01.zst",
        _ndjson([
            _com("a", "s1", None, body["a"]), _com("b", "s1", None, body["b"]), _com("b1", "s1", "b", body["b1"]),
            _com("a1", "s1", "a", body["a1"]), _com("a1x", "s1", "a1", body["a1x"]),  # branching: a-a1-a1x is longest
            _com("c", "s2", None, body["c"]), _com("c1", "s2", "c", "[deleted]"),  # cuts c1a-c1b off: 4 would beat 2
            _com("c1a", "s2", "c1", body["c1a"]), _com("c1b", "s2", "c1a", body["c1b"]),
            _com("d", "s2", None, body["d"]), _com("d1", "s2", "d", body["d1"]),
            _com("e", "s3", None, body["e"]), _com("e1", "s3", "e", body["e1"]),
            b'{"id": "x1", "link_id": "t3_s1", "parent_id": "t3_s1", "body": "\xff\xfe"}',
        ]),
    )  # fmt: skip
    feb = _encode(
        dumps / "RC_2019-02.zst",
        _ndjson([
            _com("e1", "s3", "e", "an overlapping dump's copy of e1: the first record wins"),
            _com("e2", "s3", "e1", body["e2"]), _com("e3", "s3", "e2", body["e3"]),  # s3 continues in February
            _com("f", "s3", None, body["f"]),
            b'{"id": "x2", "link_id": "t3_s3", "parent_id"',
        ]),
    )  # fmt: skip
    pile = _pile_corpus(tmp_path / "pile", files=2, docs_per_file=10)
    cfg = _cfg(
        tmp_path / "store",
        [{"name": "pile", "kind": "pile", "uri": str(pile)}, {"name": "reddit", "kind": "reddit", "uri": str(dumps)}],
        "data.reddit_buckets=4",
    )
    manifest, _ = prepare_dataset(cfg.data, cfg.storage.root)

    threads = {
        "s1": "\n\n".join([*s1_head, body["a"], body["a1"], body["a1x"]]),
        "s2": "\n\n".join([s2_title, body["d"], body["d1"]]),  # s2 has no selftext
        "s3": "\n\n".join([*s3_head, body["e"], body["e1"], body["e2"], body["e3"]]),
    }
    work = WorkDir(tmp_path / "home" / "work" / "datasets" / manifest.dataset_id)
    cleaned = [d for p in sorted((work.root / "clean").glob("reddit.*.docs.jsonl.zst")) for d in read_docs(work, p.name.split(".docs")[0])]
    assert {d["i"]: d["t"] for d in cleaned} == threads and len(cleaned) == 3
    assert {d["i"]: (d["f"], d["l"]) for d in cleaned} == {"s1": (str(rs), 1), "s2": (str(rs), 2), "s3": (str(rs), 5)}
    assert sorted(_shard_docs(manifest, "reddit")) == sorted(threads.values())

    st = manifest.sources["reddit"]
    assert st.dropped == {"invalid_utf8": 2, "missing_fields": 1, "invalid_json": 1, "empty_thread": 1}
    assert st.docs_in == 3 + 5 and st.train_docs + st.valid_docs == 3 and st.valid_docs >= 1
    quarantined = {(Path(q["file"]).name, q["line"], q["reason"]) for q in _quarantine(manifest, "reddit")}
    assert quarantined == {
        (rs.name, 3, "invalid_utf8"), (rs.name, 4, "missing_fields"), (jan.name, 14, "invalid_utf8"),
        (feb.name, 5, "invalid_json"), (rs.name, 6, "empty_thread"),
    }  # fmt: skip
    assert manifest.sources["pile"].train_docs + manifest.sources["pile"].valid_docs == 20  # 22 in, less a planted exact and near copy


# --- 4. bad input --------------------------------------------------------------------------------------


def test_bad_input_is_quarantined_and_counted_without_stopping_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from opt.cli import main

    monkeypatch.setenv("OPT_HOME", str(tmp_path / "home"))
    rng = random.Random(1)
    good = [_prose(rng, 8) for _ in range(60)]
    assert max(map(len, good)) < 5000
    src = tmp_path / "bad"
    mixed = _encode(
        src / "00-mixed.jsonl",
        [
            _record(good[0], "ok-0"),
            b'{"text": "broken',
            b'{"text": "caf\xe9 cr\xe8me"}',
            json.dumps({"meta": {"id": "no-text"}}).encode(),
            json.dumps({"text": "   \n  "}).encode(),
            json.dumps({"text": ""}).encode(),
            _record("gigantic " * 1000, "huge"),  # 9,000 characters with max_chars=5000
            _record(good[1], "ok-1"),
        ],
    )
    # a multi-frame file (as pzstd writes), cut in the middle: the frames before the cut are still readable
    records = [_record(t, f"z-{k}") for k, t in enumerate(good[2:])]
    whole = b"".join(
        zstandard.ZstdCompressor().compress(b"".join(r + b"\n" for r in records[k : k + 10])) for k in range(0, len(records), 10)
    )
    truncated = src / "01-truncated.jsonl.zst"
    truncated.write_bytes(whole[: len(whole) // 2])
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(truncated.read_bytes()), read_across_frames=True) as f:
        readable = f.read().count(b"\n")  # complete lines before the cut, by zstd's own streaming reader
    assert 0 < readable < len(good) - 2

    rc = main(["data", "prep", "--source", f"pile:{src}", "--out", str(tmp_path / "store"), "--workers", "1", "--no-progress",
               "--set", "data.filters.max_chars=5000", "--set", "data.tokenizer.vocab_size=512"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "(prepared)" in out and "dropped: corrupt_stream 1, empty 2, gigantic 1" in out

    (dataset,) = (tmp_path / "store" / "datasets").iterdir()
    manifest = DatasetManifest.from_json((dataset / MANIFEST_FILE).read_text())
    st = manifest.sources["bad"]
    reasons = {"invalid_json": 1, "invalid_utf8": 1, "missing_text": 1, "empty": 2, "gigantic": 1, "corrupt_stream": 1}
    assert st.dropped == reasons
    assert st.docs_in == 8 + readable + 1 and st.train_docs + st.valid_docs == 2 + readable
    quarantined = [(Path(q["file"]).name, q["line"], q["reason"]) for q in _quarantine(manifest, "bad")]
    assert quarantined == [
        (mixed.name, 2, "invalid_json"), (mixed.name, 3, "invalid_utf8"), (mixed.name, 4, "missing_text"),
        (mixed.name, 5, "empty"), (mixed.name, 6, "empty"), (mixed.name, 7, "gigantic"),
        (truncated.name, readable + 1, "corrupt_stream"),
    ]  # fmt: skip


def test_a_missing_source_fails_the_run_with_one_line_naming_it(tmp_path: Path) -> None:
    real = _pile_corpus(tmp_path / "real", files=1, docs_per_file=5)
    cmd = [str(OPTCTL), "data", "prep", "--source", f"pile:{real}", "--source", f"ghost=pile:{tmp_path / 'nope'}",
           "--out", str(tmp_path / "store"), "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: source 'ghost'") and str(tmp_path / "nope") in lines[0], done.stderr
    assert not (tmp_path / "store").exists()


# --- 5. S3 ---------------------------------------------------------------------------------------------


@pytest.fixture
def s3(s3_buckets) -> Any:
    """Buckets `opt-in` and `opt-out` (S3 names need 3+ characters) on the session's endpoint; the boto3 client."""
    from opt import storage

    s3_buckets("opt-in")
    s3_buckets("opt-out")
    return storage.s3_client()


def test_s3_inputs_and_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3: Any, capsys) -> None:
    from opt.cli import main

    monkeypatch.setenv("OPT_HOME", str(tmp_path / "home"))
    uploaded = {}
    for k, lines in enumerate(_pile_files(3, 30)):
        body = _encode(tmp_path / "up" / f"part-{k}.jsonl.zst", lines).read_bytes()
        s3.put_object(Bucket="opt-in", Key=f"corpus/part-{k}.jsonl.zst", Body=body)
        uploaded[f"s3://opt-in/corpus/part-{k}.jsonl.zst"] = hashlib.sha256(body).hexdigest()
    cfg = _cfg("s3://opt-out/store", [{"name": "corpus", "kind": "pile", "uri": "s3://opt-in/corpus/"}])

    manifest, reused = prepare_dataset(cfg.data, cfg.storage.root)

    assert not reused and manifest.uri == f"s3://opt-out/store/datasets/{manifest.dataset_id}"
    assert {i["uri"]: i["sha256"] for i in manifest.inputs} == uploaded
    prefix = f"store/datasets/{manifest.dataset_id}/"
    keys = {o["Key"].removeprefix(prefix) for o in s3.list_objects_v2(Bucket="opt-out", Prefix=prefix)["Contents"]}
    assert keys == set(manifest.files) | {MANIFEST_FILE}
    assert {"train/corpus.bin", "train/corpus.idx", "valid/corpus.bin", "tokenizer/tokenizer.json", DUPLICATES_FILE} <= keys
    for rel, meta in manifest.files.items():
        data = s3.get_object(Bucket="opt-out", Key=prefix + rel)["Body"].read()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (meta["size"], meta["sha256"]), rel
    assert (manifest.sources["corpus"].exact_duplicates, manifest.sources["corpus"].near_duplicates) == (2, 2)

    # the same build again, through the CLI: reused from the store
    rc = main(["data", "prep", "--source", "corpus=pile:s3://opt-in/corpus/", "--out", "s3://opt-out/store", "--workers", "1",
               "--no-progress", "--set", "data.tokenizer.vocab_size=512"])  # fmt: skip
    assert rc == 0 and f"dataset {manifest.dataset_id} (reused): {manifest.uri}" in capsys.readouterr().out


# --- 6. the Prefect flow -------------------------------------------------------------------------------


@pytest.mark.slow
def test_prefect_flow_builds_the_same_dataset_as_the_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None
) -> None:
    from flows.data_prep import data_prep

    monkeypatch.setenv("OPT_HOME", str(tmp_path / "home"))
    corpus = _pile_corpus(tmp_path / "corpus", files=2, docs_per_file=20)
    overrides = [f"storage.root={tmp_path / 'store'}", "data.workers=1", "data.tokenizer.vocab_size=512",
                 "data.sources=" + json.dumps([{"name": "corpus", "kind": "pile", "uri": str(corpus)}])]  # fmt: skip

    first = data_prep(None, overrides)
    cfg = load_config(None, overrides)
    manifest, reused = prepare_dataset(cfg.data, cfg.storage.root)
    second = data_prep(None, overrides)

    assert not first["reused"] and reused and second["reused"]
    assert first["dataset_id"] == manifest.dataset_id == second["dataset_id"]
    assert first["uri"] == manifest.uri == str(tmp_path / "store" / "datasets" / manifest.dataset_id)
    assert manifest.sources["corpus"].train_tokens > 0
