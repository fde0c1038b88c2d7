"""File authorization under load, with SQLite and with PostgreSQL: requests per second and p50/p99 latency.

One `optctl access serve` process per backend (a fresh database: SQLite under a temporary folder, or a database
in a throwaway PostgreSQL cluster started from Debian's server binaries). `--researchers` accounts each hold a
grant of a small release (`--files` files) and have started a download; `--clients` threads then ask, for
`--seconds`, for file links (`GET /v1/downloads/{id}/files/{path}`: the token checked, the grant checked for
revocation, expiry and quota, the link signed, an audit entry appended) and time every answer (a 303). Then
the quota storm: `--storm` threads at once starting and completing whole downloads under one grant of quota 3;
never more than the quota may be granted. Prints a table, then one JSON line.

    python bench/authz_load.py                  # both backends, 16 clients, 10 s each
    python bench/authz_load.py --quick          # SQLite only, 1.5 s
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opt.access.server import free_port  # noqa: E402

BENCH = "authz_load"
BIN = Path(sys.executable).parent


class Postgres:
    """A throwaway PostgreSQL cluster on loopback (as the `postgres` user when run as root: initdb refuses root)."""

    def __init__(self, root: Path) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            raise SystemExit("no PostgreSQL server binaries (apt-get install postgresql); run with --backends sqlite")
        self.bin, self.root, self.port = Path(bins[-1]).parent, root, free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        root.mkdir(parents=True)
        if self.as_user:
            shutil.chown(root, "postgres")

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self.as_user, *cmd], check=True, capture_output=True, timeout=120)

    def start(self) -> str:
        self._run(str(self.bin / "initdb"), "-D", str(self.root / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-l", str(self.root / "log"), "-w", "-t", "60",
                  "-o", f"-p {self.port} -h 127.0.0.1 -k {self.root} -c max_connections=200", "start")  # fmt: skip
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")


def _serve(home: Path, db_url: str, port: int) -> subprocess.Popen:
    import httpx

    sets = {"access.home": home, "access.db_url": db_url, "access.release_root": home / "releases", "access.max_download_quota": 100}
    cmd = [str(BIN / "optctl"), "access", "serve", "--port", str(port), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OPT_ACCESS_DB_URL": db_url})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the access service did not start")


def _world(home: Path, db_url: str, researchers: int, files: int) -> tuple[list[str], str, list[str]]:
    """Accounts with grants and started downloads: (researcher tokens, reviewer token, file paths)."""
    from opt.access.server import build_service
    from opt.config import AccessConfig

    os.environ["OPT_ACCESS_DB_URL"] = db_url
    src = home.parent / "src"
    src.mkdir(exist_ok=True)
    for i in range(files):
        (src / f"shard-{i:03d}.bin").write_bytes(os.urandom(4096))
    paths = sorted(x.name for x in src.iterdir())
    cfg = AccessConfig(home=str(home), db_url=db_url, release_root=str(home / "releases"), max_download_quota=100)
    svc = build_service(cfg)
    svc.publish_release("opt-load", "1", src, paths, "Benchmark licence.")
    _, reviewer = svc.add_user("reviewer", "reviewer@lab.org", "reviewer")
    tokens = [svc.add_user(f"r{i}", f"r{i}@uni.edu", "researcher")[1].token for i in range(researchers)]
    svc.close()
    os.environ.pop("OPT_ACCESS_DB_URL")
    return tokens, reviewer.token, paths


def _grant(base: str, token: str, reviewer: str, quota: int) -> None:
    import httpx

    h = {"Authorization": f"Bearer {token}"}
    lic = httpx.get(f"{base}/v1/releases/opt-load/1", headers=h).json()["licence_sha256"]
    body = {"model": "opt-load", "version": "1", "affiliation": "Bench", "organisation_kind": "academic",
            "purpose": "Load-testing file authorization", "accept_licence_sha256": lic}  # fmt: skip
    req = httpx.post(f"{base}/v1/requests", headers=h, json=body).json()
    r = httpx.post(f"{base}/v1/requests/{req['id']}/approve", headers={"Authorization": f"Bearer {reviewer}"}, json={"quota": quota})
    r.raise_for_status()


def _load(base: str, tokens: list[str], paths: list[str], clients: int, seconds: float) -> dict:
    import httpx

    downloads = []
    for t in tokens:
        r = httpx.post(f"{base}/v1/downloads", headers={"Authorization": f"Bearer {t}"}, json={"model": "opt-load", "version": "1"})
        r.raise_for_status()
        downloads.append((t, r.json()["id"]))
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        token, dl = downloads[k % len(downloads)]
        mine: list[float] = []
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            i = 0
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = c.get(f"/v1/downloads/{dl}/files/{paths[i % len(paths)]}")
                mine.append(time.perf_counter() - t)
                if r.status_code != 303:
                    with lock:
                        errors[0] += 1
                i += 1
        with lock:
            latencies.extend(mine)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "rps": len(latencies) / wall, "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3, "errors": errors[0]}


def _storm(base: str, token: str, reviewer: str, storm: int, quota: int = 3) -> dict:
    """`storm` threads at once, each starting and completing whole downloads under one grant of `quota` until refused:
    how many distinct downloads were granted, and the grant's count (neither may pass the quota)."""
    import httpx

    _grant(base, token, reviewer, quota)
    barrier = threading.Barrier(storm)
    ids: set[int] = set()
    lock = threading.Lock()

    def worker(_: int) -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            barrier.wait()
            for _ in range(quota + 2):
                r = c.post("/v1/downloads", json={"model": "opt-load", "version": "1"})
                if r.status_code != 201:
                    return
                with lock:
                    ids.add(r.json()["id"])
                c.post(f"/v1/downloads/{r.json()['id']}/complete")

    with ThreadPoolExecutor(storm) as pool:
        list(pool.map(worker, range(storm)))
    grants = httpx.get(f"{base}/v1/grants", headers={"Authorization": f"Bearer {token}"}).json()
    used = max(g["downloads_used"] for g in grants)
    return {"storm": storm, "quota": quota, "started": len(ids), "downloads_used": used, "over_quota": used > quota or len(ids) > quota}


