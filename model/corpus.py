"""The demo corpus: several text sources found on any Linux machine that has Python.

No downloads: every source is text the machine already carries. Sources, each a list of
documents (one per file, or per module for docstrings):

- ``code``: Python standard library ``.py`` sources (tests and site-packages excluded).
- ``prose``: docstrings extracted from the same files with ``ast``, one document per module.
- ``legal``: license texts: ``/usr/share/common-licenses/*``, Python's ``LICENSE.txt`` and
  ``/usr/share/doc/*/copyright`` (identical texts are kept once).
- ``manual``: English man pages (``/usr/share/man/man[1-9]``, gzip or plain roff) with the roff
  markup stripped. Slim container images often drop man pages; the source then disappears.

Every file list is sorted and every source is capped (:data:`MAX_SOURCE_BYTES`), so a machine
produces the same corpus on every run and preparing it takes seconds. Nodes of one run must
share an image for their demo corpora to match (the shard index carries a sha256 to check).
A source with less than :data:`MIN_SOURCE_BYTES` of text is dropped with a log line; on a bare
Debian/Ubuntu with Python, ``code``, ``prose`` and ``legal`` are always there.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import os
import re
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from elastic import jsonlog

MAX_SOURCE_BYTES = 3 * 2**20
MIN_SOURCE_BYTES = 128 * 2**10

# Default mixture of the demo (the shape of a real one: mostly code and prose, a little of the
# narrow domains). Sources missing on a machine are left out and the rest renormalised.
DEMO_WEIGHTS: dict[str, float] = {"code": 0.4, "prose": 0.3, "legal": 0.15, "manual": 0.15}

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _sorted_walk(root: Path, *, suffix: str) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(suffix):
                yield Path(dirpath) / name


def _read_text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            return None
    return data.decode("utf-8", errors="replace")


def _capped(texts: Iterator[str], *, max_bytes: int) -> list[str]:
    docs: list[str] = []
    total = 0
    for text in texts:
        size = len(text.encode("utf-8"))
        if not text.strip() or total + size > max_bytes:
            continue  # a smaller later document may still fit
        docs.append(text)
        total += size
        if total >= max_bytes * 0.98:
            break
    return docs


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_texts() -> Iterator[str]:
    for path in _sorted_walk(stdlib_dir(), suffix=".py"):
        text = _read_text(path)
        if text is not None:
            yield text


def prose_texts() -> Iterator[str]:
    for text in code_texts():
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, _DOC_NODES))]
        docs = [ast.get_docstring(n) for n in nodes]
        yield "\n\n".join(d for d in docs if d) + "\n" if any(docs) else ""


_DOC_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def legal_texts() -> Iterator[str]:
    paths = sorted(Path("/usr/share/common-licenses").glob("*"))
    paths.append(stdlib_dir() / "LICENSE.txt")
    paths.extend(sorted(Path("/usr/share/doc").glob("*/copyright")))
    seen: set[str] = set()
    for path in paths:
        text = _read_text(path) if path.is_file() else None
        if text is None:
            continue
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            yield text


def manual_texts() -> Iterator[str]:
    root = Path("/usr/share/man")
    for section in sorted(root.glob("man[1-9]")):
        for path in sorted(section.iterdir()):
            text = _read_text(path) if path.is_file() else None
            if text is None or text.startswith(".so "):
                continue  # unreadable, or a one-line redirect to another page
            yield strip_roff(text)


_ROFF_FONT = re.compile(r"\\f(\(..|\[[^\]]*\]|.)")
_ROFF_GLYPH = re.compile(r"\\(\(..|\[[^\]]*\])")
_ROFF_STRING = re.compile(r"\\\*(\(..|\[[^\]]*\]|.)")
_ROFF_SIZE = re.compile(r"\\s[+-]?\d")
_ROFF_COLOUR = re.compile(r"\\[mM](\[[^\]]*\]|\(..|.)")
_GLYPHS = {"(em": "--", "(en": "-", "(lq": '"', "(rq": '"', "(bu": "*", "(co": "(c)", "(aq": "'"}
_TEXT_MACROS = {"B", "I", "BR", "BI", "IB", "IR", "RB", "RI", "SH", "SS", "IP", "SM", "SB"}


def strip_roff(text: str) -> str:
    """Roff source to plain text: keep prose and headings, drop requests and escapes."""
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\"')):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].strip().partition(" ")
            if macro not in _TEXT_MACROS or not rest:
                continue
            line = rest.replace('"', "")
        line = _ROFF_FONT.sub("", line)
        line = _ROFF_STRING.sub("", line)
        line = _ROFF_SIZE.sub("", line)
        line = _ROFF_COLOUR.sub("", line)
        line = _ROFF_GLYPH.sub(lambda m: _GLYPHS.get(m.group(1), ""), line)
        line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ")
        for escape in ("\\&", "\\,", "\\/", "\\|", "\\^", "\\%", "\\c"):
            line = line.replace(escape, "")
        out.append(line)
    return "\n".join(out) + "\n"


SOURCES: dict[str, Callable[[], Iterator[str]]] = {
    "code": code_texts,
    "prose": prose_texts,
    "legal": legal_texts,
    "manual": manual_texts,
}


def collect_demo(*, max_bytes_per_source: int = MAX_SOURCE_BYTES) -> dict[str, list[str]]:
    """Documents of every demo source that has at least MIN_SOURCE_BYTES of text here."""
    log = jsonlog.get("model.corpus")
    sources: dict[str, list[str]] = {}
    for name, texts in SOURCES.items():
        docs = _capped(texts(), max_bytes=max_bytes_per_source)
        size_bytes = sum(len(d.encode("utf-8")) for d in docs)
        if size_bytes < min(MIN_SOURCE_BYTES, max_bytes_per_source // 2):
            log.info("demo_source_dropped", source=name, size_bytes=size_bytes)
            continue
        sources[name] = docs
    return sources
