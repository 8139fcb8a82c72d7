"""The builtin corpus: about 4 MB of English from Python's own bundled documentation.

The pydoc_data topics, the docstrings of the pure-Python stdlib (read with ast, nothing imported) and
of the C modules. It imports only the standard library, because ingest runs it as a script in an
isolated interpreter (`python -I -S builtin_corpus.py DEST`) so that the output is the same whatever
the calling process has loaded.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

# Not documentation, or a source of side effects when imported.
_SKIP_DIRS = {"test", "tests", "site-packages", "__pycache__", "idle_test"}
_SKIP_EXTENSIONS = ("_test", "_xx", "xx", "_tkinter", "_ctypes_test")


def _stdlib_source_docs(stdlib: Path) -> Iterator[dict]:
    """One document per stdlib module: its docstrings, read with ast so that nothing is imported."""
    import ast

    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith((".", "config-"))
        )
        for name in sorted(f for f in filenames if f.endswith(".py")):
            path = Path(dirpath, name)
            try:
                tree = ast.parse(path.read_bytes())
            except (SyntaxError, ValueError):
                continue
            module = path.relative_to(stdlib).with_suffix("").as_posix().replace("/", ".")
            parts = []
            for node in ast.walk(tree):
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    if doc := ast.get_docstring(node):
                        name = f"{module}.{node.name}" if hasattr(node, "name") else module
                        parts.append((name, doc))
            if parts:
                yield {"source": f"stdlib/{module}", "parts": parts}


def _extension_docs(stdlib: Path) -> Iterator[dict]:
    """Docstrings of the C modules (builtins, sys, math, ...), which have no .py source to parse."""
    import importlib

    dynload = stdlib / "lib-dynload"
    names = set(sys.builtin_module_names) | {p.name.split(".")[0] for p in dynload.glob("*.so")}
    for name in sorted(names):
        if name.startswith(_SKIP_EXTENSIONS):
            continue
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional extension that is not built here
            continue
        parts = [(None, module.__doc__)] if isinstance(module.__doc__, str) else []
        for attr, obj in sorted(vars(module).items()):
            doc = getattr(obj, "__doc__", None)
            if (
                attr.startswith("_")
                or not isinstance(doc, str)
                or getattr(obj, "__module__", name) not in (name, None)
            ):
                continue
            parts.append((f"{name}.{attr}", doc))
        if parts:
            yield {"source": f"extension/{name}", "parts": parts}


def write_builtin_corpus(dest: Path) -> None:
    """Write about 4 MB of English from Python's bundled docs: deterministic for a given Python version."""
    import sysconfig
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = {
        "topics.jsonl": ({"source": f"topics/{k}", "parts": [(None, topics[k])]} for k in sorted(topics)),
        "stdlib.jsonl": _stdlib_source_docs(stdlib),
        "extensions.jsonl": _extension_docs(stdlib),
    }
    dest.mkdir(parents=True, exist_ok=True)
    # The same docstring shows up in many places (inherited, aliased, re-exported): keep each paragraph's
    # first occurrence only, so that no paragraph can land in both train and val.
    seen: set[str] = set()
    for filename, records in sources.items():
        with (dest / filename).open("w", encoding="utf-8") as fh:
            for record in records:
                text = _unseen(record.pop("parts"), seen)
                if text:
                    fh.write(json.dumps(record | {"text": text}, ensure_ascii=False, sort_keys=True) + "\n")


def _unseen(parts: list[tuple[str | None, str]], seen: set[str]) -> str:
    """The (heading, docstring) parts as text, without the paragraphs seen before (compared with their
    whitespace normalised); a part whose every paragraph was seen goes, heading and all."""
    kept = []
    for heading, doc in parts:
        fresh = []
        for para in re.split(r"\n[ \t]*\n", doc.strip()):
            key = " ".join(para.split())
            if key and key not in seen:
                seen.add(key)
                fresh.append(para.strip("\n"))
        if fresh:
            if heading:  # on the line above, so a heading is never a paragraph on its own
                fresh[0] = f"{heading}\n{fresh[0]}"
            kept.append("\n\n".join(fresh))
    return "\n\n".join(kept)


if __name__ == "__main__":
    write_builtin_corpus(Path(sys.argv[1]))
