"""End to end: the Prefect flow over real Ray (2 workers, FSDP2 on gloo), MLflow on SQLite, the store.

One pipeline run is shared by the tests of this module (it takes about a minute here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from opt import stages, storage
from opt.config import load_config
from opt.logbook import Logbook
from tests import numerics
from tests.conftest import SAMPLE

pytestmark = pytest.mark.slow


def overrides(root: Path, **extra: object) -> list[str]:
    base = {
        "storage.root": root / "store",
        "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
        "tracking.artifact_root": root / "mlartifacts",
        "tracking.experiment": "it",
        "access.db_url": f"sqlite:///{root / 'access.db'}",
        "data.sources": json.dumps([{"name": "python-docs", "kind": "pile", "uri": str(SAMPLE)}]),
        "train.run": "it",
        "train.max_steps": 10,
        "train.checkpoint_every": 5,
        "train.warmup_steps": 2,
        "registry.model_name": "opt-it",
        "registry.access_class": "gated",
        "registry.gate.max_perplexity": 2000,
        "eval.max_batches": 20,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, ray_session):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("pipeline")
    os.environ["OPT_HOME"] = str(root / "home")
    with prefect_test_harness(server_startup_timeout=120):
        summary = pipeline(None, overrides(root))
    return root, summary


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
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    mv = client.get_model_version("opt-it", reg["version"])
    assert mv.tags["opt.dataset_id"] == summary["dataset"]["id"]
    assert mv.tags["opt.checkpoint_uri"] == summary["train"]["checkpoint"]
    assert mv.tags["opt.gate"] == "passed" and mv.tags["opt.access_class"] == "gated"
    assert client.get_model_version_by_alias("opt-it", "candidate").version == mv.version
    history = client.get_metric_history(mv.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 11))
    assert client.get_metric_history(mv.run_id, "eval_perplexity")


def test_exported_version_loads_in_transformers(pipeline_run, tmp_path):
    import torch
    import transformers

    from opt.model.checkpoint import load_model
    from opt.registry.mlflow_registry import fetch_version

    root, summary = pipeline_run
    reg = summary["registration"]
    files = fetch_version(f"sqlite:///{root / 'mlflow.db'}", "opt-it", reg["version"], tmp_path)
    paths = {f["path"] for f in files}
    assert {"consolidated/model.safetensors", "hf/model.safetensors", "hf/config.json", "README.md"} <= paths
    local = next(tmp_path.rglob("download_manifest.json")).parent
    hf = transformers.OPTForCausalLM.from_pretrained(local / "hf").eval()
    ours = load_model(local / "consolidated")
    x = torch.randint(4, ours.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        numerics.assert_within(numerics.roundoff_usage({"logits": hf(input_ids=x).logits}, {"logits": ours(x)}), "registered HF export")
    tok = transformers.AutoTokenizer.from_pretrained(local / "hf")
    assert tok.decode(tok("def main():").input_ids).endswith("def main():")


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


def test_gated_download_through_optctl(pipeline_run, tmp_path, capsys):
    from opt.cli import main

    root, summary = pipeline_run
    version = summary["registration"]["version"]
    common = [f"--set={o}" for o in overrides(root)]

    def optctl(*args: str) -> tuple[int, str, str]:
        code = main([*args, *common])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = optctl("access", "request", "--model", "opt-it", "--version", version, "--user", "carol", "--email",
                          "carol@lab.org", "--affiliation", "Lab", "--purpose", "Study memorisation in small OPT models")  # fmt: skip
    assert code == 0 and "request 1 filed" in out
    # no grant yet: no link
    code, _, err = optctl("access", "link", "1", "--user", "carol")
    assert code == 2 and err.startswith("error: ")
    code, _, err = optctl("access", "approve", "1", "--reviewer", "carol")
    assert code == 2 and "requester" in err  # nobody reviews their own request
    assert optctl("access", "approve", "1", "--reviewer", "dave")[0] == 0
    code, out, _ = optctl("access", "link", "1", "--user", "carol")
    token = out.splitlines()[0]
    assert code == 0 and token.startswith("opt-download:")
    code, out, _ = optctl("access", "download", token, "--model", "opt-it", "--version", version, "--out", str(tmp_path / "w"))
    assert code == 0 and "sha256-verified" in out
    assert (tmp_path / "w" / "hf" / "model.safetensors").is_file()
    # the link is scoped to its version
    code, _, err = optctl("access", "download", token, "--model", "opt-it-strict", "--version", "1", "--out", str(tmp_path / "v"))
    assert code == 2 and not (tmp_path / "v" / "hf").exists()
    assert optctl("access", "revoke", "1", "--actor", "dave", "--reason", "licence breach")[0] == 0
    code, _, err = optctl("access", "download", token, "--model", "opt-it", "--version", version, "--out", str(tmp_path / "z"))
    assert code == 2 and "grant revoked" in err and not (tmp_path / "z" / "hf").exists()
    code, out, _ = optctl("access", "audit")
    for action in ("request.created", "request.approved", "link.issued", "download.completed", "grant.revoked", "download.refused"):
        assert action in out


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
    tags = MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_run(result.mlflow_run_id).data.tags
    assert json.loads(tags["opt.changes.step-4"]) == changed


def test_a_run_that_keeps_spiking_fails_with_the_reason(pipeline_run):
    from opt.train.job import TrainingError

    root, _ = pipeline_run
    cfg = load_config(None, overrides(root, **{"train.run": "spiky", "train.max_steps": 6, "train.checkpoint_every": 2,
                                               "train.spikes.warmup_steps": 1, "train.spikes.max_rollbacks": 1,
                                               "train.chaos.nan_batches": "[3, 4, 5, 6, 7, 8]"}))  # fmt: skip
    with pytest.raises(TrainingError, match=r"gave up at step \d after 1 rollbacks: loss is nan.*logbook"):
        stages.train(cfg)
