"""Text corpora: documents as strings, in a fixed order, with a deterministic held-out split.

`python-docs` is real English prose that every machine has offline: the reStructuredText sources of
CPython's documentation (Debian's python3.X-doc, when installed), the pydoc topic texts and the stdlib's
docstrings. Files (.txt, .jsonl, .parquet, or a folder of them) and `hf:NAME[:SPLIT]` are the others.
"""

from __future__ import annotations

import ast
import functools
import glob
import hashlib
import json
import logging
import os
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from sae_dist.config import ConfigError

log = logging.getLogger(__name__)

_RST_NOISE = re.compile(r"^\s*(\.\. |:[a-z]+:|[=\-~^\"'`#*+]{4,}\s*$)")
_ROLE = re.compile(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")


def _rst_to_prose(text: str) -> str:
    """Drops directives, underlines and literal blocks; keeps paragraphs of running text."""
    out, skip_indent = [], None
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if stripped and indent <= skip_indent:
                skip_indent = None
            else:
                continue
        if _RST_NOISE.match(line):
            if stripped.startswith(".. "):
                skip_indent = indent
            continue
        if stripped.endswith("::"):
            skip_indent = indent
            line = line.rstrip(":") + ":"
        out.append(_ROLE.sub(r"\1", line).replace("``", ""))
    return "\n".join(out)


def _python_docs() -> Iterator[str]:
    rst = sorted(glob.glob("/usr/share/doc/python3*/html/_sources/**/*.rst.txt", recursive=True))
    for path in rst:
        for para in re.split(r"\n\s*\n(?=\S)", _rst_to_prose(Path(path).read_text(errors="ignore"))):
            if len(para) > 200:
                yield para
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if {"test", "tests", "site-packages", "idle_test"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    yield doc


def _files(path: str, text_field: str) -> Iterator[str]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"data.corpus ({path!r}) does not exist; give a .txt/.jsonl/.parquet file or folder")
    paths = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for q in paths:
        if q.suffix == ".txt":
            yield from (d for d in re.split(r"\n\s*\n", q.read_text(errors="ignore")) if d.strip())
        elif q.suffix == ".jsonl":
            with q.open() as fh:
                for line in fh:
                    if line.strip():
                        yield json.loads(line)[text_field]
        elif q.suffix == ".parquet":
            import pyarrow.parquet as pq

            yield from pq.read_table(q, columns=[text_field]).column(text_field).to_pylist()


def _hf(spec: str, text_field: str) -> Iterator[str]:
    import datasets

    name, _, split = spec.partition(":")
    for row in datasets.load_dataset(name, split=split or "train", streaming=True):
        yield row[text_field]


@functools.lru_cache(maxsize=1)
def _python_docs_once() -> tuple[str, ...]:
    """The python-docs corpus, read once per process: parsing the stdlib's modules for their docstrings
    and the rst sources into prose takes most of a small job's start (about 13 s here, and a job reads
    the train split and the held-out split). The files are the installed Python's own."""
    return tuple(_python_docs())


def iter_documents(corpus: str, text_field: str = "text") -> Iterator[str]:
    if corpus == "python-docs":
        return iter(_python_docs_once())
    if corpus.startswith("hf:"):
        return _hf(corpus[3:], text_field)
    return _files(os.path.expanduser(corpus), text_field)


def is_heldout(doc: str, fraction: float) -> bool:
    """A document's split depends on its text only, so it never changes between runs or machines."""
    h = int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "little")
    return (h % 1_000_000) < fraction * 1_000_000


def load_split(corpus: str, split: str, heldout_fraction: float, text_field: str = "text") -> list[str]:
    """All documents of one split ("train" or "heldout"), in corpus order."""
    want = split == "heldout"
    docs = [d for d in iter_documents(corpus, text_field) if d.strip() and is_heldout(d, heldout_fraction) == want]
    if not docs:
        raise ConfigError(
            f"data.corpus ({corpus!r}) has no {split} documents; point it at a non-empty text source"
        )
    return docs
