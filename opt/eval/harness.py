"""Our checkpoints in lm-evaluation-harness: an `lm_eval.api.model.LM` (registered as `opt-platform`).

It scores exactly what lm-eval's own `hf` model scores (the same tokenisation of each (context, continuation)
pair, trailing spaces moved to the continuation, the tokenizer's own special tokens, the BOS/EOS token as the
context of an empty one, the same rolling windows), so the two agree to fp32 roundoff; it differs in how:
requests that share a context (the choices of one multiple-choice question) run as ONE packed row,

    [ context | choice 1 minus its last token | choice 2 minus its last token | ... ]

with per-token positions and an attention mask by which each choice sees the context and itself only. The
context is encoded once instead of once per choice, and rows are packed to a token budget instead of padded
to the longest request in a batch.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from opt.model import OPT

log = logging.getLogger(__name__)

EOS_ID = 2  # OPT's </s>: Hugging Face's OPT checkpoints also use it as BOS


@dataclass(frozen=True)
class _Group:
    """Requests (by index) that share one context: scored together in one packed row."""

    context: tuple[int, ...]
    members: list[tuple[int, tuple[int, ...]]]  # (request index, continuation tokens)

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(c) - 1 for _, c in self.members)


def _make_lm_class() -> type:
    """The LM subclass, built on first use: lm_eval (and its datasets import) is heavy, and `opt` imports stay light."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model

    @register_model("opt-platform")
    class OPTHarnessLM(TemplateLM):  # type: ignore[misc]
        """lm-eval model over one of our OPT models and its tokenizer (a `tokenizers.Tokenizer`)."""

        def __init__(self, model: OPT | None = None, tokenizer: Any = None, checkpoint: str | None = None, batch_tokens: int = 2048,
                     device: str = "cpu", cache_dir: str | None = None) -> None:  # fmt: skip
            super().__init__()
            if checkpoint is not None:
                model, tokenizer = load_for_eval(checkpoint, Path(cache_dir or ".opt/cache/eval"))
            if model is None or tokenizer is None:
                raise ValueError("opt-platform needs a model and its tokenizer, or checkpoint=URI_OR_DIR")
            self.model = model.to(device).eval()
            self.tokenizer = tokenizer
            self.batch_tokens = max(int(batch_tokens), model.cfg.max_seq_len)
            self._device = torch.device(device)
            self.tokens_scored = 0  # input tokens run through the model (the benchmark's figure)

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> OPTHarnessLM:
            from lm_eval.utils import simple_parse_args_string

            args = simple_parse_args_string(arg_string)
            args.update({k: v for k, v in (additional_config or {}).items() if k in ("device",) and v is not None})
            return cls(**args)

        # --- what TemplateLM needs --------------------------------------------------------------------

        @property
        def eot_token_id(self) -> int:
            return EOS_ID

        @property
        def prefix_token_id(self) -> int:
            return EOS_ID

        @property
        def max_length(self) -> int:
            return int(self.model.cfg.max_seq_len)

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            # as lm-eval's hf model: the tokenizer's own special tokens unless told, none if the text starts with BOS
            if add_special_tokens is None:
                add_special_tokens = not string.startswith(self.tokenizer.decode([self.prefix_token_id]) or "\0")
            return list(self.tokenizer.encode(string, add_special_tokens=add_special_tokens).ids)

        def tok_decode(self, tokens: Sequence[int]) -> str:
            return str(self.tokenizer.decode(list(tokens)))

        def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
            """[(key, context tokens, continuation tokens)] -> [(log-likelihood, greedy)] in request order."""
            pairs = [(tuple(ctx), tuple(cont)) for _, ctx, cont in requests]
            out = score_pairs(self.model, pairs, self.max_length, self.batch_tokens, self._device)
            self.tokens_scored += out.tokens
            for (key, _, _), result in zip(requests, out.results, strict=True):
                if key is not None and hasattr(self, "cache_hook"):
                    self.cache_hook.add_partial("loglikelihood", key, result)
            return out.results

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            from lm_eval import utils

            totals = []
            for (string,) in (r.args for r in requests):
                windows = [
                    (None, ctx, cont)
                    for ctx, cont in map(
                        utils.make_disjoint_window,
                        utils.get_rolling_token_windows(
                            token_list=self.tok_encode(string),
                            prefix_token=self.prefix_token_id,
                            max_seq_len=self.max_length,
                            context_len=1,
                        ),  # fmt: skip
                    )
                ]
                totals.append(sum(ll for ll, _ in self._loglikelihood_tokens(windows)))
            return totals

        @torch.no_grad()
        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            """Greedy decoding until a stop string or `max_gen_toks` (no sampling: reproducible)."""
            outputs = []
            for context, gen_kwargs in (r.args for r in requests):
                until = gen_kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(gen_kwargs.get("max_gen_toks", 256))
                tokens = self.tok_encode(context)[-(self.max_length - 1) :]
                start, text = len(tokens), ""
                for _ in range(max_new):
                    window = torch.tensor([tokens[-self.max_length :]], device=self._device)
                    nxt = int(self.model(window)[0, -1].argmax())
                    if nxt == self.eot_token_id:
                        break
                    tokens.append(nxt)
                    text = self.tok_decode(tokens[start:])
                    if any(stop in text for stop in until):
                        break
                for stop in until:
                    text = text.split(stop)[0]
                outputs.append(text)
            return outputs

    return OPTHarnessLM


