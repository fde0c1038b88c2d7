"""The compose stack and image stay consistent with the package (no Docker engine runs here)."""

from __future__ import annotations

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


def test_dockerfile_installs_the_pinned_torch_and_the_package():
    text = (REPO / "docker" / "Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    torch_pin = next(line.strip().strip('",') for line in pyproject.splitlines() if line.strip().startswith('"torch=='))
    assert torch_pin in text
    assert 'pip install ".[postgres,cluster]"' in text and 'ENTRYPOINT ["optctl"]' in text
