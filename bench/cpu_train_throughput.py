"""CPU: one training step of our pure-torch OPT against Hugging Face's OPTForCausalLM, same process.

Both models get the same shape (our preset mapped through `opt.model.hf.hf_config_kwargs`), the same
initial weights (ours are copied into the peer), fp32, the same dropout, batch, sequence, threads,
learning rate and AdamW hyper-parameters. A step is what our trainer does per micro-batch:
forward + loss + backward + clip_grad_norm_(1.0) + optimizer.step + zero_grad(set_to_none=True).

- ours: `OPT.loss(x, y)` and the trainer's AdamW (`opt.train.optim.build_optimizer`: decay groups),
  so the bench follows whatever the trainer uses;
- peer: `model(input_ids=x, labels=x).loss` as users run it (HF shifts the labels itself) and
  `torch.optim.AdamW(model.parameters(), ...)` with torch's default implementation;
- peer_fused: the same peer (its own copy of the same weights) with `torch.optim.AdamW(..., fused=True)`, the
  optimizer implementation ours uses, so `ratio_vs_peer_fused` is the model's own speed and `ratio` (against
  the default peer) adds the platform's optimizer choice.

`y` is `x` shifted left with -100 in the last column: both models predict the same batch*(seq-1)
next tokens from the same batch*seq positions, and tokens/s counts batch*seq for both.

After warm-up, R rounds alternate ours/peer (the first to run alternates too), K steps each; each
figure is the median over rounds of a round's median step time. Prints a table, then, as its last
line, one JSON object. `--quick` runs a tiny shape in a few seconds (smoke test).

Other jobs on the machine distort the figures (with 2 threads on 2 cores a descheduled OpenMP thread
stalls the other): each round reports the Linux CPU pressure (share of time some other task waited for
a CPU); trust rounds near 0%. Minor page faults per step are reported too: on glibc, large tensors freed
every step are mmapped and faulted in again, a large share of a CPU step here, and both models share the
process's heap.

    python bench/cpu_train_throughput.py                       # 125m, seq 128, batch 4
    python bench/cpu_train_throughput.py --dropout 0 --threads 1
    python bench/cpu_train_throughput.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from opt.config import TrainConfig  # noqa: E402
from opt.model import OPT, OPTConfig  # noqa: E402
from opt.model.hf import hf_config_kwargs  # noqa: E402
from opt.model.plan import count_params  # noqa: E402
from opt.train.optim import build_optimizer  # noqa: E402

BENCH = "cpu_train_throughput"
LR = 6e-4  # OPT-125M's peak learning rate; constant here


def build_ours(cfg: OPTConfig) -> OPT:
    torch.manual_seed(0)
    return OPT(cfg)


def build_peer(cfg: OPTConfig, ours: torch.nn.Module) -> torch.nn.Module:
    """HF OPTForCausalLM of the same shape, holding a copy of `ours`' initial weights."""
    import transformers

    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**hf_config_kwargs(cfg), attn_implementation="sdpa"))
    hf.model.decoder.load_state_dict(ours.state_dict(), strict=True)  # our names are HF's minus `model.decoder.`
    if hf.lm_head.weight.data_ptr() != hf.model.decoder.embed_tokens.weight.data_ptr():
        raise RuntimeError("peer's lm_head is not tied to its token embedding")
    return hf


def ours_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return build_optimizer("adamw", model, TrainConfig(), LR)


def peer_optimizer(model: torch.nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    t = TrainConfig()
    kw = {"fused": True} if fused else {}
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay, **kw)


def shifted_targets(x: torch.Tensor) -> torch.Tensor:
    """HF's internal label shift, explicit: position t predicts x[t+1]; the last position predicts nothing."""
    return torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)


def ours_loss(model: OPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model.loss(x, y)


def peer_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, labels=x).loss


