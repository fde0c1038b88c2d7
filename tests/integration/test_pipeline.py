"""End to end: the Prefect flow over real Ray (2 workers, FSDP2 on gloo), MLflow on SQLite, the store.

The session's one pipeline run (tests/integration/conftest.py) is shared by these tests (it takes about a minute here).
"""

from __future__ import annotations

import json

import pytest

from opt import stages, storage
from opt.config import load_config
from opt.logbook import Logbook
from tests import numerics
from tests.integration.conftest import overrides, tracking_uri

pytestmark = pytest.mark.slow


def test_flow_produces_every_stage_contract(pipeline_run):
    root, summary = pipeline_run
    cfg = load_config(None, overrides(root))
    manifest = stages.find_dataset(cfg)
    assert summary["dataset"]["id"] == manifest.dataset_id and not summary["dataset"]["reused"]

    ckpt = stages.checkpoint(cfg)
    assert ckpt.step == 10 and summary["train"]["checkpoint"] == ckpt.uri
    assert stages.checkpoint(cfg, 5).step == 5  # the intermediate checkpoint is committed too
    eval_report = json.loads(storage.read_text(storage.join(ckpt.uri, "eval.json")))
    # the model learned something: better than uniform guessing over the vocabulary
    assert eval_report["perplexity"] < manifest.vocab_size
    assert summary["eval"]["perplexity"] == pytest.approx(eval_report["perplexity"])

    events = [e["event"] for e in Logbook(summary["train"]["run_uri"]).read()]
    assert events[0] == "run_started" and events.count("checkpoint") == 2 and events[-1] == "run_finished"
    assert storage.exists(storage.join(summary["train"]["run_uri"], "config.yaml"))


def test_registered_version_is_tagged_and_a_candidate(pipeline_run):
    from mlflow.tracking import MlflowClient

    root, summary = pipeline_run
    reg = summary["registration"]
    assert reg["gate_passed"] and reg["aliases"] == ["candidate"] and reg["access_class"] == "gated"
    client = MlflowClient(tracking_uri=tracking_uri(root))
    mv = client.get_model_version("opt-it", reg["version"])
    assert mv.tags["opt.dataset_id"] == summary["dataset"]["id"]
    assert mv.tags["opt.checkpoint_uri"] == summary["train"]["checkpoint"]
    assert mv.tags["opt.gate"] == "passed" and mv.tags["opt.access_class"] == "gated"
    assert client.get_model_version_by_alias("opt-it", "candidate").version == mv.version
    history = client.get_metric_history(mv.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 11))
    assert client.get_metric_history(mv.run_id, "eval_perplexity")


def test_mlflow_holds_no_gated_weights(pipeline_run):
    from mlflow.tracking import MlflowClient

    from opt.registry.mlflow_registry import RegistryError, fetch_version

    root, summary = pipeline_run
    version = summary["registration"]["version"]
    tracking = tracking_uri(root)
    with pytest.raises(RegistryError, match="is gated: its weights are not in MLflow"):
        fetch_version(tracking, "opt-it", version, root / "fetched")
    client = MlflowClient(tracking)
    mv = client.get_model_version("opt-it", version)

    def walk(path: str) -> list[str]:
        out = []
        for f in client.list_artifacts(mv.run_id, path):
            out += walk(f.path) if f.is_dir else [f.path]
        return out

    step = summary["train"]["checkpoint"].rsplit("-", 1)[1]
    assert sorted(p.split(f"registry/step-{step}/", 1)[1] for p in walk(f"registry/step-{step}")) == [
        "LICENCE.txt",
        "README.md",
        "download_manifest.json",
        "eval.json",
        "gates.json",
        "plots/perplexity_by_source.png",
        "plots/tasks.png",
        "plots/training.png",
    ]
    weights = [p for p in (root / "mlartifacts").rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".distcp")]
    assert weights == []  # a walk over MLflow's artifact store: no weight file of any version
    manifest = json.loads(next((root / "mlartifacts").rglob("download_manifest.json")).read_text())
    assert "hf/model.safetensors" in {f["path"] for f in manifest["files"]}  # what a reviewer reads: the list, with sha256
    assert not (root / "home" / "exports" / "it" / f"step-{step}").exists()  # the staging copy went after publication
    release = root / "access" / "releases" / "opt-it" / version
    assert (release / "hf" / "model.safetensors").is_file() and oct((root / "access").stat().st_mode & 0o777) == "0o700"


