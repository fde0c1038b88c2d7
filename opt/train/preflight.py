"""Checks before Ray starts: what would otherwise fail in every worker, be retried as a hardware failure, or hang.

- resuming: the run's newest checkpoint was written by the same model architecture, tensor-parallel degree and
  FSDP implementation as the config asks for (a changed `model.preset` used to cost four failed attempts, the
  only node excluded and a logbook that said a host was lost);
- the Ray address answers within `train.ray_connect_timeout_s` (Ray itself retries for minutes, printing only
  its C++ warnings).
Each refusal is one line naming the setting, both values, and the fix.
"""

from __future__ import annotations

import socket
from typing import Any

from opt.errors import OptError

# OPTConfig fields that shape the parameters: a checkpoint cannot be loaded into a model that differs in one
ARCHITECTURE = ("n_layer", "n_head", "d_model", "d_ffn", "vocab_size", "max_seq_len", "word_embed_dim", "pre_ln", "pad_token_id")


class PreflightError(OptError):
    """The run cannot start or resume as configured; nothing was started."""


def check_resume(cfg: Any, model_cfg: Any, saved: dict[str, Any], ckpt_uri: str) -> None:
    """Refuse to resume `ckpt_uri` (its trainer state `saved`) with another architecture, TP degree or FSDP."""
    t, run = cfg.train, cfg.train.run
    fix = "resume with the settings it was trained with, or start a new run (--run NAME / train.run=NAME)"
    was = saved.get("model") or {}
    now = model_cfg.to_dict()
    changed = [f"{k} {was[k]} -> {now.get(k)}" for k in ARCHITECTURE if k in was and was[k] != now.get(k)]
    if changed:
        raise PreflightError(
            f"run {run!r}: its checkpoint {ckpt_uri} has another model architecture than model.preset={cfg.model.preset!r} "
            f"(+ model.overrides) gives ({', '.join(changed)}); {fix}"
        )
    if (tp := saved.get("tensor_parallel", 1)) != t.tensor_parallel:
        raise PreflightError(
            f"run {run!r} was trained with train.tensor_parallel={tp}, not {t.tensor_parallel}; resume it with "
            f"train.tensor_parallel={tp} (train.num_workers may change), or start a new run (--run NAME)"
        )
    if (fsdp := saved.get("fsdp")) is not None and fsdp != t.fsdp:
        raise PreflightError(
            f"run {run!r} was trained with train.fsdp={fsdp!r}, not {t.fsdp!r}: their checkpoints differ; "
            f"resume it with train.fsdp={fsdp}, or start a new run (--run NAME)"
        )


def check_ray_address(address: str | None, timeout_s: float) -> None:
    """A `host:port` (or `ray://host:port`) Ray address must accept a connection within `timeout_s`."""
    if not address or address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://").split("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise PreflightError(f"train.ray_address={address!r} is not host:port (e.g. 10.0.0.5:6379 or ray://head:10001)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise PreflightError(
            f"the Ray cluster at train.ray_address={address} does not answer ({why} within {timeout_s:g} s); "
            "start it (`ray start --head`), fix the address, or leave train.ray_address unset for a local instance"
        ) from None
