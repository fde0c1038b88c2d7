"""GPU: our pure-torch OPT against Hugging Face's OPTForCausalLM, same shape, batch and step, one process.

Kinds: `hf` (the peer, bf16 autocast), `ours` (bf16 autocast), and ours as the trainer shards it on one
GPU: `fsdp2` (`fully_shard` per layer and root, bf16 MixedPrecisionPolicy) and `fairscale` (fairscale's
FSDP, bf16 compute, fp32 reduce-scatter). Also checks fp32 logits parity on the GPU. Prints one JSON
line per measurement and a final summary line with the ratios. Run on a CUDA machine:
`python bench/gpu_model_throughput.py [--kinds hf,ours,fsdp2,fairscale] [--sizes 125m,1.3b]`.
torch and transformers are needed; fairscale for the `fairscale` kind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from opt.model import OPT, OPTConfig  # noqa: E402
from opt.model.hf import hf_config_kwargs  # noqa: E402
from opt.model.plan import count_params, train_flops_per_token  # noqa: E402

PEAK = 989e12  # H100/H200 SXM dense bf16


def build(kind: str, cfg: OPTConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind in ("fsdp2", "fairscale"):
        _one_rank_group()
        model = OPT(cfg).cuda()
        if kind == "fsdp2":
            from opt.train.loop import shard_model

            return shard_model(model, 1, "cuda", "bf16")
        from opt.train.fairscale_fsdp import wrap

        return wrap(model, "bf16")
    with torch.device("cuda"):
        if kind == "ours":
            return OPT(cfg)
        import transformers

        hf_cfg = transformers.OPTConfig(**hf_config_kwargs(cfg), attn_implementation="sdpa")
        return transformers.OPTForCausalLM(hf_cfg)


def _one_rank_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl", rank=0, world_size=1)


def throughput(kind: str, size: str, batch: int, seq: int = 2048, steps: int = 8, warmup: int = 3) -> dict:
    cfg = OPTConfig.preset(size, dropout=0.0)
    model = build(kind, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")

    def step() -> torch.Tensor:
        if kind in ("fsdp2", "fairscale"):  # the wrapper's mixed precision, as the trainer runs it
            loss = model(x[:, :-1], x[:, 1:])
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.loss(x[:, :-1], x[:, 1:]) if kind == "ours" else model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        if kind == "fairscale":
            model.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    tok_s = batch * (seq - 1) / dt
    out = dict(kind=kind, size=size, batch=batch, seq=seq - 1, params=count_params(cfg), step_s=round(dt, 4),
               tokens_per_s=round(tok_s), mfu=round(tok_s * train_flops_per_token(cfg, seq - 1) / PEAK, 4),
               max_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1), loss=round(float(loss), 4))  # fmt: skip
    return out


def parity(size: str = "125m") -> dict:
    import transformers

    cfg = OPTConfig.preset(size, dropout=0.0)
    hf = build("hf", cfg).float().eval()
    ours = OPT(cfg).cuda().eval()
    state = {k.removeprefix("model.decoder."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours.load_state_dict(state)
    x = torch.randint(4, cfg.vocab_size, (2, 256), device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        diff = (hf(input_ids=x).logits - ours(x)).abs().max().item()
    return dict(check="fp32 logits parity on GPU", size=size, max_abs_diff=diff, transformers=transformers.__version__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default="hf,ours,fsdp2,fairscale")
    ap.add_argument("--sizes", default="125m,1.3b")
    args = ap.parse_args()
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    print(json.dumps(parity()), flush=True)
    results = {}
    batches = {"125m": 16, "1.3b": 8}
    for size in args.sizes.split(","):
        batch = batches.get(size, 8)
        for kind in args.kinds.split(","):
            try:
                results[(kind, size)] = r = throughput(kind, size, batch)
                print(json.dumps(r), flush=True)
            except Exception as e:  # one failure must not hide the others
                print(json.dumps(dict(kind=kind, size=size, error=repr(e)[:300])), flush=True)
            torch.cuda.empty_cache()  # the model and optimizer died with throughput()'s frame
            torch.cuda.reset_peak_memory_stats()
    ratios = {
        f"{size}_{kind}_over_hf": round(results[(kind, size)]["tokens_per_s"] / results[("hf", size)]["tokens_per_s"], 3)
        for size in batches
        for kind in ("ours", "fsdp2", "fairscale")
        if (kind, size) in results and ("hf", size) in results
    }
    summary = {f"{k}_{s}_mfu": r["mfu"] for (k, s), r in results.items()} | ratios
    print(json.dumps({"summary": summary, "device": torch.cuda.get_device_name()}), flush=True)


if __name__ == "__main__":
    main()
