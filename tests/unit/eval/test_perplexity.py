"""The perplexity the gate decides on, against an independent computation: the same held-out tokens through
Hugging Face's `OPTForCausalLM` and its own loss, on the exported weights, per source and token-weighted overall."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from opt.config import load_config
from opt.data.loader import open_tokens
from opt.data.prep import prepare_dataset
from opt.model import OPT
from tests.conftest import write_jsonl

TEXT = "The {} quick brown fox jumps over the lazy dog while {} cats watch from a warm windowsill. "


def test_eval_perplexity_equals_hf_opts_own_loss(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import transformers

    from opt.eval import perplexity
    from opt.model.checkpoint import save_consolidated
    from opt.model.hf import export_hf
    from opt.train.checkpoint import CommittedCheckpoint

    a = write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": TEXT.format(i, i * 7) * 5} for i in range(120)])
    b = write_jsonl(tmp_path / "in" / "b.jsonl", [{"text": (TEXT.format(i * 3, "many") + "Another line. ") * 3} for i in range(80)])
    sources = f"[{{name: a, kind: pile, uri: '{a}'}}, {{name: b, kind: pile, uri: '{b}'}}]"
    cfg = load_config(None, [f"storage.root={tmp_path / 'store'}", f"data.sources={sources}", "data.tokenizer.vocab_size=300",
                             "data.seq_len=32", "data.valid_fraction=0.2"])  # fmt: skip
    manifest, _ = prepare_dataset(cfg.data, cfg.storage.root)
    model_cfg = cfg.model.build(manifest.vocab_size, manifest.seq_len)
    torch.manual_seed(0)
    model = OPT(model_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # far from uniform: a wrong weighting would show
    # the loading of a committed checkpoint is tested elsewhere (test_loop, the pipeline); here only the figure
    monkeypatch.setattr(perplexity, "load_checkpoint_model", lambda ckpt, cache: model)
    (tmp_path / "step-1").mkdir()
    report = perplexity.evaluate(CommittedCheckpoint(1, str(tmp_path / "step-1"), {}), manifest, tmp_path / "cache", batch_size=3)
    assert set(report.per_source) == {"a", "b"}

    hf = transformers.OPTForCausalLM.from_pretrained(
        export_hf(save_consolidated(model_cfg, model.state_dict(), tmp_path / "c"), tmp_path / "hf")
    ).eval()
    total, count = 0.0, 0
    for name in ("a", "b"):
        tokens = torch.from_numpy(open_tokens(manifest, f"valid/{name}.bin", tmp_path / "cache").astype("int64"))
        nll, n = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(tokens) - 1, manifest.seq_len):  # every predictable token once, windows of seq_len
                window = tokens[start : start + manifest.seq_len + 1]
                inp, tgt = window[:-1][None], window[1:][None]
                loss = hf(input_ids=inp, labels=inp, shift_labels=tgt).loss  # HF's own mean cross-entropy
                nll, n = nll + loss.item() * tgt.numel(), n + tgt.numel()
        assert report.per_source[name]["tokens"] == n
        assert report.per_source[name]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5), name
        total, count = total + nll, count + n
    assert report.tokens == count and report.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)  # token-weighted
    naive = sum(report.per_source[s]["perplexity"] for s in ("a", "b")) / 2
    assert abs(naive - report.perplexity) > 1e-3 * report.perplexity  # the weighting is tested, not passed by symmetry
