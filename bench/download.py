"""Loopback: a gated release downloaded with `optctl access download` through the access service, against a
plain static file server (`python -m http.server`) serving the same files, same run, same machine.

The release (`--size-mb` in `--shards` files of random bytes) is published into a fresh service (SQLite, local
release root), requested and approved; the service runs as `optctl access serve` in its own process. Ours: the
real CLI, which checks the manifest's signature, takes one download from the grant, asks the service for each
file (an audited authorization and a signed link), streams it and hashes it as it streams. Peer: the same client
work against `python -m http.server` over the release folder: the same files fetched by `--workers` threads
with httpx, written to disk and hashed (sha256) as they stream; no authorization, no signature. The figure is
MB/s of files written; each side's median over `--rounds` alternating rounds, into fresh folders. Prints a
table, then one JSON line.

    python bench/download.py                      # 2048 MB in 64 shards
    python bench/download.py --quick              # 32 MB in 4 shards (smoke test)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opt.access.server import free_port  # noqa: E402

BENCH = "download"
BIN = Path(sys.executable).parent


def _wait(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer")


def _peer_download(base: str, paths: list[str], out: Path, workers: int) -> None:
    import httpx

    def one(path: str) -> str:
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with httpx.stream("GET", f"{base}/{path}", timeout=60) as r, open(target, "wb") as f:
            r.raise_for_status()
            for chunk in r.iter_bytes(1 << 20):
                f.write(chunk)
                h.update(chunk)
        return h.hexdigest()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, paths))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=2048)
    p.add_argument("--shards", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.size_mb, args.shards, args.rounds = 32, 4, 1
    from opt.access.server import build_service
    from opt.config import AccessConfig

    root = Path(tempfile.mkdtemp(prefix="bench-download-"))
    procs: list[subprocess.Popen] = []
    try:
        src = root / "src"
        src.mkdir()
        shard = args.size_mb * (1 << 20) // args.shards
        block = os.urandom(1 << 20)
        for i in range(args.shards):  # distinct files (a counter in every MiB), so no layer can dedupe them
            with open(src / f"model-{i:05d}-of-{args.shards:05d}.safetensors", "wb") as f:
                for j in range(shard >> 20):
                    f.write(i.to_bytes(4, "little") + j.to_bytes(4, "little") + block[8:])
        paths = sorted(x.name for x in src.iterdir())
        home = root / "access"
        cfg = AccessConfig(home=str(home), db_url=f"sqlite:///{home / 'access.db'}", release_root=str(home / "releases"),
                           max_download_quota=100)  # fmt: skip
        service = build_service(cfg)
        rel = service.publish_release("opt-bench", "1", src, paths, "Benchmark licence.")
        _, token = service.add_user("reader", "reader@uni.edu", "researcher")
        _, rtoken = service.add_user("reviewer", "reviewer@uni.edu", "reviewer")
        release_dir = Path(rel.location)
        service.close()

        port = free_port()
        sets = [f"access.home={home}", f"access.db_url=sqlite:///{home / 'access.db'}", f"access.release_root={home / 'releases'}",
                "access.max_download_quota=100"]  # fmt: skip
        env = {**os.environ, "OPT_ACCESS_URL": f"http://127.0.0.1:{port}"}
        cmd = [str(BIN / "optctl"), "access", "serve", "--port", str(port), *[a for kv in sets for a in ("--set", kv)]]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        _wait(f"http://127.0.0.1:{port}/v1/health", procs[-1])
        peer_port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "http.server", str(peer_port), "--bind", "127.0.0.1", "--directory",
                                       str(release_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        _wait(f"http://127.0.0.1:{peer_port}/", procs[-1])

        (root / "reader.token").write_text(token.token)
        os.chmod(root / "reader.token", 0o600)
        access = [str(BIN / "optctl"), "access"]
        run = lambda *a, t=None: subprocess.run([*access, *a], check=True, capture_output=True, text=True, env={**env, **(t or {})})  # noqa: E731
        run("request", "--model", "opt-bench", "--version", "1", "--affiliation", "Bench", "--organisation-kind", "academic",
            "--purpose", "Measuring download throughput on loopback", "--accept-licence", t={"OPT_ACCESS_TOKEN": token.token})  # fmt: skip
        run("approve", "1", "--quota", "100", t={"OPT_ACCESS_TOKEN": rtoken.token})

        total = args.shards * shard
        times: dict[str, list[float]] = {"ours": [], "peer": []}
        for rnd in range(args.rounds):
            for side in ("ours", "peer") if rnd % 2 == 0 else ("peer", "ours"):
                out = root / f"out-{side}-{rnd}"
                t = time.perf_counter()
                if side == "ours":
                    run("download", "opt-bench", "1", "--out", str(out), "--workers", str(args.workers), "--no-progress",
                        t={"OPT_ACCESS_TOKEN": token.token})  # fmt: skip
                else:
                    _peer_download(f"http://127.0.0.1:{peer_port}", paths, out, args.workers)
                times[side].append(time.perf_counter() - t)
                shutil.rmtree(out)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=20)
        shutil.rmtree(root, ignore_errors=True)
    ours, peer = total / statistics.median(times["ours"]) / 1e6, total / statistics.median(times["peer"]) / 1e6
    out = {"bench": BENCH, "size_mb": args.size_mb, "shards": args.shards, "workers": args.workers, "rounds": args.rounds,
           "ours_mb_per_s": ours, "peer_mb_per_s": peer, "ratio": ours / peer,
           "ours_s": times["ours"], "peer_s": times["peer"]}  # fmt: skip
    print(f"{args.size_mb} MB in {args.shards} files, {args.workers} workers, median of {args.rounds}")
    print(
        f"ours (optctl access download via the service)  {ours:8.0f} MB/s\npeer (python -m http.server, same client work) {peer:8.0f} MB/s"
    )
    print(f"ratio {ours / peer:.2f}x")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
