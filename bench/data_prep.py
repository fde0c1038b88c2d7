"""Data prep end to end: our pipeline against a datasketch MinHashLSH + HF tokenizers pipeline, same processes.

Same corpus, same run. The corpus (default ~50 MB, `--mb`) recombines paragraphs of the bundled
sample corpus into documents and plants near copies (see bench/near_dup.py), written as 16 JSONL
files. Ours runs `prepare_dataset` (clean, filter, exact + near dedup, tokenize, pack Megatron shards)
with `--workers` worker processes (1: in the calling process). The peer does the same work the plain way
with the same number of processes: the workers normalise, key (sha1) and sign (datasketch MinHash) their
files; the main process drops exact duplicates with a set and near ones with datasketch's MinHashLSH at our
bands (decided by MinHash.jaccard); the workers then tokenize their files' survivors with HF tokenizers
(one thread each: TOKENIZERS_PARALLELISM=false, as ours encodes with one thread per worker) and write the
tokens. Both use the same GPT-2-style vocab.json/merges.txt, trained beforehand on another sample, as OPT
used GPT-2's BPE. "Per core" divides each side by the processes it ran (`--workers`). Near-duplicate
detection alone is also compared on one core (signatures + LSH + decisions; see bench/near_dup.py).

Targets: >= 2.5 MB/s per core end to end; near-dup >= 2x the peer at equal or better recall;
peak memory < 2 GB for a 1 GB corpus (`--mb 1000 --skip-baseline`). Prints one JSON line per measurement
and a final summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from near_dup import NUM_PERM, build_corpus, datasketch_lsh, datasketch_minhashes, evaluate, run_ours  # noqa: E402

from opt.data.clean import normalize  # noqa: E402
from opt.data.config import DataConfig  # noqa: E402
from opt.data.minhash import recall_bands  # noqa: E402
from opt.data.prep import prepare_dataset  # noqa: E402
from opt.data.tokenizer import EOS_ID, from_gpt2_files, train_tokenizer  # noqa: E402

VOCAB = 8192
SEQ_LEN = 2048
FILES = 16


def peak_rss_mb(who: int) -> float:
    """Peak RSS. For this process, VmHWM: getrusage's maxrss survives exec, so a process started from
    the bench driver (which holds the whole corpus) would report the driver's size, not its own."""
    if who == resource.RUSAGE_SELF:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(who).ru_maxrss / 1024


