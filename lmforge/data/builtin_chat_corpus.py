"""The builtin chat corpus: a few thousand short conversations about the Python standard library.

The chat counterpart of builtin_corpus.py, for fine-tuning on conversations without downloading
anything. Each public function, class and method of the stdlib that has a docstring becomes one
conversation: the user asks what it does and the assistant answers with the first sentence of its
docstring. About a third go on with a follow-up (which module it is in, how to call it) and about a
quarter open with a system message. Every choice is made by a hash of the name, so the output is the
same on every run.

Like builtin_corpus.py it imports only the standard library and is run as a script in an isolated
interpreter (`python -I -S builtin_chat_corpus.py DEST_DIR`), because the docstrings of C modules
depend on what the calling process has loaded. It writes DEST_DIR/conversations.jsonl, one
{"messages": [{"role": ..., "content": ...}, ...]} per line.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import sysconfig
import types
from collections.abc import Iterator
from pathlib import Path

# Not documentation, or a source of side effects when imported (the same selection as builtin_corpus.py).
SKIP_DIRS = {"test", "tests", "site-packages", "__pycache__", "idle_test"}
SKIP_EXTENSIONS = ("_test", "_xx", "xx", "_tkinter", "_ctypes_test")

# A smaller corpus than this means a stripped-down Python (no sources, no docstrings): fail loudly.
ANSWER_SHINGLE = 8  # words: answers sharing a run this long are one answer (see write_builtin_chat_corpus)
MAX_CONVERSATION_CHARS = 260
MIN_CONVERSATIONS = 3000
MIN_CHARS = 400_000

QUESTIONS = [
    "What does `{name}` do?",
    "Explain `{name}` in one sentence.",
    "What is `{name}` for?",
    "In one sentence, what does `{name}` do?",
    "Briefly, what is `{name}`?",
]
MODULE_QUESTIONS = ["Which module is it in?", "What module is that in?"]
CALL_QUESTIONS = ["How do I call it?", "What is its signature?"]
CREATE_QUESTIONS = ["How do I create one?", "What arguments does it take?"]
SYSTEM_PROMPTS = [
    "You answer questions about the Python standard library in one sentence.",
    "You are a concise assistant for Python programmers.",
]

# A docstring that starts with its own signature, "dumps(obj, ...)" or "S.join(iterable) -> str".
SIGNATURE_LINE = re.compile(r"[\w.]+\(")
# The end of the first sentence: a full stop followed by a capitalised word, or the end of the paragraph;
# "e.g." and "i.e." do not end one.
SENTENCE_END = re.compile(r"(?<!\be\.g)(?<!\bi\.e)(?<!\betc)(?<!\bvs)[.!?](?=\s+[A-Z`\"'(]|$)")
MAX_SIGNATURE = 160


# ---------------------------------------------------------------------------------------------
# entries: (module, qualified name, kind, docstring, signature or None)


def source_entries(stdlib: Path) -> Iterator[tuple]:
    """The public defs of the pure-Python stdlib, read with ast so that nothing is imported."""
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith((".", "config-")))
        for filename in sorted(f for f in filenames if f.endswith(".py")):
            path = Path(dirpath, filename)
            module = path.relative_to(stdlib).with_suffix("").as_posix().replace("/", ".")
            module = module.removesuffix(".__init__")
            if any(part.startswith("_") for part in module.split(".")):
                continue  # private modules: what they hold is documented where it is re-exported
            try:
                tree = ast.parse(path.read_bytes())
            except (SyntaxError, ValueError):
                continue
            yield from walk_defs(module, "", tree.body, in_class=False)


def walk_defs(module: str, prefix: str, body: list, in_class: bool) -> Iterator[tuple]:
    for node in defs(body):
        if node.name.startswith("_"):
            continue
        qualname = prefix + node.name
        doc = ast.get_docstring(node)
        if isinstance(node, ast.ClassDef):
            init = next((n for n in defs(node.body) if n.name == "__init__" and not is_class(n)), None)
            signature = ast_signature(init, drop_first=True) if init else None
            if doc:
                yield module, qualname, "class", doc, signature
            yield from walk_defs(module, qualname + ".", node.body, in_class=True)
            continue
        decorators = {decorator_name(d) for d in node.decorator_list}
        if decorators & {"property", "cached_property", "setter", "getter", "deleter"}:
            kind, signature = "property", None  # read as an attribute, not called
        elif not in_class:
            kind, signature = "function", ast_signature(node, drop_first=False)
        elif "staticmethod" in decorators:
            kind, signature = "staticmethod", ast_signature(node, drop_first=False)
        elif "classmethod" in decorators:
            kind, signature = "classmethod", ast_signature(node, drop_first=True)
        else:
            kind, signature = "method", ast_signature(node, drop_first=True)
        if doc:
            yield module, qualname, kind, doc, signature


def defs(body: list) -> Iterator[ast.AST]:
    """The functions and classes defined in a body, including those under if/try (os.py, for one, defines
    half its functions per platform)."""
    for node in body:
        if is_class(node) or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node
        elif isinstance(node, ast.If):
            yield from defs(node.body)
            yield from defs(node.orelse)
        elif isinstance(node, ast.Try):
            yield from defs(node.body)
            for handler in node.handlers:
                yield from defs(handler.body)
            yield from defs(node.orelse)
            yield from defs(node.finalbody)


def is_class(node: ast.AST) -> bool:
    return isinstance(node, ast.ClassDef)


def decorator_name(node: ast.AST) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


class Source(str):
    """A default or annotation as written in the source: inspect shows it with repr(), which is the text."""

    def __repr__(self) -> str:
        return str(self)


def ast_signature(node: ast.FunctionDef | ast.AsyncFunctionDef, drop_first: bool) -> str | None:
    """The signature as inspect.signature would print it, built from the source instead of the object."""
    P = inspect.Parameter
    args = node.args
    positional = [(a, P.POSITIONAL_ONLY) for a in args.posonlyargs]
    positional += [(a, P.POSITIONAL_OR_KEYWORD) for a in args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    rows = [(a, kind, d) for (a, kind), d in zip(positional, defaults, strict=True)]
    if drop_first:
        rows = rows[1:]  # self or cls, which the caller does not pass
    if args.vararg:
        rows.append((args.vararg, P.VAR_POSITIONAL, None))
    rows += [(a, P.KEYWORD_ONLY, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)]
    if args.kwarg:
        rows.append((args.kwarg, P.VAR_KEYWORD, None))
    try:
        params = [
            P(
                a.arg,
                kind,
                default=P.empty if d is None else Source(ast.unparse(d)),
                annotation=P.empty if a.annotation is None else Source(ast.unparse(a.annotation)),
            )
            for a, kind, d in rows
        ]
        returns = P.empty if node.returns is None else Source(ast.unparse(node.returns))
        return str(inspect.Signature(params, return_annotation=returns))
    except ValueError:
        return None


def extension_entries(stdlib: Path) -> Iterator[tuple]:
    """The public functions, classes and methods of the C modules (builtins, math, ...), which have no
    .py source to parse; their signatures come from inspect.signature where they have one."""
    dynload = stdlib / "lib-dynload"
    names = set(sys.builtin_module_names) | {p.name.split(".")[0] for p in dynload.glob("*.so")}
    for name in sorted(names):
        if name.startswith(SKIP_EXTENSIONS) or name.startswith("_"):
            continue
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional extension that is not built here
            continue
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", name) not in (name, None):
                continue  # private, or re-exported from elsewhere
            if isinstance(obj, type):
                yield name, attr, "class", obj.__doc__, object_signature(obj, drop_first=False)
                for method_name, raw in sorted(vars(obj).items()):
                    if method_name.startswith("_") or not inspect.isroutine(raw):
                        continue
                    if isinstance(raw, classmethod | types.ClassMethodDescriptorType):
                        kind = "classmethod"
                    elif isinstance(raw, staticmethod):
                        kind = "staticmethod"
                    else:
                        kind = "method"
                    method = getattr(obj, method_name)
                    signature = object_signature(method, drop_first=kind == "method")
                    yield name, f"{attr}.{method_name}", kind, raw.__doc__, signature
            elif inspect.isroutine(obj):
                yield name, attr, "function", obj.__doc__, object_signature(obj, drop_first=False)


def object_signature(obj: object, drop_first: bool) -> str | None:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None  # a C callable without a text signature
    params = list(signature.parameters.values())
    if drop_first and params:
        signature = signature.replace(parameters=params[1:])  # self, taken from the object called on
    return str(signature)


# ---------------------------------------------------------------------------------------------
# turning an entry into a conversation


def first_sentence(doc: object) -> str | None:
    """The first sentence of a docstring, on one line and without reST markup; None when there is no
    usable one (a signature line, a fragment, a whole paragraph)."""
    if not isinstance(doc, str) or not doc.strip():
        return None
    doc = doc.strip()
    if SIGNATURE_LINE.match(doc.splitlines()[0]):
        return None
    text = " ".join(re.split(r"\n[ \t]*\n", doc)[0].split())
    text = re.sub(r":[\w:.-]+:`~?([^`<]*?)\s*(?:<[^`]*>)?`", r"`\1`", text)  # :func:`~os.path` -> `os.path`
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    text = re.sub(r"(?<![\w*])\*(\w+)\*(?![\w*])", r"\1", text)  # *node* (emphasis), not base**exp
    if match := SENTENCE_END.search(text):
        text = text[: match.end()]
    elif text[-1:].isalnum() or text.endswith((")", "`")):
        text += "."  # a one-line docstring without its full stop
    else:
        return None  # ends with ":" or "," and goes on in a list or a code block
    # A lower-case start is a fragment ("microsecond (0-999999).") or a signature ("datetime -> str").
    if not 20 <= len(text) <= 300 or not text.isprintable() or ">>>" in text or not text[0].isupper():
        return None
    return text


def conversation(
    module: str, qualname: str, kind: str, answer: str, signature: str | None
) -> list[dict] | None:
    name = qualname if module == "builtins" else f"{module}.{qualname}"
    # Every choice comes from one stable digest of the name: Python's hash() changes per process.
    h = hashlib.sha256(name.encode()).digest()
    messages = [
        {"role": "user", "content": QUESTIONS[h[0] % len(QUESTIONS)].format(name=name)},
        {"role": "assistant", "content": answer},
    ]
    if h[1] % 3 == 0:
        follow_ups = []
        if h[3] % 3 != 1:
            follow_ups.append((MODULE_QUESTIONS[h[4] % 2], f"`{name}` is in the `{module}` module."))
        if h[3] % 3 != 0 and signature and len(signature) <= MAX_SIGNATURE and signature.isprintable():
            if kind == "class":
                follow_ups.append((CREATE_QUESTIONS[h[4] % 2], f"Create one as `{name}{signature}`."))
            elif kind == "method":
                owner = name.rsplit(".", 1)[0]
                article = "an" if owner[0].lower() in "aeiou" else "a"
                call = f"x.{qualname.rsplit('.', 1)[1]}{signature}"
                reply = f"Call it as `{call}`, where `x` is {article} `{owner}`."
                follow_ups.append((CALL_QUESTIONS[h[4] % 2], reply))
            else:
                follow_ups.append((CALL_QUESTIONS[h[4] % 2], f"Call it as `{name}{signature}`."))
        if not follow_ups:  # asked only for a signature that is not there: ask for the module instead
            follow_ups.append((MODULE_QUESTIONS[h[4] % 2], f"`{name}` is in the `{module}` module."))
        for question, reply in follow_ups:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    if h[2] % 4 == 0:
        messages.insert(0, {"role": "system", "content": SYSTEM_PROMPTS[h[5] % len(SYSTEM_PROMPTS)]})
    # the demo's context is 128 tokens: a conversation too long for it loses its follow-ups, then its
    # system prompt, and is left out if that is not enough
    while sum(len(m["content"]) for m in messages) > MAX_CONVERSATION_CHARS and len(messages) > 2:
        messages = messages[1:] if messages[0]["role"] == "system" and len(messages) == 3 else messages[:-2]
    return messages if sum(len(m["content"]) for m in messages) <= MAX_CONVERSATION_CHARS else None


def write_builtin_chat_corpus(dest: Path) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    entries = sorted(
        list(source_entries(stdlib)) + list(extension_entries(stdlib)), key=lambda e: (e[0], e[1])
    )
    # One conversation per name (the first definition, when a module defines it per platform), so that
    # no single-turn conversation is also the start of a longer one; and one per answer: aliases share a
    # docstring (or nearly: assertEqual and assertNotEqual), and the same answer in train and val would
    # be leakage, not learning. An answer sharing a run of ANSWER_SHINGLE words with an earlier one is out.
    lines, seen_names, seen_shingles, seen_lines = [], set(), set(), set()
    for module, qualname, kind, doc, signature in entries:
        answer = first_sentence(doc)
        if answer is None or (module, qualname) in seen_names:
            continue
        words = re.findall(r"\w+", answer.casefold())
        shingles = {
            tuple(words[i : i + ANSWER_SHINGLE]) for i in range(max(1, len(words) - ANSWER_SHINGLE + 1))
        }
        messages = conversation(module, qualname, kind, answer, signature)
        if shingles & seen_shingles or messages is None:
            continue
        seen_names.add((module, qualname))
        seen_shingles |= shingles
        line = json.dumps({"messages": messages}, ensure_ascii=False)
        if line not in seen_lines:
            seen_lines.add(line)
            lines.append(line)

    # Check what the corpus promises before writing it.
    prefixes = set()
    for line in lines:
        messages = json.loads(line)["messages"]
        prefixes.update(
            json.dumps({"messages": messages[:n]}, ensure_ascii=False) for n in range(1, len(messages))
        )
        for message in messages:
            if not message["content"].replace("\n", "").isprintable():
                sys.exit(f"unprintable content in {line[:200]}")
    if overlap := prefixes & seen_lines:
        sys.exit(f"{len(overlap)} conversations are the start of another, e.g. {min(overlap)[:200]}")
    chars = sum(len(m["content"]) for line in lines for m in json.loads(line)["messages"])
    if len(lines) < MIN_CONVERSATIONS or chars < MIN_CHARS:
        sys.exit(f"builtin chat corpus too small: {len(lines)} conversations, {chars} characters")

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "conversations.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -I -S builtin_chat_corpus.py DEST_DIR")
    write_builtin_chat_corpus(Path(sys.argv[1]))
