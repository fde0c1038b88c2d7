"""Register an evaluated checkpoint as an MLflow model version, and fetch a version's files.

A version carries tags (dataset id, run, checkpoint URI, eval figures, gate verdict and reasons,
access class) and artifacts (consolidated weights, a Hugging Face export, a model card and a
download manifest with each file's size and sha256). Only a version that passes its gate gets the
`candidate` alias. Registering the same checkpoint twice returns the existing version.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from opt import storage
from opt.config import RunConfig
from opt.data.manifest import DatasetManifest
from opt.data.tokenizer import TOKENIZER_FILE
from opt.errors import OptError
from opt.eval.report import EvalReport
from opt.model.checkpoint import load_consolidated
from opt.model.hf import export_hf
from opt.model.plan import count_params
from opt.registry.card import DOWNLOAD_MANIFEST, LICENCE_FILE, CardFacts, render
from opt.registry.gates import Champion, Check, check_all, integrity_checks, passed_all, reasons_of
from opt.train.checkpoint import CommittedCheckpoint
from opt.train.export import export_consolidated

log = logging.getLogger(__name__)

CHAMPION = "champion"
# A gated version's artifacts in MLflow: the card, licence, eval report, gates and manifest (path, size, sha256), no weights
GATES_FILE = "gates.json"
REVIEW_FILES = ("README.md", LICENCE_FILE, "eval.json", GATES_FILE, DOWNLOAD_MANIFEST)
CANDIDATE = "candidate"


class RegistryError(OptError):
    """A model version that cannot be registered or fetched."""


@dataclass
class Registration:
    name: str
    version: str
    gate_passed: bool
    reasons: list[str]
    access_class: str
    aliases: list[str] = field(default_factory=list)
    reused: bool = False


def gate(report: EvalReport, cfg: RunConfig, champion: Champion | None = None, integrity: list[Check] | None = None) -> list[Check]:
    """Every check of the configured gate on an evaluated checkpoint (see opt/registry/gates.py)."""
    return check_all(cfg.registry.gate, report.perplexity, report.tasks, cfg.eval.task_names(cfg.model.preset), champion, integrity or [])


def champion_of(tracking_uri: str, name: str) -> Champion | None:
    """The version aliased `champion`, with the figures its tags recorded, or None if there is none."""
    from opt.tracking import client

    try:
        mv = client(tracking_uri).get_model_version_by_alias(name, CHAMPION)
    except Exception:
        return None
    tags = mv.tags
    return Champion(str(mv.version), float(tags.get("opt.eval_perplexity", "inf")), json.loads(tags.get("opt.eval_tasks", "{}")),
                    json.loads(tags.get("opt.eval_per_source", "{}")))  # fmt: skip


def export_weights(ckpt: CommittedCheckpoint, manifest: DatasetManifest, out: Path) -> Path:
    """The version's weights: consolidated and as a Hugging Face folder (with the dataset's tokenizer)."""
    if out.exists():
        shutil.rmtree(out)
    cache = out.parent / "cache"
    export_consolidated(ckpt, out / "consolidated", cache)
    tokenizer = storage.local_path(manifest.file_uri(f"tokenizer/{TOKENIZER_FILE}"), cache)
    export_hf(out / "consolidated", out / "hf", tokenizer_file=tokenizer)
    return out


def write_review_files(cfg: RunConfig, manifest: DatasetManifest, report: EvalReport, checks: list[Check], out: Path,
                       champion: Champion | None = None) -> None:  # fmt: skip
    """What a reviewer reads beside the weights: the model card, the licence, eval.json, gates.json, the download manifest."""
    from opt.access.licence import licence_text
    from opt.logbook import Logbook
    from opt.train.job import run_uri

    model_cfg, _ = load_consolidated(out / "consolidated")
    licence = licence_text(cfg.access.licence_file)
    try:
        events = Logbook(run_uri(cfg)).read()
    except (OSError, ValueError) as e:
        log.warning("could not read the logbook of run %s for the card: %s", cfg.train.run, e)
        events = []
    facts = CardFacts(count_params(model_cfg), report, checks, champion, events, licence)
    (out / "README.md").write_text(render(cfg, manifest, facts))
    (out / LICENCE_FILE).write_text(licence if licence.endswith("\n") else licence + "\n")
    (out / "eval.json").write_text(report.to_json())
    (out / GATES_FILE).write_text(json.dumps([c.to_dict() for c in checks], indent=2) + "\n")
    files = [
        {"path": p.relative_to(out).as_posix(), "size": p.stat().st_size, "sha256": storage.sha256_file(p)}
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != DOWNLOAD_MANIFEST
    ]
    (out / DOWNLOAD_MANIFEST).write_text(json.dumps({"files": files}, indent=2) + "\n")


def build_export(
    cfg: RunConfig, ckpt: CommittedCheckpoint, manifest: DatasetManifest, report: EvalReport, out: Path
) -> tuple[Path, list[Check], Champion | None]:
    """Export the weights, run every gate check (integrity included, against that export), write the review files."""
    export_weights(ckpt, manifest, out)
    integrity = integrity_checks(ckpt, manifest, out, out.parent / "cache") if cfg.registry.gate.check_integrity else []
    champion = champion_of(cfg.tracking.uri, cfg.model_name)
    checks = gate(report, cfg, champion, integrity)
    write_review_files(cfg, manifest, report, checks, out, champion)
    return out, checks, champion


def register(
    cfg: RunConfig, ckpt: CommittedCheckpoint, manifest: DatasetManifest, report: EvalReport, mlflow_run_id: str, work_dir: Path
) -> Registration:
    """Create (or find) the model version for `ckpt`; alias it `candidate` only if the gate passes."""
    from mlflow.exceptions import MlflowException

    from opt.tracking import client

    c = client(cfg.tracking.uri)
    name = cfg.model_name
    for mv in c.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("opt.checkpoint_uri") == ckpt.uri:
            aliases = list(c.get_model_version(name, mv.version).aliases or [])
            passed_before = mv.tags.get("opt.gate") == "passed"
            reasons_before = json.loads(mv.tags.get("opt.gate_reasons", "[]"))
            access = mv.tags.get("opt.access_class", "open")
            if access == "gated" and mv.tags.get("opt.release") != "published":  # stopped between version and release
                export = work_dir / "exports" / cfg.train.run / f"step-{ckpt.step}"
                if not (export / DOWNLOAD_MANIFEST).exists():
                    build_export(cfg, ckpt, manifest, report, export)
                publish_gated(cfg, str(mv.version), export, passed_before, reasons_before)
                c.set_model_version_tag(name, mv.version, "opt.release", "published")
            return Registration(name, str(mv.version), passed_before, reasons_before, access, aliases, reused=True)

    export_dir, checks, champion = build_export(cfg, ckpt, manifest, report, work_dir / "exports" / cfg.train.run / f"step-{ckpt.step}")
    passed, reasons = passed_all(checks), reasons_of(checks)
    artifact_path = f"registry/step-{ckpt.step}"
    if cfg.access_class == "gated":
        # what a reviewer reads, and no weights: those go to the release root, behind the access service
        for name_ in REVIEW_FILES:
            c.log_artifact(mlflow_run_id, str(export_dir / name_), artifact_path)
    else:
        c.log_artifacts(mlflow_run_id, str(export_dir), artifact_path)
    source = f"{c.get_run(mlflow_run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, tags={"opt.preset": cfg.model.preset}, description=f"OPT-{cfg.model.preset} family")
    tags = {
        "opt.dataset_id": manifest.dataset_id,
        "opt.run": cfg.train.run,
        "opt.mlflow_run_id": mlflow_run_id,
        "opt.checkpoint_uri": ckpt.uri,
        "opt.step": str(ckpt.step),
        "opt.eval_perplexity": f"{report.perplexity:.4f}",
        "opt.eval_loss": f"{report.loss:.4f}",
        "opt.gate": "passed" if passed else "failed",
        "opt.gate_reasons": json.dumps(reasons),
        "opt.eval_tasks": json.dumps(report.tasks, sort_keys=True),
        "opt.eval_per_source": json.dumps({k: round(v["perplexity"], 4) for k, v in report.per_source.items()}, sort_keys=True),
        "opt.access_class": cfg.access_class,
    }
    mv = c.create_model_version(name, source=source, run_id=mlflow_run_id, tags=tags, description=(export_dir / "README.md").read_text())
    _log_plots(c, cfg, mlflow_run_id, f"{artifact_path}/plots", report, champion, str(mv.version))
    if cfg.access_class == "gated":
        publish_gated(cfg, str(mv.version), export_dir, passed, reasons)
        c.set_model_version_tag(name, mv.version, "opt.release", "published")  # the access service holds the weights now
    aliases = []
    if passed:
        c.set_registered_model_alias(name, CANDIDATE, mv.version)
        aliases.append(CANDIDATE)
        if cfg.registry.gate.auto_promote:
            from opt.registry.promote import promote

            promote(cfg.tracking.uri, name, str(mv.version), CHAMPION, "passed every gate (registry.gate.auto_promote)", actor="registry")
            aliases.append(CHAMPION)
    return Registration(name, str(mv.version), passed, reasons, cfg.access_class, aliases)


def _log_plots(c: object, cfg: RunConfig, run_id: str, artifact_dir: str, report: EvalReport, champion: Champion | None,
               version: str) -> None:  # fmt: skip
    from opt.logbook import Logbook
    from opt.registry.plots import log_plots
    from opt.train.job import run_uri

    try:
        spikes = [int(e["step"]) for e in Logbook(run_uri(cfg)).read() if e["event"] == "spike" and "step" in e]
    except (OSError, ValueError):
        spikes = []
    log_plots(c, run_id, artifact_dir, report, champion, spikes, f"{cfg.model_name} v{version}")


def publish_gated(cfg: RunConfig, version: str, export_dir: Path, gate_passed: bool = True, gate_reasons: list[str] | None = None) -> None:
    """Publish a gated version's files to the access service's release root, with its signed manifest.

    `access.publish_via=local` (the embedded defaults) publishes in-process: registration runs beside the access
    database and keys. `service` stages the files under `access.staging_uri` and has the running service copy,
    verify and sign them (as the admin whose token is in `$OPT_ACCESS_TOKEN`), so the keys never leave its host.
    Either way the staging copy is deleted afterwards: the weights then live in the release root only.
    """
    from opt.access.licence import licence_text

    files = json.loads((export_dir / DOWNLOAD_MANIFEST).read_text())["files"]
    licence = licence_text(cfg.access.licence_file)
    reasons = gate_reasons or []
    if cfg.access.publish_via == "service":
        _publish_through_service(cfg, version, export_dir, files, licence, gate_passed, reasons)
    else:
        from opt.access.server import build_service

        service = build_service(cfg.access)
        try:
            expected = {f["path"]: f["sha256"] for f in files}
            service.publish_release(
                cfg.model_name, version, export_dir, list(expected), licence, expected, "operator", gate_passed, reasons
            )
        finally:
            service.close()
    shutil.rmtree(export_dir)


def _publish_through_service(
    cfg: RunConfig, version: str, export_dir: Path, files: list[dict], licence: str, gate_passed: bool, gate_reasons: list[str]
) -> None:
    import os

    from opt.access.client import AccessClient

    token = os.environ.get("OPT_ACCESS_TOKEN")
    if not token:
        raise RegistryError("access.publish_via=service: set $OPT_ACCESS_TOKEN to an admin's token of the access service")
    staged = storage.join(str(cfg.access.staging_uri), cfg.model_name, version)
    for f in files:
        storage.put_file(export_dir / f["path"], storage.join(staged, f["path"]))
    client = AccessClient(os.environ.get("OPT_ACCESS_URL") or cfg.access.url, token)
    try:
        body = {"model": cfg.model_name, "version": version, "source": staged, "licence": licence, "gate_passed": gate_passed,
                "gate_reasons": gate_reasons, "files": [{"path": f["path"], "sha256": f["sha256"]} for f in files]}  # fmt: skip
        client.call("POST", "/v1/releases", body)
    finally:
        client.close()
        for f in files:
            storage.delete(storage.join(staged, f["path"]))


def version_info(tracking_uri: str, name: str, version: str) -> dict:
    """Tags and source of a model version; RegistryError naming it when it does not exist."""
    from opt.tracking import client

    try:
        mv = client(tracking_uri).get_model_version(name, version)
    except Exception as e:
        raise RegistryError(f"model version {name} v{version} not found in {tracking_uri}: {str(e).splitlines()[0]}") from None
    return {
        "name": name,
        "version": str(mv.version),
        "source": mv.source,
        "tags": dict(mv.tags),
        "aliases": list(getattr(mv, "aliases", []) or []),
    }


def newest_version(tracking_uri: str, name: str) -> str:
    """The newest registered version of `name`; RegistryError when there is none."""
    from opt.tracking import client

    versions = client(tracking_uri).search_model_versions(f"name = '{name}'")
    if not versions:
        raise RegistryError(f"no registered versions of {name}; run `optctl pipeline run` first")
    return str(max(int(v.version) for v in versions))


def fetch_version(tracking_uri: str, name: str, version: str, out_dir: Path) -> list[dict]:
    """Copy an open version's files to `out_dir` and check each against its download manifest (sha256)."""
    import mlflow.artifacts

    info = version_info(tracking_uri, name, version)
    if info["tags"].get("opt.access_class") == "gated":
        raise RegistryError(
            f"{name} v{version} is gated: its weights are not in MLflow; `optctl access download {name} {version}` "
            "fetches them from the access service"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=info["source"], dst_path=str(out_dir), tracking_uri=tracking_uri))
    manifest = json.loads((local / DOWNLOAD_MANIFEST).read_text())
    for f in manifest["files"]:
        p = local / f["path"]
        if not p.is_file() or storage.sha256_file(p) != f["sha256"]:
            raise RegistryError(f"{name} v{version}: {f['path']} is missing or its sha256 differs from the download manifest")
    return manifest["files"]
