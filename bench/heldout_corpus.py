"""A second planted near-duplicate set, from text that is not the bundled corpus: the docstrings of Python 3.11's
standard library and of installed packages the project pins (numpy, pydantic, SQLAlchemy, transformers, MLflow,
Prefect), in sorted file order, so the same interpreter and `make install` give the same corpus.

Each source file's docstrings make one document (files of more than 3,000 words are cut at docstring boundaries
into documents of ~1,500 words; files under 120 words are skipped). Then some documents get a planted copy whose
exact word 5-gram Jaccard is measured and kept only inside its band:

- copies: J in [0.955, 0.99] (above OPT's 0.95, where a 128-entry MinHash estimate still misses ~1 in 17);
- near misses: J in [0.85, 0.935] (below it: removing one of these would lose data).

Edits are word substitutions, a fresh tail, or the first words dropped; their count is adjusted until the measured
Jaccard lands in the band (a document for which no count does is left without a copy). Documents are shuffled
with their copies, so a copy may come first.

    python bench/heldout_corpus.py --mb 20     # prints the corpus's summary line
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from near_dup import Corpus, exact_jaccard, words  # noqa: E402

PACKAGES = ("numpy", "pydantic", "sqlalchemy", "transformers", "mlflow", "prefect")
COPY_BAND = (0.955, 0.99)
MISS_BAND = (0.85, 0.935)
MIN_WORDS, MAX_WORDS, CHUNK_WORDS = 120, 3000, 1500


def _roots() -> Iterator[tuple[str, Path]]:
    yield "stdlib", Path(sysconfig.get_paths()["stdlib"])
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            yield name, Path(next(iter(spec.submodule_search_locations)))


def _skip(rel: tuple[str, ...]) -> bool:
    return bool(rel) and (rel[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in rel or "test" in rel)


def documents(target_mb: float) -> list[str]:
    """Docstring documents in sorted file order until `target_mb` MB of UTF-8 text."""
    docs: list[str] = []
    size = 0
    for _, root in _roots():
        for path in sorted(root.rglob("*.py")):
            if _skip(path.relative_to(root).parts[:-1]):
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            strings = [
                d
                for node in ast.walk(tree)
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and (d := ast.get_docstring(node))
            ]
            for doc in _chunks(strings):
                docs.append(doc)
                size += len(doc.encode("utf-8"))
                if size >= target_mb * 1e6:
                    return docs
    return docs


def _chunks(strings: list[str]) -> Iterator[str]:
    total = sum(len(s.split()) for s in strings)
    if total < MIN_WORDS:
        return
    if total <= MAX_WORDS:
        yield "\n\n".join(strings)
        return
    part: list[str] = []
    count = 0
    for s in strings:
        part.append(s)
        count += len(s.split())
        if count >= CHUNK_WORDS:
            yield "\n\n".join(part)
            part, count = [], 0
    if count >= MIN_WORDS:
        yield "\n\n".join(part)


def _edit(tokens: list[str], kind: str, k: int, rng: np.random.Generator) -> list[str]:
    out = list(tokens)
    if kind == "substitute":
        for p in rng.choice(len(out), size=min(k, len(out)), replace=False):
            out[int(p)] = f"edit{rng.integers(1 << 30)}"
    elif kind == "tail":
        out += [f"tail{rng.integers(1 << 30)}" for _ in range(k)]
    else:  # drop the first k words
        out = out[k:]
    return out


def plant(original: str, band: tuple[float, float], rng: np.random.Generator) -> tuple[str, float] | None:
    """A copy of `original` whose exact Jaccard to it lies in `band`, or None when no edit count lands there."""
    tokens = original.split()
    kind = str(rng.choice(["substitute", "tail", "drop"], p=[0.6, 0.25, 0.15]))
    target = float(rng.uniform(*band))
    shingles = max(len(words(original)) - 4, 1)
    per_edit = 5 if kind == "substitute" else 1  # shingles a single edit changes, roughly
    k = max(1, round(shingles * (1 - target) / (per_edit * (1 + target))))
    for _ in range(24):
        copy = " ".join(_edit(tokens, kind, k, rng))
        j = exact_jaccard(original, copy)
        if band[0] <= j <= band[1]:
            return copy, j
        step = max(1, round(abs(j - target) * shingles / (per_edit * 2)))
        k = max(1, k + step if j > band[1] else k - step)
    return None


def build_heldout(target_mb: float, seed: int, copy_fraction: float = 0.03, miss_fraction: float = 0.03) -> Corpus:
    """Docstring documents plus planted copies and near misses, shuffled; `planted` holds every pair's exact J."""
    rng = np.random.default_rng(seed)
    docs = documents(target_mb)
    picks = rng.choice(len(docs), size=int(len(docs) * (copy_fraction + miss_fraction)), replace=False)
    n_copies = int(len(docs) * copy_fraction)
    copies: list[tuple[int, str, float]] = []
    for rank, src in enumerate(picks):
        made = plant(docs[src], COPY_BAND if rank < n_copies else MISS_BAND, rng)
        if made is not None:
            copies.append((int(src), *made))
    texts = docs + [c for _, c, _ in copies]
    order = rng.permutation(len(texts))
    position = np.empty(len(texts), dtype=np.int64)
    position[order] = np.arange(len(texts))
    planted = []
    for c, (src, _, j) in enumerate(copies):
        a, b = int(position[src]), int(position[len(docs) + c])
        planted.append((min(a, b), max(a, b), j))
    shuffled = [texts[i] for i in order]
    return Corpus(shuffled, planted, sum(len(t.encode("utf-8")) for t in shuffled) / 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    corpus = build_heldout(args.mb, args.seed)
    js = np.array([j for *_, j in corpus.planted])
    print(json.dumps({
        "corpus": "docstrings (stdlib + pinned packages)", "docs": len(corpus.texts), "mb": round(corpus.mb, 2),
        "copies": int((js >= COPY_BAND[0]).sum()), "near_misses": int((js <= MISS_BAND[1]).sum()),
        "copy_j_min_max": [round(float(js[js >= 0.95].min()), 4), round(float(js.max()), 4)],
        "miss_j_min_max": [round(float(js.min()), 4), round(float(js[js < 0.95].max()), 4)],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
