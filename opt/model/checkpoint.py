"""Consolidated (single-file) model checkpoints: `config.json` plus `model.safetensors`.

This is the format `optctl model import-hf` writes and `export-hf` reads, and what registration
uploads. Sharded training checkpoints live in `opt.train.checkpoint`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from opt.errors import OptError
from opt.model.config import OPTConfig
from opt.model.model import OPT

FORMAT = "opt-consolidated/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointFormatError(OptError, ValueError):
    """A directory that is not a readable consolidated OPT checkpoint."""


def save_consolidated(cfg: OPTConfig, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Write `state_dict` (our parameter names) and `cfg` to `out_dir`; returns the directory."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "opt_format": FORMAT})
    (out / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "model": cfg.to_dict()}, indent=2) + "\n")
    return out


def load_consolidated(src_dir: str | Path, map_location: str = "cpu") -> tuple[OPTConfig, dict[str, torch.Tensor]]:
    """Read a consolidated checkpoint; raises CheckpointFormatError naming what is wrong."""
    from safetensors.torch import load_file

    src = Path(src_dir)
    cfg_path, weights_path = src / CONFIG_FILE, src / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights_path.is_file():
        raise CheckpointFormatError(
            f"{src} is not a consolidated OPT checkpoint: expected {CONFIG_FILE} and {WEIGHTS_FILE} "
            "(import a Hugging Face model with `optctl model import-hf`)"
        )
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointFormatError(f"{cfg_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    cfg = OPTConfig.from_dict(meta["model"])
    return cfg, load_file(str(weights_path), device=map_location)


def load_model(src_dir: str | Path) -> OPT:
    """An OPT module (eval mode) with the weights of a consolidated checkpoint."""
    cfg, state = load_consolidated(src_dir)
    model = OPT(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()