def test_mlflows_artifact_rest_api_serves_no_gated_weights(pipeline_run, mlflow_server):
    import httpx

    _, summary = pipeline_run
    version = summary["registration"]["version"]
    api = httpx.Client(base_url=f"{mlflow_server}/api/2.0", timeout=30)
    mv = api.get("/mlflow/model-versions/get", params={"name": "opt-it", "version": version}).json()["model_version"]
    assert mv["tags"] and {t["key"]: t["value"] for t in mv["tags"]}["opt.access_class"] == "gated"

    def walk(path: str) -> list[str]:
        r = api.get("/mlflow/artifacts/list", params={"run_id": mv["run_id"], "path": path})
        assert r.status_code == 200, r.text
        out = []
        for f in r.json().get("files", []):
            out += walk(f["path"]) if f["is_dir"] else [f["path"]]
        return out

    files = walk("")
    assert any(f.endswith("download_manifest.json") for f in files) and any(f.endswith("README.md") for f in files)
    assert not [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".distcp"))], files
    listing = api.get("/mlflow-artifacts/artifacts", params={"path": ""})  # the proxied store, whole
    assert listing.status_code == 200 and "safetensors" not in listing.text
    # and no weights under the version's own source, through the artifact proxy's download route
    step = summary["train"]["checkpoint"].rsplit("-", 1)[1]
    weights = api.get("/mlflow/artifacts/list", params={"run_id": mv["run_id"], "path": f"registry/step-{step}/hf"})
    assert weights.status_code == 200 and weights.json().get("files", []) == []


@pytest.fixture(scope="module")
def access_service(pipeline_run):
    from opt.access.server import build_service, running

    root, _ = pipeline_run
    service = build_service(load_config(None, overrides(root)).access)
    with running(service) as srv:
        yield srv
    service.close()


