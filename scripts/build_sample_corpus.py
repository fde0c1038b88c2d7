"""Build the bundled sample corpus `data/sample/python-docs.jsonl` from text that ships with CPython.

Sources (both under the PSF licence, which permits redistribution, see data/sample/README.md):
- `pydoc_data.topics`: the language-reference topics `help()` shows;
- the docstrings of standard-library modules, classes and functions.

Each line is Pile-style JSON: {"text": ..., "meta": {"pile_set_name": ..., "id": ...}}.
The file is committed so that the dataset id does not change with the Python patch release.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import sys
from pathlib import Path

# Modules that import cleanly without side effects (no GUI, no network) and have rich docstrings.
SKIP_PREFIXES = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "__", "lib2to3", "ensurepip")


def topic_docs() -> list[dict]:
    import pydoc_data.topics as topics

    return [
        {"text": text.strip(), "meta": {"pile_set_name": "python-reference", "id": f"topic:{name}"}}
        for name, text in sorted(topics.topics.items())
    ]


def docstring_docs(min_chars: int = 400) -> list[dict]:
    docs = []
    for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        name = info.name
        if name.startswith(SKIP_PREFIXES) or name not in sys.stdlib_module_names:
            continue
        try:
            module = importlib.import_module(name)
        except Exception:  # platform-specific modules that cannot import here
            continue
        parts = [inspect.getdoc(module) or ""]
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj)
                if doc:
                    parts.append(f"{attr}\n\n{doc}")
        text = "\n\n".join(p for p in parts if p).strip()
        if len(text) >= min_chars:
            docs.append({"text": text, "meta": {"pile_set_name": "python-docstrings", "id": f"module:{name}"}})
    return docs


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "data" / "sample" / "python-docs.jsonl"
    docs = topic_docs() + docstring_docs()
    with out.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    print(f"wrote {len(docs)} documents, {out.stat().st_size / 1e6:.2f} MB to {out}")


if __name__ == "__main__":
    main()
