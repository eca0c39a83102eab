"""The embedded corpus: labelled text every Python install carries, so `moe-lab train` needs no download.

Three domains, kept apart so that routing can be read against them:
    code  the standard library's own Python source;
    docs  the language reference topics behind `help()` (pydoc_data), or, where a distribution strips those,
          the standard library's docstrings;
    math  generated arithmetic ("417 + 38 = 455"), from a fixed seed.
"""

from __future__ import annotations

import ast
import os
import random
import sysconfig
from pathlib import Path
from typing import Iterator

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "turtledemo", "lib2to3"}


def _stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def code_documents() -> Iterator[str]:
    for path in _stdlib_sources():
        text = _read(path)
        if text and text.strip():
            yield text


def docs_documents() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package pydoc_data separately
        topics = {}
    for key in sorted(topics):
        yield topics[key]
    # Docstrings of the standard library, for distributions without pydoc_data and to extend the domain.
    for path in _stdlib_sources():
        text = _read(path)
        if not text:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        docs = [
            ast.get_docstring(node)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        docs = [d for d in docs if d and len(d) > 200]
        if docs:
            yield "\n\n".join(docs)


def math_documents(seed: int = 0, lines_per_document: int = 64) -> Iterator[str]:
    rng = random.Random(seed)
    while True:
        lines = []
        for _ in range(lines_per_document):
            op = rng.choice("+-*")
            digits = rng.choice((1, 2, 3)) if op == "*" else rng.choice((1, 2, 3, 4))
            a, b = rng.randrange(10**digits), rng.randrange(10 ** rng.choice((1, 2)))
            result = a + b if op == "+" else a - b if op == "-" else a * b
            lines.append(f"{a} {op} {b} = {result}")
        yield "\n".join(lines) + "\n"


GENERATORS = {"code": code_documents, "docs": docs_documents, "math": math_documents}


def embedded_documents(domains: list[str], max_chars_per_domain: int) -> Iterator[dict]:
    """Documents {"text", "domain"}, at most `max_chars_per_domain` characters of each domain, in a fixed order."""
    for domain in domains:
        budget = max_chars_per_domain
        for text in GENERATORS[domain]():
            if budget <= 0:
                break
            text = text[:budget]
            budget -= len(text)
            yield {"text": text, "domain": domain}