_LM: type | None = None


def harness_lm_class() -> type:
    """`OPTHarnessLM`, registered with lm-eval as `opt-platform` (built and registered once)."""
    global _LM
    if _LM is None:
        _LM = _make_lm_class()
    return _LM


@dataclass
class Scored:
    results: list[tuple[float, bool]]
    tokens: int


def _groups(pairs: list[tuple[tuple[int, ...], tuple[int, ...]]], max_len: int) -> tuple[list[_Group], list[int]]:
    """Requests grouped by shared context (when the packed row fits), and the indices too long for any row."""
    by_ctx: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = defaultdict(list)
    alone: list[int] = []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise ValueError("lm-eval sent a request with an empty continuation")
        if len(ctx) + len(cont) - 1 > max_len:
            alone.append(i)  # truncated from the left, as lm-eval's hf model does
        else:
            by_ctx[ctx].append((i, cont))
    groups: list[_Group] = []
    for ctx, members in by_ctx.items():
        current: list[tuple[int, tuple[int, ...]]] = []
        for m in members:  # split a context's continuations over rows when they do not fit in one
            if current and len(ctx) + sum(len(c) - 1 for _, c in current) + len(m[1]) - 1 > max_len:
                groups.append(_Group(ctx, current))
                current = []
            current.append(m)
        groups.append(_Group(ctx, current))
    return groups, alone


def _row(group: _Group) -> tuple[list[int], list[int], list[int], list[tuple[int, list[int], tuple[int, ...]]]]:
    """One packed row: tokens, positions, the segment each token belongs to (0 = context), and for every member
    the row indices whose logits predict its continuation tokens."""
    tokens, positions, segment = list(group.context), list(range(len(group.context))), [0] * len(group.context)
    targets = []
    for s, (i, cont) in enumerate(group.members, start=1):
        first = len(tokens)
        body = list(cont[:-1])
        tokens += body
        positions += range(len(group.context), len(group.context) + len(body))
        segment += [s] * len(body)
        # cont[0] is predicted by the context's last token, cont[j] by the row index of cont[j-1]
        targets.append((i, [len(group.context) - 1] + list(range(first, first + len(body))), cont))
    return tokens, positions, segment, targets


