"""A gated download: check the link against the grant, copy the version's files, verify, count it."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from opt.access.links import AccessError
from opt.access.service import AccessService


def require_gated_version(tracking_uri: str, model_name: str, model_version: str) -> dict:
    """The registry record of a gated version; AccessError when it is missing or open."""
    from opt.registry.mlflow_registry import version_info

    info = version_info(tracking_uri, model_name, model_version)
    if info["tags"].get("opt.access_class", "open") != "gated":
        raise AccessError(f"{model_name} v{model_version} is open: it needs no access request; fetch it from the MLflow registry")
    return info


def download(service: AccessService, tracking_uri: str, token: str, model_name: str, model_version: str, out_dir: Path) -> list[dict]:
    """Copy a gated version's files into `out_dir` if `token` authorizes it; every file is sha256-verified.

    Files land in a temporary folder first and move into `out_dir` only once all of them verified,
    so a refused or failed download leaves nothing half-copied behind and costs no quota.
    """
    from opt.registry.mlflow_registry import fetch_version

    require_gated_version(tracking_uri, model_name, model_version)
    grant = service.authorize_download(token, model_name, model_version)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".incoming-") as tmp:
        files = fetch_version(tracking_uri, model_name, model_version, Path(tmp))
        root = next(Path(tmp).rglob("download_manifest.json")).parent
        for f in files + [{"path": "download_manifest.json"}]:
            dst = out_dir / f["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(root / f["path"], dst)
    service.record_download(grant.id, len(files), sum(f["size"] for f in files))
    return files