def run_backend(name: str, root: Path, args: argparse.Namespace) -> dict:
    pg = None
    home = root / name / "access"
    home.mkdir(parents=True)
    if name == "postgresql":
        pg = Postgres(root / name / "pg")
        db_url = pg.start()
    else:
        db_url = f"sqlite:///{home / 'access.db'}"
    port = free_port()
    proc = None
    try:
        tokens, reviewer, paths = _world(home, db_url, args.researchers + 1, args.files)
        proc = _serve(home, db_url, port)
        base = f"http://127.0.0.1:{port}"
        for t in tokens[:-1]:
            _grant(base, t, reviewer, 10)
        result = _load(base, tokens[:-1], paths, args.clients, args.seconds)
        result.update(_storm(base, tokens[-1], reviewer, args.storm))
        return {"backend": name, **result}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)
        if pg is not None:
            pg.stop()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--researchers", type=int, default=8)
    p.add_argument("--files", type=int, default=50)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--storm", type=int, default=32)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.backends, args.seconds, args.clients, args.storm, args.researchers, args.files = "sqlite", 1.5, 4, 8, 2, 10
    root = Path(tempfile.mkdtemp(prefix="bench-authz-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres") if shutil.which("runuser") else None
        os.chmod(root, 0o755)
    try:
        results = [run_backend(b, root, args) for b in args.backends.split(",")]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.clients} clients, {args.researchers} grants, {args.seconds:g} s per backend; storm of {args.storm} starts, quota 3")
    print(f"{'backend':<12}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'started':>9}{'used':>6}")
    for r in results:
        print(
            f"{r['backend']:<12}{r['rps']:>8.0f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['errors']:>8}{r['started']:>9}{r['downloads_used']:>6}"
        )
    out = {"bench": BENCH, "clients": args.clients, "researchers": args.researchers, "seconds": args.seconds, "results": results}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
