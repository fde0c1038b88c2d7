"""Consolidate a sharded training checkpoint into one `config.json` + `model.safetensors` directory."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from opt.model import OPT, OPTConfig
from opt.model.checkpoint import save_consolidated
from opt.train.checkpoint import CommittedCheckpoint, local_copy, read_trainer_state


def load_checkpoint_model(ckpt: CommittedCheckpoint, cache_dir: str | Path) -> OPT:
    """The model weights of a committed checkpoint in one process (DCP reshards N ranks onto 1)."""
    import torch.distributed.checkpoint as dcp

    trainer = read_trainer_state(ckpt)
    model = OPT(OPTConfig.from_dict(trainer["model"]))
    tp = trainer.get("tensor_parallel", 1)
    full = model.state_dict()
    flat = trainer.get("fsdp") == "fairscale"  # its checkpoints hold flat tensors: load into flat views of the model's
    if tp == 1:
        state = {"model": {k: v.view(-1) for k, v in full.items()} if flat else full}
    else:
        from opt.train.tensor_parallel import split_dim

        # tp rank r's shards are stored under "tp<r>" (see Trainer.state_dict): load each, then join them
        def local(key: str, t: torch.Tensor) -> torch.Tensor:
            dim = split_dim(key)
            return torch.empty_like(t) if dim is None else torch.empty_like(t.chunk(tp, dim=dim)[0])

        state = {f"tp{r}": {"model": {k: local(k, v) for k, v in full.items()}} for r in range(tp)}
    with warnings.catch_warnings():
        # loading without a process group is exactly the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(local_copy(ckpt, cache_dir)))
    if tp > 1:
        parts = [state[f"tp{r}"]["model"] for r in range(tp)]
        state = {"model": {k: parts[0][k] if (d := split_dim(k)) is None else torch.cat([p[k] for p in parts], dim=d) for k in full}}
    elif flat:
        state = {"model": full}  # loaded through its flat views
    model.load_state_dict(state["model"])
    return model.eval()


def export_consolidated(ckpt: CommittedCheckpoint, out_dir: str | Path, cache_dir: str | Path) -> Path:
    model = load_checkpoint_model(ckpt, cache_dir)
    return save_consolidated(model.cfg, model.state_dict(), out_dir)
