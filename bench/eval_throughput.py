"""CPU: scoring lm-eval requests with our adapter against lm-eval's own `hf` model, same model, same requests.

One random-weight OPT (preset `--preset`, fp32) is exported as a Hugging Face folder with a tokenizer; both sides
score the same loglikelihood requests of the bundled tasks (`pydocs_choice`: 4 endings per shared context, half a
paragraph against the other half; `pydocs_story`: 4 last sentences per shared context, a paragraph less its last
sentence, StoryCloze's shape; `pydocs_cloze`: one word, nothing shared), in the same process, with the same torch
threads, in alternating rounds:

- ours: `OPTHarnessLM` on the consolidated weights (shared contexts packed into one row, rows packed to a token
  budget of `--batch-tokens`);
- peer: `lm_eval.models.huggingface.HFLM(pretrained=<the export>, dtype=float32, batch_size=--peer-batch)`, which
  runs every (context, continuation) on its own, padded to the longest in its batch.

The work is the same: the figure is request tokens per second, sum over requests of len(context + continuation)
- 1 (what one request costs run alone), divided by wall time; the log-likelihoods of the two must agree (printed).
Each figure is the median over `--rounds` rounds. Prints a table, then, as its last line, one JSON object.

    python bench/eval_throughput.py                    # preset 125m shape, 2 threads
    python bench/eval_throughput.py --quick            # tiny, a few seconds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from opt.eval.harness import harness_lm_class  # noqa: E402
from opt.eval.tasks import TASKS_DIR  # noqa: E402
from opt.model import OPT, OPTConfig  # noqa: E402

BENCH = "eval_throughput"


def _docs(task: str, n: int) -> list[dict]:
    return [json.loads(line) for line in (TASKS_DIR / f"{task}.jsonl").read_text().splitlines()][:n]


def requests(n_choice: int, n_cloze: int, n_story: int = 0) -> list:
    from lm_eval.api.instance import Instance

    args = [(d["context"], e) for d in _docs("pydocs_choice", n_choice) for e in d["endings"]]
    args += [(d["context"], e) for d in _docs("pydocs_story", n_story) for e in d["endings"]]
    args += [(d["context"], d["target"]) for d in _docs("pydocs_cloze", n_cloze)]
    return [Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="125m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--choice", type=int, default=100, help="pydocs_choice questions (4 requests each)")
    p.add_argument("--cloze", type=int, default=100)
    p.add_argument("--story", type=int, default=100, help="pydocs_story items (4 requests each)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--peer-batch", type=int, default=16)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.choice, args.cloze, args.story, args.rounds = "debug", 8, 8, 8, 1
    torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer

    from opt.data.tokenizer import train_tokenizer
    from opt.model.checkpoint import save_consolidated
    from opt.model.hf import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        texts = [json.loads(line)["context"] for line in (TASKS_DIR / "pydocs_choice.jsonl").read_text().splitlines()]
        tok = train_tokenizer(texts * 3, vocab_size=4096)
        tok.save(f"{tmp}/tokenizer.json")
        cfg = OPTConfig.preset(args.preset, vocab_size=4096, max_seq_len=512)
        torch.manual_seed(0)
        model = OPT(cfg).eval()
        hf_dir = export_hf(
            save_consolidated(cfg, model.state_dict(), Path(tmp) / "c"), Path(tmp) / "hf", tokenizer_file=f"{tmp}/tokenizer.json"
        )
        ours = harness_lm_class()(model=model, tokenizer=Tokenizer.from_file(f"{tmp}/tokenizer.json"), batch_tokens=args.batch_tokens)
        peer = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=args.peer_batch)
        reqs = requests(args.choice, args.cloze, args.story)
        work = sum(len(ours._encode_pair(*r.args)[0]) + len(ours._encode_pair(*r.args)[1]) - 1 for r in reqs)
        times: dict[str, list[float]] = {"ours": [], "peer": []}
        results: dict[str, list] = {}
        for rnd in range(args.rounds):
            for name in ("ours", "peer") if rnd % 2 == 0 else ("peer", "ours"):
                lm = ours if name == "ours" else peer
                t = time.perf_counter()
                results[name] = lm.loglikelihood(reqs, disable_tqdm=True)
                times[name].append(time.perf_counter() - t)
    run_tokens = ours.tokens_scored // args.rounds  # tokens our packed rows ran through the model, one round
    diff = max(abs(a - b) for (a, _), (b, _) in zip(results["ours"], results["peer"], strict=True))
    out = {
        "bench": BENCH, "preset": args.preset, "threads": args.threads, "requests": len(reqs), "request_tokens": work,
        "ours_tokens_per_s": work / statistics.median(times["ours"]), "peer_tokens_per_s": work / statistics.median(times["peer"]),
        "max_abs_loglik_diff": diff, "greedy_equal": [g for _, g in results["ours"]] == [g for _, g in results["peer"]],
        "batch_tokens": args.batch_tokens, "peer_batch": args.peer_batch, "rounds": args.rounds,
        "tasks": {"pydocs_choice": args.choice, "pydocs_story": args.story, "pydocs_cloze": args.cloze},
    }  # fmt: skip
    out["ratio"] = out["ours_tokens_per_s"] / out["peer_tokens_per_s"]
    # what sharing contexts alone can give at equal cost per token run: request tokens / tokens run
    out["tokens_run"], out["sharing_bound"] = run_tokens, work / run_tokens
    out["per_token_ratio"] = out["ratio"] / out["sharing_bound"]  # ours against the peer per token actually run
    print(f"{'':<6}{'tokens/s':>12}  (preset {args.preset}, {len(reqs)} requests, {work:,} request tokens, {args.threads} threads)")
    print(f"{'ours':<6}{out['ours_tokens_per_s']:>12,.0f}\n{'peer':<6}{out['peer_tokens_per_s']:>12,.0f}")
    print(f"tokens run: ours {run_tokens:,} (sharing bound {out['sharing_bound']:.2f}x); per token run: {out['per_token_ratio']:.2f}x")
    print(f"ratio {out['ratio']:.2f}x; max |log-likelihood diff| {diff:.2e}; greedy flags equal: {out['greedy_equal']}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