@torch.no_grad()
def score_pairs(model: OPT, pairs: list[tuple[tuple[int, ...], tuple[int, ...]]], max_len: int, batch_tokens: int,
                device: torch.device) -> Scored:  # fmt: skip
    """Sum of log-probabilities of each continuation given its context, and whether it is the greedy one."""
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    groups, alone = _groups(pairs, max_len)
    for i in alone:  # (context + continuation)[-(max_len + 1):][:-1], as lm-eval's hf model
        ctx, cont = pairs[i]
        whole = (ctx + cont)[-(max_len + 1) :]
        groups.append(_Group(tuple(whole[: len(whole) - len(cont)]), [(i, cont)]))
    rows = sorted((_row(g) for g in groups), key=lambda r: -len(r[0]))  # longest first: batches of like lengths
    scored = 0
    batch: list[Any] = []
    for row in rows + [None]:  # type: ignore[list-item]
        if row is not None and (not batch or (len(batch) + 1) * len(batch[0][0]) <= batch_tokens):
            batch.append(row)
            continue
        scored += _run(model, batch, results, device)
        batch = [row] if row is not None else []
    return Scored([r if r is not None else (float("nan"), False) for r in results], scored)


def _run(model: OPT, batch: list[Any], results: list[Any], device: torch.device) -> int:
    if not batch:
        return 0
    T = len(batch[0][0])
    idx = torch.full((len(batch), T), EOS_ID, dtype=torch.long)
    pos = torch.zeros((len(batch), T), dtype=torch.long)
    mask = torch.zeros((len(batch), 1, T, T), dtype=torch.bool)
    for b, (tokens, positions, segment, _) in enumerate(batch):
        n = len(tokens)
        idx[b, :n] = torch.tensor(tokens)
        pos[b, :n] = torch.tensor(positions)
        seg = torch.tensor(segment)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        # a token sees the context and its own segment, causally; padding sees only itself (no empty rows: NaN)
        mask[b, 0, :n, :n] = causal & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))
        mask[b, 0, range(n, T), range(n, T)] = True
    h = model.hidden(idx.to(device), pos.to(device), mask.to(device))
    # the output projection and softmax only where a continuation token is predicted, not at every position
    where = [(b, at, i, cont) for b, (_, _, _, targets) in enumerate(batch) for i, at, cont in targets]
    rows_b = torch.tensor([b for b, at, _, _ in where for _ in at])
    rows_t = torch.tensor([t for _, at, _, _ in where for t in at])
    logprobs = F.log_softmax(F.linear(h[rows_b.to(device), rows_t.to(device)], model.embed_tokens.weight).float(), dim=-1).cpu()
    start = 0
    for _, at, i, cont in where:
        rows = logprobs[start : start + len(at)]  # (len(cont), vocab)
        start += len(at)
        want = torch.tensor(cont)
        results[i] = (float(rows.gather(1, want[:, None]).sum()), bool((rows.argmax(-1) == want).all()))
    return sum(len(r[0]) for r in batch)


def load_for_eval(checkpoint: str, cache_dir: Path) -> tuple[OPT, Any]:
    """A model and its tokenizer from a consolidated export (a folder with config.json, model.safetensors and a
    tokenizer.json beside it or in `hf/`) or from a committed training checkpoint (the dataset's tokenizer)."""
    from tokenizers import Tokenizer

    from opt.model.checkpoint import load_model

    path = Path(checkpoint)
    if path.is_dir() and (path / "config.json").exists():
        for candidate in (path / "tokenizer.json", path.parent / "hf" / "tokenizer.json", path / "hf" / "tokenizer.json"):
            if candidate.exists():
                return load_model(path), Tokenizer.from_file(str(candidate))
        raise ValueError(f"{checkpoint} has no tokenizer.json beside its weights; import it with `optctl model import-hf`, which keeps it")
    from opt import storage
    from opt.data.manifest import load_manifest
    from opt.data.tokenizer import TOKENIZER_FILE
    from opt.train.checkpoint import read_trainer_state, verify
    from opt.train.export import load_checkpoint_model

    try:
        ckpt = verify(checkpoint)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{checkpoint} is neither a consolidated export nor a committed checkpoint: {e}") from None
    store = checkpoint.rstrip("/").rsplit("/runs/", 1)[0]  # <store>/runs/<run>/step-<N>
    manifest = load_manifest(storage.join(store, "datasets", read_trainer_state(ckpt)["dataset_id"]))
    tok = storage.local_path(manifest.file_uri(f"tokenizer/{TOKENIZER_FILE}"), cache_dir)
    return load_checkpoint_model(ckpt, cache_dir), Tokenizer.from_file(str(tok))
