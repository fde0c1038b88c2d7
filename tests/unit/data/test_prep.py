from __future__ import annotations

import json

import numpy as np
import pytest

from opt import storage
from opt.config import load_config
from opt.data.clean import normalize
from opt.data.indexed import IndexedDataset
from opt.data.manifest import load_manifest
from opt.data.prep import prepare_dataset
from opt.data.sources import SourceError
from opt.data.tokenizer import EOS_ID, load_tokenizer
from tests.conftest import REPO, write_jsonl

LOREM = "The quick brown fox jumps over the lazy dog while the {} cat watches from the warm windowsill. "


def _docs(n: int, tag: str) -> list[dict]:
    return [{"text": (LOREM.format(f"{tag}{i}") * 3), "meta": {"pile_set_name": tag, "id": f"{tag}-{i}"}} for i in range(n)]


def _cfg(tmp_path, sources: list[tuple[str, str, str]], **extra):
    overrides = [f"storage.root={tmp_path / 'store'}", "data.tokenizer.vocab_size=300", "data.valid_fraction=0.2"]
    overrides.append("data.sources=" + json.dumps([{"name": n, "kind": k, "uri": u} for n, k, u in sources]))
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def test_normalize_nfc_controls_and_whitespace():
    assert normalize("Cafe\u0301\x00 \t\r\nline\n\n\n\nend  ") == "Caf\u00e9\nline\n\nend"


def test_prepares_manifest_tokens_and_quarantine(tmp_path):
    good = _docs(30, "a")
    bad = ['{"text": "broken', json.dumps({"meta": {}}), json.dumps({"text": "tiny"})]
    dup = [dict(good[0])]  # an exact duplicate of the first document
    src = write_jsonl(tmp_path / "in" / "a.jsonl", good + bad + dup)
    (tmp_path / "in" / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    text_dir = tmp_path / "books"
    text_dir.mkdir()
    for i in range(6):
        (text_dir / f"book{i}.txt").write_text(LOREM.format(f"book{i}") * 4)
    cfg = _cfg(tmp_path, [("a", "jsonl", str(src.parent)), ("books", "text", str(text_dir))])

    manifest, reused = prepare_dataset(cfg.data, cfg.storage.root)

    assert not reused
    a = manifest.sources["a"]
    assert a.docs_in == 30 + 3 + 1 + 1
    assert a.dropped == {"invalid_json": 1, "missing_text": 1, "too_short": 1, "invalid_utf8": 1}
    assert a.exact_duplicates == 1
    assert a.train_docs + a.valid_docs == 30 and a.valid_docs >= 1
    assert manifest.sources["books"].train_docs + manifest.sources["books"].valid_docs == 6
    # every output file is listed with its real sha256
    for rel, meta in manifest.files.items():
        assert storage.stat(manifest.file_uri(rel)).sha256 == meta["sha256"]
    quarantined = [json.loads(x) for x in storage.read_text(manifest.file_uri("quarantine/a.jsonl")).splitlines()]
    assert {q["reason"] for q in quarantined} == {"invalid_json", "missing_text", "invalid_utf8"}
    assert all(q["line"] >= 1 and q["file"] for q in quarantined)
    # Megatron shards per source: documents separated by </s>, sequences of seq_len, vocab padded to 8
    assert manifest.vocab_size % 8 == 0 and manifest.format == "megatron-mmidx/1"
    tok = load_tokenizer(manifest.file_uri("tokenizer/tokenizer.json"))
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    for name in ("a", "books"):
        shard = IndexedDataset(manifest.file_uri(f"train/{name}"))
        tokens = shard.tokens()
        st = manifest.sources[name]
        assert tokens.size == st.train_tokens and (tokens == EOS_ID).sum() == st.train_docs
        assert tokens.max() < manifest.vocab_size
        assert all(n == cfg.data.seq_len for n in shard.sizes[:-1]) and 0 < shard.sizes[-1] <= cfg.data.seq_len
        first_doc = tokens[: int(np.argmax(tokens == EOS_ID))]
        assert ("quick brown fox" if name == "a" else "lazy dog") in tok.decode(first_doc.tolist())
        valid = IndexedDataset(manifest.file_uri(f"valid/{name}"))
        assert valid.num_tokens == st.valid_tokens > 0


def test_rerun_reuses_dataset_and_id_depends_on_content(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", _docs(20, "a"))
    cfg = _cfg(tmp_path, [("a", "jsonl", str(src))])
    first, _ = prepare_dataset(cfg.data, cfg.storage.root)
    again, reused = prepare_dataset(cfg.data, cfg.storage.root)
    assert reused and again.dataset_id == first.dataset_id
    # the same content at another path: same id
    moved = write_jsonl(tmp_path / "elsewhere" / "a.jsonl", _docs(20, "a"))
    cfg_moved = _cfg(tmp_path, [("a", "jsonl", str(moved))])
    assert prepare_dataset(cfg_moved.data, cfg_moved.storage.root)[0].dataset_id == first.dataset_id
    # changed content or settings: a new id
    write_jsonl(tmp_path / "a.jsonl", _docs(21, "a"))
    assert prepare_dataset(cfg.data, cfg.storage.root)[0].dataset_id != first.dataset_id
    cfg_seq = _cfg(tmp_path, [("a", "jsonl", str(moved))], **{"data.seq_len": 64})
    assert prepare_dataset(cfg_seq.data, cfg_seq.storage.root)[0].dataset_id != first.dataset_id


def test_source_names_with_dots_get_their_own_shards(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", _docs(20, "a"))
    cfg = _cfg(tmp_path, [("pile.cc", "jsonl", str(src))])
    manifest, _ = prepare_dataset(cfg.data, cfg.storage.root)
    assert {"train/pile.cc.bin", "train/pile.cc.idx", "valid/pile.cc.bin", "valid/pile.cc.idx"} <= set(manifest.files)
    assert IndexedDataset(manifest.file_uri("train/pile.cc")).num_tokens == manifest.sources["pile.cc"].train_tokens


def test_missing_source_fails_naming_it(tmp_path):
    cfg = _cfg(tmp_path, [("ghost", "jsonl", str(tmp_path / "nope"))])
    with pytest.raises(SourceError, match="ghost"):
        prepare_dataset(cfg.data, cfg.storage.root)


def test_bundled_sample_corpus_prepares(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # tiny.yaml's paths are relative to the checkout
    cfg = load_config("configs/tiny.yaml", [f"storage.root={tmp_path}"])
    manifest, _ = prepare_dataset(cfg.data, cfg.storage.root)
    assert load_manifest(manifest.uri).dataset_id == manifest.dataset_id
    s = manifest.sources["python-docs"]
    assert s.train_tokens > 100_000 and s.valid_tokens > 1_000


def test_stages_called_again_count_once(tmp_path):
    from opt.data.prep import DatasetBuild

    src = write_jsonl(tmp_path / "a.jsonl", _docs(20, "a"))
    cfg = _cfg(tmp_path, [("a", "jsonl", str(src))])
    once, _ = prepare_dataset(cfg.data, cfg.storage.root, work_root=tmp_path / "w1")
    build = DatasetBuild(cfg.data, str(tmp_path / "store2"), tmp_path / "w2")
    for _ in range(2):  # a retried Prefect task runs a stage again
        build.clean("a")
    build.dedup()
    build.tokenizer()
    for _ in range(2):
        build.tokenize("a")
    build.pack("a")
    twice = build.publish()
    assert vars(twice.sources["a"]) == vars(once.sources["a"])
    assert twice.files == once.files
