"""Our lm-eval adapter against lm-eval's own `hf` model on the same exported weights: the same log-likelihoods to
fp32 roundoff and identical accuracies, with shared contexts packed into one row."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from opt.eval.harness import harness_lm_class, score_pairs
from opt.eval.tasks import TASKS_DIR
from opt.model import OPT, OPTConfig
from tests import numerics


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):  # type: ignore[no-untyped-def]
    from opt.data.tokenizer import train_tokenizer

    texts = [json.loads(line)["context"] for line in (TASKS_DIR / "pydocs_choice.jsonl").read_text().splitlines()]
    tok = train_tokenizer(texts * 3, vocab_size=512)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _export(cfg: OPTConfig, tokenizer: Path, root: Path, seed: int = 0) -> tuple[OPT, Path]:
    from opt.model.checkpoint import save_consolidated
    from opt.model.hf import export_hf

    torch.manual_seed(seed)
    model = OPT(cfg).eval()
    with torch.no_grad():  # O(1) logits, not init's near-uniform ones: differences would hide in the noise
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    consolidated = save_consolidated(cfg, model.state_dict(), root / "consolidated")
    return model, export_hf(consolidated, root / "hf", tokenizer_file=tokenizer)


def _requests(n: int = 60) -> list:
    from lm_eval.api.instance import Instance

    choice = [json.loads(line) for line in (TASKS_DIR / "pydocs_choice.jsonl").read_text().splitlines()][: n // 4]
    cloze = [json.loads(line) for line in (TASKS_DIR / "pydocs_cloze.jsonl").read_text().splitlines()][: n // 2]
    args = [(d["context"], e) for d in choice for e in d["endings"]] + [(d["context"], d["target"]) for d in cloze]
    args += [("", " an empty context"), ("A context that ends in spaces  ", "word"), ("x", " y")]
    return [Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _hflm(hf_dir: Path):  # type: ignore[no-untyped-def]
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=16)


CFG = OPTConfig.preset("debug", vocab_size=512, max_seq_len=128)
# an odd shape: post-LN, narrower embeddings, 3 heads of 16, an FFN that is not 4x
ODD = OPTConfig.preset("debug", vocab_size=512, max_seq_len=128, n_layer=3, d_model=48, n_head=3, d_ffn=100, pre_ln=False,
                       word_embed_dim=32)  # fmt: skip


@pytest.mark.parametrize("cfg", [CFG, ODD], ids=["debug", "odd-post-ln"])
def test_loglikelihoods_equal_lm_evals_hf_model(cfg: OPTConfig, tokenizer: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    model, hf_dir = _export(cfg, tokenizer, tmp_path)
    ours = harness_lm_class()(model=model, tokenizer=Tokenizer.from_file(str(tokenizer)))
    reqs = _requests()
    theirs = _hflm(hf_dir).loglikelihood(reqs)
    mine = ours.loglikelihood(reqs)
    assert [g for _, g in mine] == [g for _, g in theirs]
    have = {"ll": torch.tensor([ll for ll, _ in mine], dtype=torch.float64)}
    want = {"ll": torch.tensor([ll for ll, _ in theirs], dtype=torch.float64)}
    assert (have["ll"] - want["ll"]).abs().max() <= 1e-4  # the bound, in nats
    numerics.assert_within(numerics.roundoff_usage(have, want), "log-likelihoods against lm-eval's hf model")
    rolling = [r for r in reqs[:4]]
    from lm_eval.api.instance import Instance

    rolling = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(r.args[0] * 4,), idx=i) for i, r in enumerate(rolling)]
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(_hflm(hf_dir).loglikelihood_rolling(rolling), abs=1e-3)


def test_an_imported_hf_model_scores_as_lm_evals_hf_model_does(tokenizer: Path, tmp_path: Path) -> None:
    """A random Hugging Face OPT of an odd shape, imported with `optctl model import-hf` (which keeps its tokenizer)."""
    import transformers

    from opt.cli import main
    from opt.eval.harness import load_for_eval
    from opt.model.hf import hf_config_kwargs

    torch.manual_seed(1)
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**hf_config_kwargs(ODD)))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer), bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                         unk_token="<unk>").save_pretrained(tmp_path / "hf")  # fmt: skip
    assert main(["model", "import-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert (tmp_path / "ours" / "tokenizer.json").is_file()
    model, tok = load_for_eval(str(tmp_path / "ours"), tmp_path / "cache")
    reqs = _requests(40)
    mine = harness_lm_class()(model=model, tokenizer=tok).loglikelihood(reqs)
    theirs = _hflm(tmp_path / "hf").loglikelihood(reqs)
    assert [g for _, g in mine] == [g for _, g in theirs]
    assert max(abs(a - b) for (a, _), (b, _) in zip(mine, theirs, strict=True)) <= 1e-4


def test_accuracies_on_the_bundled_tasks_are_lm_evals_own(tokenizer: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    from opt.eval.suite import run_tasks, summary

    model, hf_dir = _export(CFG, tokenizer, tmp_path)
    ours = harness_lm_class()(model=model, tokenizer=Tokenizer.from_file(str(tokenizer)))
    tasks = ["pydocs_choice", "pydocs_cloze", "pydocs_story"]
    mine = summary(run_tasks(ours, tasks, limit=40))
    theirs = summary(run_tasks(_hflm(hf_dir), tasks, limit=40))
    for task in tasks:
        for metric in ("acc",) if task == "pydocs_cloze" else ("acc", "acc_norm"):
            assert mine[task][metric] == theirs[task][metric], (task, metric)
    assert mine["pydocs_cloze"]["perplexity"] == pytest.approx(theirs["pydocs_cloze"]["perplexity"], rel=1e-4)
    assert 0 <= mine["pydocs_choice"]["acc_norm_tokens"] <= 1 and 0 <= mine["pydocs_story"]["acc_norm_tokens"] <= 1


def test_shared_contexts_run_once_and_score_as_if_alone() -> None:
    torch.manual_seed(0)
    model = OPT(CFG).eval()
    rng = random.Random(0)
    ctx = tuple(rng.randrange(4, 512) for _ in range(30))
    conts = [tuple(rng.randrange(4, 512) for _ in range(rng.randrange(1, 9))) for _ in range(4)]
    packed = score_pairs(model, [(ctx, c) for c in conts], 128, 8192, torch.device("cpu"))
    alone = [score_pairs(model, [(ctx, c)], 128, 8192, torch.device("cpu")).results[0] for c in conts]
    assert packed.tokens == len(ctx) + sum(len(c) - 1 for c in conts)  # the context once
    for (a, ga), (b, gb) in zip(packed.results, alone, strict=True):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb
    with torch.no_grad():  # and alone is the plain causal model: the sum of log-softmax at the continuation
        for c, (ll, _) in zip(conts, alone, strict=True):
            seq = torch.tensor([ctx + c[:-1]])
            logp = torch.log_softmax(model(seq)[0], -1)
            want = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(c))
            assert ll == pytest.approx(want, abs=1e-5)


def test_optctl_eval_tasks_writes_lm_evals_results_json(tokenizer: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from opt.cli import main

    _export(CFG, tokenizer, tmp_path)  # consolidated/ with its tokenizer in hf/ beside it, as a registered export
    out = tmp_path / "results.json"
    argv = ["eval", "tasks", "--checkpoint", str(tmp_path / "consolidated"), "--tasks", "pydocs_choice", "--limit", "8", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert results["results"]["pydocs_choice"]["acc,none"] >= 0 and "acc_norm_tokens,none" in results["results"]["pydocs_choice"]
    assert "pydocs_choice" in capsys.readouterr().out
    assert main([*argv[:5], "nosuch_task", *argv[6:]]) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task(s): nosuch_task" in err and len(err.strip().splitlines()) == 1
    bare = tmp_path / "elsewhere" / "bare"  # weights with no tokenizer anywhere near them
    bare.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((tmp_path / "consolidated" / f).read_bytes())
    assert main(["eval", "tasks", "--checkpoint", str(bare), "--tasks", "pydocs_choice", "--out", str(out)]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
