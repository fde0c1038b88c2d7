"""opt.model against Hugging Face's OPT: same logits, lossless conversion, OPT's init and guards.

Every model here is the tiny `debug` preset (or a post-LN 350M-style variant of it), in fp32 on CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from opt.model import OPT, OPTConfig
from opt.model.checkpoint import CheckpointFormatError, load_consolidated, load_model
from opt.model.hf import export_hf, hf_config_kwargs, import_hf
from tests import numerics

DEBUG = OPTConfig.preset("debug")
# OPT-350M's shape in miniature: post-LN, no final LayerNorm, narrower embeddings with project_in/out.
DEBUG_350M_STYLE = OPTConfig.preset("debug", pre_ln=False, word_embed_dim=32)
CONFIGS = pytest.mark.parametrize("cfg", [DEBUG, DEBUG_350M_STYLE], ids=["pre-ln", "350m-style"])


def _hf_model(cfg: OPTConfig, seed: int = 0, perturb: bool = False) -> transformers.OPTForCausalLM:
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(**hf_config_kwargs(cfg)))
    if perturb:
        # HF inits LayerNorm to 1/0 and biases to 0, which would hide a LayerNorm or bias on the wrong
        # path; give every parameter its own random values (O(1) logits, not init's near-zero ones).
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layer_norm" in name and name.endswith("weight"):
                    p.copy_(1.0 + 0.3 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.05)
    return model.eval()


def _ids(cfg: OPTConfig, T: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, cfg.vocab_size, (2, T), generator=g)


def _imported(hf: transformers.OPTForCausalLM, tmp_path: Path) -> Path:
    hf.save_pretrained(tmp_path / "hf")
    return import_hf(tmp_path / "hf", tmp_path / "ours")


@CONFIGS
@pytest.mark.parametrize("perturb", [False, True], ids=["hf-init", "perturbed"])
def test_imported_model_gives_hf_logits(cfg: OPTConfig, perturb: bool, tmp_path: Path) -> None:
    hf = _hf_model(cfg, perturb=perturb)
    ours = load_model(_imported(hf, tmp_path))
    ids = _ids(cfg)
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert got.shape == want.shape == (2, 24, cfg.vocab_size)
    if perturb:
        assert want.std() > 0.1  # the comparison is not between two near-zero tensors
    # two implementations of the same sums: within fp32 roundoff of the logits' scale (tests/numerics.py)
    numerics.assert_within(numerics.roundoff_usage({"logits": got}, {"logits": want}), "logits against HF")


@CONFIGS
def test_imported_layer_norms_are_the_perturbed_ones(cfg: OPTConfig, tmp_path: Path) -> None:
    hf = _hf_model(cfg, perturb=True)
    ours = load_model(_imported(hf, tmp_path))
    ln = ours.layers[1].final_layer_norm
    hf_ln = hf.model.decoder.layers[1].final_layer_norm
    assert torch.equal(ln.weight, hf_ln.weight) and torch.equal(ln.bias, hf_ln.bias)
    assert not torch.equal(ln.weight, torch.ones_like(ln.weight))
    assert (ours.final_layer_norm is None) == (not cfg.pre_ln)
    assert (ours.project_in is None) == (cfg.embed_dim == cfg.d_model)


@CONFIGS
def test_import_then_export_is_lossless(cfg: OPTConfig, tmp_path: Path) -> None:
    hf = _hf_model(cfg, perturb=True)
    ckpt = _imported(hf, tmp_path)
    export_hf(ckpt, tmp_path / "exported")

    original = hf.state_dict()
    loaded_cfg, state = load_consolidated(ckpt)
    assert loaded_cfg == cfg  # config.json maps back to the config we started from
    assert {f"model.decoder.{k}" for k in state} == set(original) - {"lm_head.weight"}
    for key, tensor in state.items():
        assert torch.equal(tensor, original[f"model.decoder.{key}"]), key

    reloaded = transformers.OPTForCausalLM.from_pretrained(tmp_path / "exported").eval()
    round_tripped = reloaded.state_dict()
    assert set(round_tripped) == set(original)
    for key, tensor in original.items():
        assert torch.equal(round_tripped[key], tensor), key  # lm_head included: it is re-tied on load
    ids = _ids(cfg)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)


def test_export_of_our_own_model_loads_in_hf_with_the_same_logits(tmp_path: Path) -> None:
    from opt.model.checkpoint import save_consolidated

    torch.manual_seed(3)
    ours = OPT(DEBUG_350M_STYLE).eval()
    export_hf(save_consolidated(DEBUG_350M_STYLE, ours.state_dict(), tmp_path / "ours"), tmp_path / "hf")
    hf = transformers.OPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _ids(DEBUG_350M_STYLE)
    with torch.no_grad():
        numerics.assert_within(numerics.roundoff_usage({"logits": hf(ids).logits}, {"logits": ours(ids)}), "exported logits in HF")


def test_import_rejects_a_non_opt_model(tmp_path: Path) -> None:
    hf = _hf_model(DEBUG)
    hf.save_pretrained(tmp_path / "hf")
    meta = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**meta, "model_type": "gpt2"}))
    with pytest.raises(CheckpointFormatError, match="model_type is 'gpt2'"):
        import_hf(tmp_path / "hf", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_import_rejects_gelu_activation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**{**hf_config_kwargs(DEBUG), "activation_function": "gelu"}))
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointFormatError, match="activation_function='gelu'"):
        import_hf(tmp_path / "hf", tmp_path / "ours")


def test_import_rejects_a_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointFormatError, match="no config.json"):
        import_hf(tmp_path, tmp_path / "ours")


def test_reset_parameters_follows_opt_init() -> None:
    torch.manual_seed(0)
    cfg = DEBUG
    model = OPT(cfg)
    std = cfg.init_std
    out_std = std / math.sqrt(2 * cfg.n_layer)
    for layer in model.layers:
        assert layer.fc1.weight.std().item() == pytest.approx(std, rel=0.05)
        assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.05)
        assert layer.self_attn.out_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
        assert layer.fc2.weight.std().item() == pytest.approx(out_std, rel=0.05)
        assert torch.count_nonzero(layer.fc1.bias) == 0
        assert torch.equal(layer.final_layer_norm.weight, torch.ones(cfg.d_model))
    rows = torch.ones(cfg.vocab_size, dtype=torch.bool)
    rows[cfg.pad_token_id] = False
    assert model.embed_tokens.weight[rows].std().item() == pytest.approx(std, rel=0.05)
    assert torch.count_nonzero(model.embed_tokens.weight[cfg.pad_token_id]) == 0
    assert model.embed_positions.weight.std().item() == pytest.approx(std, rel=0.05)


def test_sequence_longer_than_max_seq_len_is_rejected() -> None:
    model = OPT(DEBUG).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, DEBUG.max_seq_len, dtype=torch.long)).shape == (1, DEBUG.max_seq_len, DEBUG.vocab_size)
        with pytest.raises(ValueError, match="max_seq_len"):
            model(torch.zeros(1, DEBUG.max_seq_len + 1, dtype=torch.long))


@CONFIGS
def test_activation_checkpointing_gives_the_same_loss_and_gradients(cfg: OPTConfig) -> None:
    assert cfg.dropout == 0.0  # otherwise the two passes would draw different masks
    torch.manual_seed(0)
    plain = OPT(cfg).train()
    ckpt = OPT(cfg.replace(activation_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    ids = _ids(cfg, T=16)
    targets = torch.roll(ids, -1, dims=1)
    losses = [m.loss(ids, targets) for m in (plain, ckpt)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    names = [name for name, _ in plain.named_parameters()]
    assert all(p.grad is not None for p in plain.parameters())
    want = dict(zip(names, (p.grad for p in plain.parameters()), strict=True))
    have = dict(zip(names, (q.grad for q in ckpt.parameters()), strict=True))
    numerics.assert_within(numerics.roundoff_usage(have, want), "recomputed gradients")