def make_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, clip: float) -> Callable:
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def parity(ours: OPT, peer: torch.nn.Module, x: torch.Tensor) -> dict:
    """Same weights, no dropout: logits and loss of the two models on one batch."""
    ours.eval()
    peer.eval()
    with torch.no_grad():
        out = peer(input_ids=x, labels=x)
        diff = (out.logits - ours(x)).abs().max().item()
    # with autograd on, as in training (the loss may take another path than under no_grad)
    loss_diff = abs(out.loss.item() - ours.loss(x, shifted_targets(x)).item())
    ours.train()
    peer.train()
    # the scales beside the differences, so a reader can judge them against fp32 roundoff
    return dict(max_abs_logit_diff=diff, max_abs_logit=out.logits.abs().max().item(), loss_abs_diff=loss_diff, loss=out.loss.item())


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _cpu_stall_us() -> int:
    """Linux PSI: microseconds some runnable task waited for a CPU (0 where /proc/pressure is missing)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return 0


def run_rounds(steps: dict[str, Callable], batches: list, warmup: int, rounds: int, k: int, log: Callable = print) -> dict:
    """Warm-up, then `rounds` rounds of `k` steps per entry, alternating the order; per-round median step times."""
    names = list(steps)
    for name in names:
        for i in range(warmup):
            torch.manual_seed(i)  # every entry sees the same batches and dropout masks
            steps[name](*batches[i % len(batches)])
    per_round: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    pressure: list[float] = []  # per round: CPU-stall time of other tasks / wall time (contention from other jobs)
    losses: dict[str, float] = {}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        stall0, wall0 = _cpu_stall_us(), time.perf_counter()
        for name in order:
            times = []
            for i in range(k):
                torch.manual_seed(1000 + r * k + i)  # same dropout masks and batch for every entry
                x, y = batches[(r * k + i) % len(batches)]
                f0, t0 = _minor_faults(), time.perf_counter()
                losses[name] = steps[name](x, y)
                times.append(time.perf_counter() - t0)
                faults[name].append(_minor_faults() - f0)
            per_round[name].append(statistics.median(times))
        pressure.append((_cpu_stall_us() - stall0) / 1e6 / (time.perf_counter() - wall0))
        log(
            f"  round {r + 1}: "
            + "  ".join(f"{name} {per_round[name][-1]:.3f}s" for name in names)
            + f"  (cpu pressure {pressure[-1]:.0%})",
            flush=True,
        )
    return dict(
        step_s={name: statistics.median(v) for name, v in per_round.items()}, per_round_s=per_round, last_loss=losses,
        faults_per_step={name: int(statistics.median(v)) for name, v in faults.items()}, cpu_pressure=pressure,
    )  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="125m", help="OPT preset (default 125m)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch (default 4)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    p.add_argument("--dropout", type=float, default=0.1, help="residual dropout for both models (OPT trains with 0.1)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per model")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    p.add_argument("--steps", type=int, default=3, help="steps per model per round")
    p.add_argument("--quick", action="store_true", help="tiny shape, few steps: a smoke run of a few seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.seq, args.batch, args.warmup, args.rounds, args.steps = "debug", 64, 2, 1, 2, 2
    return args


def main(argv: list[str] | None = None) -> dict:
    import transformers

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = OPTConfig.preset(args.size, dropout=args.dropout)
    if args.seq > cfg.max_seq_len:
        raise SystemExit(f"--seq {args.seq} exceeds the {args.size} preset's max_seq_len {cfg.max_seq_len}")
    ours = build_ours(cfg)
    peer = build_peer(cfg, ours)
    peer_fused = build_peer(cfg, ours)
    g = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(4):
        x = torch.randint(3, cfg.vocab_size, (args.batch, args.seq), generator=g)  # no pad (1) or bos/eos
        batches.append((x, shifted_targets(x)))
    check = parity(ours, peer, batches[0][0])
    ours_opt, peer_opt, fused_opt = ours_optimizer(ours), peer_optimizer(peer), peer_optimizer(peer_fused, fused=True)
    steps = {
        "ours": make_step(ours, ours_opt, ours_loss, TrainConfig().grad_clip),
        "peer": make_step(peer, peer_opt, peer_loss, TrainConfig().grad_clip),
        "peer_fused": make_step(peer_fused, fused_opt, peer_loss, TrainConfig().grad_clip),
    }
    impl = {name: "fused" if o.defaults.get("fused") else "foreach" if o.defaults.get("foreach") else "default"
            for name, o in (("ours", ours_opt), ("peer", peer_opt), ("peer_fused", fused_opt))}  # fmt: skip
    tokens = args.batch * args.seq
    print(f"{BENCH}: OPT-{args.size} ({count_params(cfg) / 1e6:.1f}M params) seq {args.seq} batch {args.batch} threads {args.threads} "
          f"dropout {args.dropout} fp32 | torch {torch.__version__} transformers {transformers.__version__}")  # fmt: skip
    print(f"parity (same weights, eval): max |logits diff| {check['max_abs_logit_diff']:.2e}, |loss diff| {check['loss_abs_diff']:.2e}")
    print(f"AdamW: ours {impl['ours']} (the trainer's build_optimizer), peer {impl['peer']}, peer_fused {impl['peer_fused']}")
    res = run_rounds(steps, batches, args.warmup, args.rounds, args.steps)
    tps = {name: tokens / s for name, s in res["step_s"].items()}
    ratio, ratio_fused = tps["ours"] / tps["peer"], tps["ours"] / tps["peer_fused"]
    print(f"{'model':<10} {'step s (median)':>16} {'tokens/s':>10}  per-round tokens/s")
    for name in steps:
        rounds = " ".join(f"{tokens / s:.0f}" for s in res["per_round_s"][name])
        print(f"{name:<10} {res['step_s'][name]:>16.3f} {tps[name]:>10.0f}  {rounds}")
    print(f"ratio ours/peer: {ratio:.3f}x (target >= 1.2x); ours/peer_fused (the same optimizer): {ratio_fused:.3f}x")
    faults = ", ".join(f"{name} {n}" for name, n in res["faults_per_step"].items())
    pressure = statistics.median(res["cpu_pressure"])
    print(f"minor page faults per step: {faults}; cpu pressure from other jobs (median over rounds) {pressure:.0%}")
    out = dict(
        bench=BENCH, shape=args.size, params=count_params(cfg), seq=args.seq, batch=args.batch, threads=args.threads,
        dropout=args.dropout, dtype="float32", torch=torch.__version__, transformers=transformers.__version__,
        warmup=args.warmup, rounds=args.rounds, steps_per_round=args.steps,
        ours_tokens_per_s=round(tps["ours"], 1), peer_tokens_per_s=round(tps["peer"], 1), ratio=round(ratio, 4),
        peer_fused_tokens_per_s=round(tps["peer_fused"], 1), ratio_vs_peer_fused=round(ratio_fused, 4),
        ours_step_s=round(res["step_s"]["ours"], 4), peer_step_s=round(res["step_s"]["peer"], 4),
        peer_fused_step_s=round(res["step_s"]["peer_fused"], 4),
        ours_round_tokens_per_s=[round(tokens / s, 1) for s in res["per_round_s"]["ours"]],
        peer_round_tokens_per_s=[round(tokens / s, 1) for s in res["per_round_s"]["peer"]],
        peer_fused_round_tokens_per_s=[round(tokens / s, 1) for s in res["per_round_s"]["peer_fused"]],
        last_loss={k: round(v, 4) for k, v in res["last_loss"].items()}, **check,
        adamw=impl, minor_faults_per_step=res["faults_per_step"],
        cpu_pressure_per_round=[round(p, 3) for p in res["cpu_pressure"]],
    )  # fmt: skip
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
