"""Checks before Ray starts: a resume with another architecture, TP degree or FSDP, and a Ray address that is silent."""

from __future__ import annotations

import socket
import time

import pytest

from opt.config import load_config
from opt.model import OPTConfig
from opt.train.preflight import PreflightError, check_ray_address, check_resume


def saved(**changes: object) -> dict:
    model = OPTConfig.preset("debug", vocab_size=2048, max_seq_len=128).to_dict()
    return {"model": model, "tensor_parallel": 1, "fsdp": "fsdp2", **changes}


def test_the_same_settings_resume_and_dropout_may_change() -> None:
    cfg = load_config(None, ["model.overrides={dropout: 0.0}"])
    check_resume(cfg, cfg.model.build(2048, 128), saved(), "/runs/r/step-4")


def test_another_preset_is_refused_naming_what_differs_and_the_fix() -> None:
    cfg = load_config(None, ["model.preset=125m", "train.run=r"])
    with pytest.raises(PreflightError) as e:
        check_resume(cfg, cfg.model.build(2048, 128), saved(), "/runs/r/step-4")
    msg = str(e.value)
    assert "run 'r': its checkpoint /runs/r/step-4 has another model architecture than model.preset='125m'" in msg
    assert "n_layer 2 -> 12" in msg and "d_model" in msg and "start a new run" in msg and "\n" not in msg


def test_another_tensor_parallel_degree_or_fsdp_is_refused() -> None:
    cfg = load_config(None, [])
    with pytest.raises(PreflightError, match=r"train.tensor_parallel=2, not 1; resume it with train.tensor_parallel=2"):
        check_resume(cfg, cfg.model.build(2048, 128), saved(tensor_parallel=2), "/c")
    with pytest.raises(PreflightError, match=r"train.fsdp='fairscale', not 'fsdp2'"):
        check_resume(cfg, cfg.model.build(2048, 128), saved(fsdp="fairscale"), "/c")


def test_a_silent_ray_address_is_refused_within_the_timeout() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    t = time.monotonic()
    with pytest.raises(PreflightError, match=rf"train.ray_address=127.0.0.1:{port} does not answer"):
        check_ray_address(f"127.0.0.1:{port}", 2.0)
    assert time.monotonic() - t < 5
    with pytest.raises(PreflightError, match="is not host:port"):
        check_ray_address("head-node", 1.0)
    check_ray_address(None, 1.0)  # a local instance: nothing to check
    check_ray_address("auto", 1.0)


def test_a_listening_ray_address_passes() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        check_ray_address(f"ray://127.0.0.1:{server.getsockname()[1]}", 2.0)