def test_gated_version_downloads_through_the_service_and_loads_in_transformers(pipeline_run, access_service, tmp_path):
    import torch
    import transformers

    from opt.access.client import AccessClient
    from opt.model.checkpoint import load_model

    root, summary = pipeline_run
    version = summary["registration"]["version"]
    svc = access_service.service
    ann = AccessClient(access_service.url, svc.add_user("ann", "ann@uni.edu", "researcher")[1].token)
    rev = AccessClient(access_service.url, svc.add_user("rev", "rev@lab.org", "reviewer")[1].token)
    rel = ann.call("GET", f"/v1/releases/opt-it/{version}")
    body = {"model": "opt-it", "version": version, "affiliation": "Uni", "organisation_kind": "academic",
            "purpose": "Check the HF export of a small OPT", "accept_licence_sha256": rel["licence_sha256"]}  # fmt: skip
    req = ann.call("POST", "/v1/requests", body)
    rev.call("POST", f"/v1/requests/{req['id']}/approve", {"quota": 1})
    files = ann.download("opt-it", version, tmp_path, progress=False)
    assert {"consolidated/model.safetensors", "hf/model.safetensors", "hf/config.json", "README.md"} <= {f.path for f in files}
    hf = transformers.OPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(tmp_path / "consolidated")
    x = torch.randint(4, ours.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        numerics.assert_within(numerics.roundoff_usage({"logits": hf(input_ids=x).logits}, {"logits": ours(x)}), "registered HF export")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.decode(tok("def main():").input_ids).endswith("def main():")


def test_pending_checkpoints_are_evaluated_beside_training_and_charted(pipeline_run):
    from mlflow.tracking import MlflowClient

    root, summary = pipeline_run
    cfg = load_config(None, overrides(root))
    step5 = storage.join(summary["train"]["run_uri"], "step-5", "eval.json")
    assert not storage.exists(step5)  # the pipeline evaluated its final checkpoint only
    reports = stages.evaluate_pending(cfg)
    assert [r.step for r in reports] == [5] and storage.exists(step5)
    assert stages.evaluate_pending(cfg) == []  # nothing left to do
    assert set(reports[0].tasks) == {"pydocs_cloze", "pydocs_choice", "pydocs_story"}
    run_id = MlflowClient(tracking_uri(root)).get_model_version("opt-it", summary["registration"]["version"]).run_id
    history = MlflowClient(tracking_uri(root)).get_metric_history(run_id, "eval_perplexity")
    assert {m.step for m in history} >= {5, 10}  # against the step: the UI charts it
    acc = MlflowClient(tracking_uri(root)).get_metric_history(run_id, "eval.pydocs_choice.acc")
    assert {m.step for m in acc} >= {5, 10}


def test_rerun_reuses_dataset_run_and_version(pipeline_run):
    root, summary = pipeline_run
    again = stages.run_all(load_config(None, overrides(root)))
    assert again.dataset_reused and again.dataset.dataset_id == summary["dataset"]["id"]
    assert again.train.checkpoint.step == 10
    assert again.registration.reused and again.registration.version == summary["registration"]["version"]


def test_same_run_name_resumes_from_newest_checkpoint(pipeline_run):
    root, summary = pipeline_run
    cfg = load_config(None, overrides(root, **{"train.max_steps": 12}))
    result = stages.train(cfg)
    assert result.checkpoint.step == 12
    events = Logbook(result.run_uri).read()
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed and resumed[-1]["step"] == 10
    changed = [e for e in events if e["event"] == "config_changed"]  # max_steps 10 -> 12, and the old config kept
    assert changed and "+  max_steps: 12" in changed[-1]["changes"] and storage.exists(changed[-1]["previous"])


def test_failing_gate_registers_without_alias(pipeline_run):
    root, _ = pipeline_run
    cfg = load_config(None, overrides(root, **{"registry.gate.max_perplexity": 2, "registry.model_name": "opt-it-strict"}))
    reg = stages.register(cfg, 10)
    assert not reg.gate_passed and reg.aliases == []
    assert "> max 2" in reg.reasons[0]


def test_gated_download_through_optctl(pipeline_run, access_service, tmp_path, capsys, monkeypatch):
    from opt.cli import main

    root, summary = pipeline_run
    version = summary["registration"]["version"]
    svc = access_service.service
    tokens = {name: svc.add_user(name, f"{name}@lab.org", role)[1].token for name, role in (("carol", "researcher"), ("dave", "reviewer"))}
    monkeypatch.setenv("OPT_ACCESS_URL", access_service.url)

    def optctl(who: str, *args: str) -> tuple[int, str, str]:
        monkeypatch.setenv("OPT_ACCESS_TOKEN", tokens[who])
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = optctl("carol", "access", "licence", "opt-it", version)
    assert code == 0 and "non-commercial research" in out
    request = ("access", "request", "--model", "opt-it", "--version", version, "--affiliation", "Lab", "--organisation-kind",
               "industry-research-lab", "--purpose", "Study memorisation in small OPT models")  # fmt: skip
    code, _, err = optctl("carol", *request)
    assert code == 2 and "--accept-licence" in err and len(err.strip().splitlines()) == 1
    code, out, _ = optctl("carol", *request, "--accept-licence")
    assert code == 0 and "filed" in out
    req_id = out.split()[1]
    code, _, err = optctl("carol", "access", "download", "opt-it", version, "--out", str(tmp_path / "early"), "--no-progress")
    assert code == 2 and "request pending" in err and not (tmp_path / "early" / "hf").exists()
    code, _, err = optctl("carol", "access", "approve", req_id)
    assert code == 2 and "not a reviewer" in err and len(err.strip().splitlines()) == 1
    code, _, err = optctl("dave", "access", "approve", req_id, "--days", "1000000000")
    assert code == 2 and "days" in err and "Traceback" not in err
    code, out, _ = optctl("dave", "access", "approve", req_id, "--quota", "2")
    assert code == 0 and "grant" in out
    grant_id = out.split()[1]
    code, out, _ = optctl("carol", "access", "download", "opt-it", version, "--out", str(tmp_path / "w"), "--no-progress")
    assert code == 0 and "signature and sha256 verified" in out
    assert (tmp_path / "w" / "hf" / "model.safetensors").is_file()
    assert optctl("dave", "access", "revoke", grant_id, "--reason", "licence breach")[0] == 0
    code, _, err = optctl("carol", "access", "download", "opt-it", version, "--out", str(tmp_path / "z"), "--no-progress")
    assert code == 2 and "grant revoked" in err and not (tmp_path / "z" / "hf").exists()
    code, out, _ = optctl("dave", "access", "audit")
    for action in ("request.created", "request.approve.refused", "request.approved", "download.started", "file.served", "grant.revoked"):
        assert action in out
    code, out, _ = optctl("dave", "access", "audit", "verify")
    assert code == 0 and "audit chain intact" in out
    code, out, _ = optctl("carol", "access", "audit")
    assert "dave" not in out  # a researcher reads their own entries only
    monkeypatch.delenv("OPT_ACCESS_TOKEN")
    code = main(["access", "list"])
    assert code == 2 and "no token" in capsys.readouterr().err


def test_resume_from_a_checkpoint_is_bitwise_exact(pipeline_run):
    """A run that loses its newest checkpoint resumes from the one before and ends with the same weights."""
    import shutil

    import torch

    from opt.train.export import load_checkpoint_model

    root, _ = pipeline_run
    # dropout on, so the per-step RNG matters too
    cfg = load_config(None, overrides(root, **{"train.run": "exact", "train.max_steps": 8, "train.checkpoint_every": 4,
                                               "model.overrides": "{dropout: 0.1}"}))  # fmt: skip
    first = stages.train(cfg)
    assert first.checkpoint.step == 8
    uninterrupted = load_checkpoint_model(first.checkpoint, root / "cache").state_dict()
    shutil.rmtree(first.checkpoint.uri)  # as if the job died before step 8 was committed
    resumed = stages.train(cfg)
    assert resumed.checkpoint.step == 8
    events = [e for e in Logbook(resumed.run_uri).read() if e["event"] == "resumed"]
    assert events and events[-1]["step"] == 4
    again = load_checkpoint_model(resumed.checkpoint, root / "cache2").state_dict()
    assert all(torch.equal(uninterrupted[k], again[k]) for k in uninterrupted)


def test_resume_with_another_optimizer_and_clipping_is_recorded(pipeline_run):
    from mlflow.tracking import MlflowClient

    root, _ = pipeline_run
    cfg = load_config(None, overrides(root, **{"train.run": "sgd", "train.max_steps": 4, "train.checkpoint_every": 2}))
    stages.train(cfg)
    switched = load_config(None, overrides(root, **{"train.run": "sgd", "train.max_steps": 6, "train.checkpoint_every": 2,
                                                    "train.optimizer": "sgd", "train.grad_clip": 0.3}))  # fmt: skip
    result = stages.train(switched)
    assert result.checkpoint.step == 6
    book = Logbook(result.run_uri).read()
    switch = [e for e in book if e["event"] == "optimizer_switched"][-1]
    assert (switch["previous"], switch["optimizer"], switch["step"], switch["state"]) == ("adamw", "sgd", 4, "new")
    changed = [e for e in book if e["event"] == "hparams_changed"][-1]["changes"]
    assert changed == {"optimizer": ["adamw", "sgd"], "grad_clip": [1.0, 0.3]}
    tags = MlflowClient(tracking_uri(root)).get_run(result.mlflow_run_id).data.tags
    assert json.loads(tags["opt.changes.step-4"]) == changed


def test_a_run_that_keeps_spiking_fails_with_the_reason(pipeline_run):
    from opt.train.job import TrainingError

    root, _ = pipeline_run
    cfg = load_config(None, overrides(root, **{"train.run": "spiky", "train.max_steps": 6, "train.checkpoint_every": 2,
                                               "train.spikes.warmup_steps": 1, "train.spikes.max_rollbacks": 1,
                                               "train.chaos.nan_batches": "[3, 4, 5, 6, 7, 8]"}))  # fmt: skip
    with pytest.raises(TrainingError, match=r"gave up at step \d after 1 rollbacks: loss is nan.*logbook"):
        stages.train(cfg)
    from mlflow.tracking import MlflowClient

    record = json.loads(storage.read_text(storage.join(cfg.storage.root, "runs", "spiky", "run.json")))
    assert MlflowClient(cfg.tracking.uri).get_run(record["mlflow_run_id"]).info.status == "FAILED"  # the UI shows it ended
