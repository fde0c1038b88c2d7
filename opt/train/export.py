"""Consolidate a sharded training checkpoint into one `config.json` + `model.safetensors` directory."""

from __future__ import annotations

import warnings
from pathlib import Path

from opt.model import OPT, OPTConfig
from opt.model.checkpoint import save_consolidated
from opt.train.checkpoint import CommittedCheckpoint, local_copy, read_trainer_state


def load_checkpoint_model(ckpt: CommittedCheckpoint, cache_dir: str | Path) -> OPT:
    """The model weights of a committed checkpoint in one process (DCP reshards N ranks onto 1)."""
    import torch.distributed.checkpoint as dcp

    model = OPT(OPTConfig.from_dict(read_trainer_state(ckpt)["model"]))
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        # loading without a process group is exactly the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(local_copy(ckpt, cache_dir)))
    model.load_state_dict(state["model"])
    return model.eval()


def export_consolidated(ckpt: CommittedCheckpoint, out_dir: str | Path, cache_dir: str | Path) -> Path:
    model = load_checkpoint_model(ckpt, cache_dir)
    return save_consolidated(model.cfg, model.state_dict(), out_dir)