def write_corpus(texts: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    files = [open(out / f"part-{k:02d}.jsonl", "w", encoding="utf-8") for k in range(FILES)]  # noqa: SIM115
    for i, t in enumerate(texts):
        files[i % FILES].write(json.dumps({"text": t, "meta": {"pile_set_name": "bench", "id": str(i)}}) + "\n")
    for f in files:
        f.close()


def make_gpt2_files(out: Path) -> tuple[str, str]:
    """A GPT-2-style vocab.json + merges.txt trained on a different sample (OPT used a fixed GPT-2 BPE)."""
    tok = train_tokenizer(build_corpus(8, 0.0, 1).texts, VOCAB)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = tok.model.save(str(out))
    return vocab, merges


def run_ours_e2e(corpus_dir: Path, tmp: Path, workers: int, vocab: str, merges: str) -> dict:
    data = DataConfig.model_validate({
        "sources": [{"name": "bench", "kind": "pile", "uri": str(corpus_dir)}],
        "tokenizer": {"vocab_file": vocab, "merges_file": merges}, "seq_len": SEQ_LEN, "workers": workers,
    })  # fmt: skip
    t0 = time.perf_counter()
    manifest, _ = prepare_dataset(data, str(tmp / "store"), work_root=tmp / "work")
    dt = time.perf_counter() - t0
    s = manifest.sources["bench"]
    return {"seconds": dt, "train_tokens": s.train_tokens, "exact": s.exact_duplicates, "near": s.near_duplicates,
            "peak_rss_mb_main": peak_rss_mb(resource.RUSAGE_SELF), "peak_rss_mb_worker": peak_rss_mb(resource.RUSAGE_CHILDREN)}  # fmt: skip


def run_ours_isolated(corpus_dir: Path, tmp: Path, workers: int, vocab: str, merges: str) -> dict:
    """Ours in a fresh interpreter, so its peak memory is the pipeline's, not the corpus generator's."""
    import subprocess

    cmd = [sys.executable, __file__, "--run-ours", str(corpus_dir), str(tmp), str(workers), vocab, merges]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _read_normalized(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [normalize(json.loads(line)["text"]) for line in fh]


def _peer_sign(path: Path) -> tuple[list[bytes], np.ndarray]:
    """Peer worker, first pass over one file: exact keys (sha1 of the case/space-folded text) and MinHash values."""
    import hashlib

    texts = _read_normalized(path)
    keys = [hashlib.sha1(" ".join(t.lower().split()).encode()).digest() for t in texts]
    mhs, _ = datasketch_minhashes(texts)
    values = np.stack([m.hashvalues for m in mhs]) if mhs else np.zeros((0, NUM_PERM), dtype=np.uint64)
    return keys, values


def _peer_tokenize(job: tuple[Path, np.ndarray, Path, str, str]) -> int:
    """Peer worker, second pass over one file: tokenize its surviving documents, write their tokens."""
    path, keep, out, vocab, merges = job
    tok = from_gpt2_files(vocab, merges)
    survivors = [t for t, k in zip(_read_normalized(path), keep, strict=True) if k]
    with open(out, "wb") as fh:
        for b in range(0, len(survivors), 512):
            for enc in tok.encode_batch(survivors[b : b + 512]):
                np.asarray(enc.ids + [EOS_ID], dtype=np.uint16).tofile(fh)
    return len(survivors)


def _peer_init() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process, as ours


def run_baseline_e2e(corpus_dir: Path, out: Path, vocab: str, merges: str, workers: int) -> dict:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from datasketch import LeanMinHash, MinHash

    _peer_init()
    files = sorted(corpus_dir.glob("*.jsonl"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_peer_init) if workers > 1 else None
    try:
        run = pool.map if pool is not None else map
        signed = list(run(_peer_sign, files))
        scheme = MinHash(num_perm=NUM_PERM).scheme  # the workers' MinHashes are datasketch's defaults
        seen: set[bytes] = set()
        exact_keep, mhs = [], []
        for keys, values in signed:
            for key, hv in zip(keys, values, strict=True):
                exact_keep.append(key not in seen)
                if exact_keep[-1]:
                    seen.add(key)
                    mhs.append(LeanMinHash(seed=1, hashvalues=hv, scheme=scheme))
        near_of, _ = datasketch_lsh(mhs, 0.95, recall_bands(0.95, NUM_PERM))
        keep = np.zeros(len(exact_keep), dtype=bool)
        keep[np.flatnonzero(exact_keep)] = near_of < 0
        bounds = np.cumsum([0] + [len(k) for k, _ in signed])
        jobs = [(f, keep[bounds[i] : bounds[i + 1]], out / f"{f.stem}.bin", vocab, merges) for i, f in enumerate(files)]
        kept = sum(run(_peer_tokenize, jobs))
    finally:
        if pool is not None:
            pool.shutdown()
    exact = len(exact_keep) - sum(exact_keep)
    return {"seconds": time.perf_counter() - t0, "exact": exact, "near": int((near_of >= 0).sum()), "kept": kept}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50.0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-baseline", action="store_true", help="only ours (for the memory check at 1 GB)")
    ap.add_argument("--run-ours", nargs=5, help=argparse.SUPPRESS)  # internal: the isolated measurement
    args = ap.parse_args()
    if args.run_ours:
        corpus_dir, tmp_dir, workers, vocab_file, merges_file = args.run_ours
        print(json.dumps(run_ours_e2e(Path(corpus_dir), Path(tmp_dir), int(workers), vocab_file, merges_file)))
        return

    corpus = build_corpus(args.mb, 0.04, 0)
    with tempfile.TemporaryDirectory(prefix="bench-data-prep-") as d:
        tmp = Path(d)
        write_corpus(corpus.texts, tmp / "corpus")
        mb = sum(f.stat().st_size for f in (tmp / "corpus").glob("*.jsonl")) / 1e6
        cpus = os.cpu_count() or 1
        header = {
            "corpus_mb": round(mb, 2),
            "docs": len(corpus.texts),
            "planted_near": len(corpus.planted),
            "workers": args.workers,
            "cpus": cpus,
        }
        print(json.dumps(header), flush=True)
        del corpus.texts[:]  # the pipeline reads the files; keep the driver's memory honest
        vocab, merges = make_gpt2_files(tmp / "gpt2")

        def report(system: str, result: dict) -> dict:
            # per core used: both sides run `--workers` processes of one thread each
            rounded = {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}
            line = {
                "system": system,
                "processes": args.workers,
                "mb_s": round(mb / result["seconds"], 3),
                "mb_s_per_core": round(mb / result["seconds"] / args.workers, 3),
                **rounded,
            }
            print(json.dumps(line), flush=True)
            return line

        ours = report("ours", run_ours_isolated(tmp / "corpus", tmp, args.workers, vocab, merges))
        peak = max(ours["peak_rss_mb_main"], ours["peak_rss_mb_worker"])
        summary = {"corpus_mb": round(mb, 2), "ours_mb_s_per_core": ours["mb_s_per_core"], "ours_peak_rss_mb": peak}
        if not args.skip_baseline:
            base = report("datasketch+tokenizers", run_baseline_e2e(tmp / "corpus", tmp / "baseline", vocab, merges, args.workers))
            # near-dup detection alone, one core each, on the same (rebuilt, identical) corpus
            corpus = build_corpus(args.mb, 0.04, 0)
            near_ours, t_ours = run_ours(corpus.texts, 0.95, tmp / "spill")
            mhs, t_mh = datasketch_minhashes(corpus.texts)
            near_base, t_lsh = datasketch_lsh(mhs, 0.95, recall_bands(0.95, NUM_PERM))
            q_ours, q_base = evaluate(corpus, near_ours, 0.95), evaluate(corpus, near_base, 0.95)
            nd = {
                "system": "near-dup only", "ours_s": round(t_ours["seconds"], 2), "baseline_s": round(t_mh + t_lsh["lsh_s"], 2),
                "ours_recall": q_ours["recall"], "baseline_recall": q_base["recall"],
                "ours_precision": q_ours["precision"], "baseline_precision": q_base["precision"],
            }  # fmt: skip
            nd["speedup"] = round(nd["baseline_s"] / nd["ours_s"], 2)
            print(json.dumps(nd), flush=True)
            summary |= {
                "baseline_mb_s_per_core": base["mb_s_per_core"],
                "e2e_ratio": round(ours["mb_s_per_core"] / base["mb_s_per_core"], 2),
                "near_dup_speedup": nd["speedup"], "ours_recall": nd["ours_recall"], "baseline_recall": nd["baseline_recall"],
            }  # fmt: skip
        print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
