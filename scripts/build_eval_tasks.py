"""Build the bundled offline evaluation tasks (lm-eval's task format) from the bundled sample corpus.

    python scripts/build_eval_tasks.py        # writes opt/eval/tasks/*.jsonl (committed; re-running gives the same bytes)

Three small tasks made from prose paragraphs of `data/sample/python-docs.jsonl` (CPython's documentation, PSF
licence, see data/sample/README.md):
- `pydocs_cloze`: a paragraph without its last word; the model scores the word (LAMBADA's form: accuracy is
  whether the word is the greedy continuation, and its perplexity).
- `pydocs_choice`: the first half of a paragraph and four endings, the true one and the endings of three other
  paragraphs (HellaSwag's form: accuracy, lm-eval's character-normalised accuracy, OPT's token-normalised one).
- `pydocs_story`: a longer paragraph without its last sentence and four last sentences, its own and those of
  three other paragraphs (StoryCloze's form, also in OPT's suite: a long context and short endings).
The paragraphs come from the corpus the tiny model trains on: these tasks check that evaluation works end to end
and that a trained model beats chance, not how well a model generalises.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "opt" / "eval" / "tasks"
PER_TASK = 200
_PROSE = re.compile(r"[A-Za-z][A-Za-z ,;:'()\-]+")


def paragraphs() -> list[str]:
    out = []
    for line in (REPO / "data" / "sample" / "python-docs.jsonl").read_text(encoding="utf-8").splitlines():
        for para in json.loads(line)["text"].split("\n\n"):
            text = " ".join(para.split())
            if para.startswith(" ") or not 120 <= len(text) <= 400 or not text.endswith(".") or '"' in text[:1]:
                continue  # code, tables and headings start indented or quoted; keep prose
            words = text.split()
            letters = sum(c.isalpha() or c == " " for c in text) / len(text)
            if len(words) >= 20 and letters > 0.9 and re.fullmatch(r"[A-Za-z]+", words[-1].rstrip(".")):
                out.append(text)
    unique = sorted(set(out), key=lambda t: hashlib.sha256(t.encode()).hexdigest())  # a fixed, content-based order
    return unique


_SENTENCE_END = re.compile(r"(?<=[a-z)]\.) (?=[A-Z])")


def stories(taken: set[str]) -> list[tuple[str, str]]:
    """(context, last sentence) of prose paragraphs of 3+ sentences not used by the other tasks, in a fixed order."""
    out = []
    for line in (REPO / "data" / "sample" / "python-docs.jsonl").read_text(encoding="utf-8").splitlines():
        for para in json.loads(line)["text"].split("\n\n"):
            text = " ".join(para.split())
            if para.startswith(" ") or '"' in text[:1] or not 220 <= len(text) <= 1200 or not text.endswith("."):
                continue
            sentences = _SENTENCE_END.split(text)
            letters = sum(c.isalpha() or c == " " for c in text) / len(text)
            if text in taken or letters <= 0.9 or len(sentences) < 3 or not 30 <= len(sentences[-1]) <= 160:
                continue
            out.append((" ".join(sentences[:-1]), " " + sentences[-1]))
    return sorted(set(out), key=lambda p: hashlib.sha256(p[0].encode()).hexdigest())


def main() -> None:
    paras = paragraphs()
    if len(paras) < 2 * PER_TASK:
        raise SystemExit(f"only {len(paras)} prose paragraphs in the sample corpus; need {2 * PER_TASK}")
    cloze, choice = paras[:PER_TASK], paras[PER_TASK : 2 * PER_TASK]
    rng = random.Random(0)
    with open(OUT / "pydocs_cloze.jsonl", "w", encoding="utf-8") as f:
        for text in cloze:
            head, last = text[:-1].rsplit(" ", 1)
            f.write(json.dumps({"context": head, "target": " " + last}) + "\n")
    halves = []
    for text in choice:
        words = text.split()
        cut = len(words) // 2
        halves.append((" ".join(words[:cut]), " " + " ".join(words[cut:])))
    with open(OUT / "pydocs_choice.jsonl", "w", encoding="utf-8") as f:
        for i, (context, ending) in enumerate(halves):
            others = rng.sample([h[1] for j, h in enumerate(halves) if j != i], 3)
            label = rng.randrange(4)
            endings = others[:label] + [ending] + others[label:]
            f.write(json.dumps({"context": context, "endings": endings, "label": label}) + "\n")
    story = stories(set(cloze + choice))[:PER_TASK]
    rng = random.Random(1)
    with open(OUT / "pydocs_story.jsonl", "w", encoding="utf-8") as f:
        for i, (context, ending) in enumerate(story):
            others = rng.sample([e for j, (_, e) in enumerate(story) if j != i], 3)
            label = rng.randrange(4)
            endings = others[:label] + [ending] + others[label:]
            f.write(json.dumps({"context": context, "endings": endings, "label": label}) + "\n")
    print(f"{len(cloze)} cloze, {len(halves)} choice and {len(story)} story items in {OUT}")


if __name__ == "__main__":
    main()
