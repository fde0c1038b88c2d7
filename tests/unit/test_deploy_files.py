"""The compose stack and image stay consistent with the package (no Docker engine runs here)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO


def test_compose_services_use_commands_the_image_installs():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    bin_dir = Path(sys.executable).parent
    for name, svc in compose["services"].items():
        if svc.get("image") != "opt-platform:latest":
            continue
        entry = svc.get("entrypoint", ["optctl"])[0]
        assert (bin_dir / entry).exists() or shutil.which(entry), f"service {name}: {entry} is not installed by the package"
    # every platform service gets the same S3 / MLflow / Prefect wiring
    env = compose["x-platform-env"]
    assert env["OPT_S3_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert compose["services"]["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"


SECRET = re.compile(r"PASSWORD|SECRET|(ACCESS|SIGNING)_KEY$|TOKEN|AUTH_STRING|^PREFECT_AUTH$")
URL_PASSWORD = re.compile(r"://[^:/@\s]+:([^@\s]+)@")
REF = re.compile(r"\$\{(\w+)(:[?-][^}]*)?\}")


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())


def test_no_credential_is_committed_and_every_one_has_a_place_in_the_env_file():
    compose = _compose()
    envs = [compose["x-platform-env"]] + [svc.get("environment") or {} for svc in compose["services"].values()]
    for env in envs:
        for key, value in env.items():
            if SECRET.search(key):
                assert REF.fullmatch(str(value)), f"{key} is set in compose.yaml itself: {value!r}"
    text = (REPO / "docker" / "compose.yaml").read_text()
    for password in URL_PASSWORD.findall(text):  # a password inside a URL (a database URL) is a reference too
        assert REF.fullmatch(password), f"a URL in compose.yaml holds a literal password: {password!r}"
    used = {m[0] for m in REF.findall(text)}
    example = {
        line.split("=")[0]
        for line in (REPO / "docker" / "stack.env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert used == example, f"docker/stack.env.example and compose.yaml disagree: {sorted(used ^ example)}"
    assert all(
        line.endswith("=")
        for line in (REPO / "docker" / "stack.env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert "docker/.env" in (REPO / ".gitignore").read_text().splitlines()


def test_only_the_access_service_holds_its_keys_database_and_release_bucket():
    compose = _compose()
    services = compose["services"]
    for name, svc in services.items():
        env = svc.get("environment") or {}
        env = env if isinstance(env, dict) else {}
        merged = {**(compose["x-platform-env"] if svc.get("environment") is compose["x-platform-env"] else {}), **env}
        holds = {k for k in merged if k in ("OPT_ACCESS_SIGNING_KEY", "OPT_ACCESS_SECRET", "OPT_ACCESS_DB_URL")}
        assert holds == (set() if name != "access" else {"OPT_ACCESS_SIGNING_KEY", "OPT_ACCESS_SECRET", "OPT_ACCESS_DB_URL"}), name
    access_env = services["access"]["environment"]
    assert access_env["AWS_ACCESS_KEY_ID"] == "${RELEASE_S3_ACCESS_KEY}" and "PLATFORM_S3" not in json.dumps(access_env)
    assert "MLFLOW_TRACKING_PASSWORD" not in access_env
    platform = json.loads((REPO / "docker" / "minio" / "platform-policy.json").read_text())
    release = json.loads((REPO / "docker" / "minio" / "release-service-policy.json").read_text())
    assert not any("releases" in r for st in platform["Statement"] for r in st["Resource"])
    assert {r for st in release["Statement"] for r in st["Resource"]} == {
        "arn:aws:s3:::releases",
        "arn:aws:s3:::releases/*",
        "arn:aws:s3:::opt/staging/*",
    }
    staging_reads = [st for st in release["Statement"] if "arn:aws:s3:::opt/staging/*" in st["Resource"]]
    assert [st["Action"] for st in staging_reads] == [["s3:GetObject"]]


def test_no_console_or_dashboard_is_published_and_mlflow_signs_people_in():
    services = _compose()["services"]
    published = {name for name, svc in services.items() if svc.get("ports")}
    assert published == {"access", "mlflow", "prefect"}
    assert "--dashboard-host" in services["ray-head"]["entrypoint"]
    assert services["ray-head"]["entrypoint"][services["ray-head"]["entrypoint"].index("--dashboard-host") + 1] == "127.0.0.1"
    cmd = services["mlflow"]["command"]
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth" and "--allowed-hosts" in cmd
    assert services["mlflow"]["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${")
    assert services["prefect"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"].startswith("${")


def test_the_stack_config_publishes_through_the_service():
    from opt.config import load_config

    cfg = load_config(str(REPO / "configs" / "stack.yaml"), [])
    assert cfg.access.publish_via == "service" and cfg.access.release_root == "s3://releases/gated"
    assert cfg.access.staging_uri == "s3://opt/staging" and "postgres" not in cfg.access.db_url  # the URL is the service's secret


def test_dockerfile_installs_the_pinned_torch_and_the_package():
    text = (REPO / "docker" / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    torch_pin = next(line.strip().strip('",') for line in pyproject.splitlines() if line.strip().startswith('"torch=='))
    assert torch_pin in text
    assert 'pip install ".[postgres,cluster]"' in text and 'ENTRYPOINT ["optctl"]' in text


def test_the_compose_worker_serves_the_pool_the_deployments_use():
    from opt.config import load_config

    worker = _compose()["services"]["prefect-worker"]
    pool = load_config(REPO / "configs" / "stack.yaml").schedule.work_pool
    assert worker["entrypoint"][:3] == ["prefect", "worker", "start"] and worker["entrypoint"][4] == pool
    assert worker["working_dir"] == _compose()["services"]["optctl"]["working_dir"]  # where `optctl deploy` runs from
