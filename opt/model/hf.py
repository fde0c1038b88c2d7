"""Lossless conversion between our consolidated checkpoints and Hugging Face's OPT format.

Hugging Face's names are ours behind a `model.decoder.` prefix; `lm_head.weight` is tied to the
token embedding, so it is dropped on import (after checking the tie) and omitted on export.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from opt.model.checkpoint import CheckpointFormatError, load_consolidated, save_consolidated
from opt.model.config import OPTConfig

log = logging.getLogger(__name__)

HF_PREFIXES = ("model.decoder.", "decoder.")


def config_from_hf(hf: dict) -> OPTConfig:
    """Our OPTConfig for a Hugging Face OPT `config.json` dict; refuses variants we do not model."""
    if hf.get("model_type") != "opt":
        raise CheckpointFormatError(f"model_type is {hf.get('model_type')!r}, expected 'opt'")
    unsupported = {
        "activation_function": (hf.get("activation_function", "relu"), "relu"),
        "enable_bias": (hf.get("enable_bias", True), True),
        "layer_norm_elementwise_affine": (hf.get("layer_norm_elementwise_affine", True), True),
    }
    for key, (got, want) in unsupported.items():
        if got != want:
            raise CheckpointFormatError(f"unsupported OPT variant: {key}={got!r} (only {want!r} is supported)")
    pre_ln = bool(hf.get("do_layer_norm_before", True))
    if pre_ln and hf.get("_remove_final_layer_norm", False):
        raise CheckpointFormatError("unsupported OPT variant: pre-LN without the final LayerNorm")
    d_model = hf["hidden_size"]
    ffn = hf.get("ffn_dim", 4 * d_model)
    embed = hf.get("word_embed_proj_dim", d_model)
    return OPTConfig(
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        d_model=d_model,
        d_ffn=0 if ffn == 4 * d_model else ffn,
        vocab_size=hf["vocab_size"],
        max_seq_len=hf["max_position_embeddings"],
        word_embed_dim=0 if embed == d_model else embed,
        pre_ln=pre_ln,
        dropout=hf.get("dropout", 0.1),
        attention_dropout=hf.get("attention_dropout", 0.0),
        activation_dropout=hf.get("activation_dropout", 0.0),
        init_std=hf.get("init_std", 0.02),
        pad_token_id=hf.get("pad_token_id", 1),
    )


def hf_config_kwargs(cfg: OPTConfig) -> dict:
    """Keyword arguments for `transformers.OPTConfig` describing `cfg`."""
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layer,
        ffn_dim=cfg.ffn_dim,
        num_attention_heads=cfg.n_head,
        max_position_embeddings=cfg.max_seq_len,
        word_embed_proj_dim=cfg.embed_dim,
        do_layer_norm_before=cfg.pre_ln,
        _remove_final_layer_norm=False,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout,
        activation_function="relu",
        init_std=cfg.init_std,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=2,  # OPT's Hugging Face checkpoints start prompts with </s> (id 2)
        eos_token_id=2,
        tie_word_embeddings=True,
    )


def _read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(str(src / name)))
        return state
    if (src / "model.safetensors").is_file():
        return load_file(str(src / "model.safetensors"))
    if (src / "pytorch_model.bin").is_file():
        return torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointFormatError(f"{src}: no model.safetensors, sharded index or pytorch_model.bin found")


def import_hf(src_dir: str | Path, dst_dir: str | Path) -> Path:
    """Convert a `save_pretrained` OPT directory into a consolidated checkpoint at `dst_dir`."""
    src = Path(src_dir)
    if not (src / "config.json").is_file():
        raise CheckpointFormatError(f"{src}: no config.json; expected a directory written by save_pretrained")
    cfg = config_from_hf(json.loads((src / "config.json").read_text()))
    state: dict[str, torch.Tensor] = {}
    lm_head = None
    for key, tensor in _read_hf_weights(src).items():
        if key == "lm_head.weight":
            lm_head = tensor
            continue
        prefix = next((p for p in HF_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise CheckpointFormatError(f"{src}: unexpected weight {key!r}")
        state[key[len(prefix) :]] = tensor
    if lm_head is not None and not torch.equal(lm_head, state["embed_tokens.weight"]):
        raise CheckpointFormatError(f"{src}: lm_head.weight is not tied to embed_tokens; untied OPT is unsupported")
    out = save_consolidated(cfg, state, dst_dir)
    _keep_tokenizer(src, Path(out))
    return out


TOKENIZER_JSON = "tokenizer.json"


def _keep_tokenizer(src: Path, dst: Path) -> None:
    """The source's tokenizer beside the imported weights, as one `tokenizer.json` (so the model can be evaluated
    like one of ours); a save_pretrained folder with only vocab.json + merges.txt is converted by transformers."""
    if (src / TOKENIZER_JSON).is_file():
        shutil.copyfile(src / TOKENIZER_JSON, dst / TOKENIZER_JSON)
        return
    if not ((src / "vocab.json").is_file() and (src / "merges.txt").is_file()):
        log.warning("%s has no tokenizer (tokenizer.json, or vocab.json + merges.txt): the import has weights only", src)
        return
    import transformers

    transformers.AutoTokenizer.from_pretrained(str(src), use_fast=True).backend_tokenizer.save(str(dst / TOKENIZER_JSON))


def export_hf(src_dir: str | Path, dst_dir: str | Path, tokenizer_file: str | Path | None = None) -> Path:
    """Write a consolidated checkpoint as a directory `OPTForCausalLM.from_pretrained` loads."""
    import transformers
    from safetensors.torch import save_file

    cfg, state = load_consolidated(src_dir)
    if tokenizer_file is None and (Path(src_dir) / TOKENIZER_JSON).is_file():
        tokenizer_file = Path(src_dir) / TOKENIZER_JSON  # an imported model keeps its tokenizer
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    hf_cfg = transformers.OPTConfig(**hf_config_kwargs(cfg))
    hf_cfg.architectures = ["OPTForCausalLM"]
    hf_cfg.save_pretrained(dst)
    save_file({f"model.decoder.{k}": v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_file is not None:
        tok = transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(tokenizer_file), bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )
        tok.save_pretrained(dst)
    return dst
