"""Tasks over real data that ships with Python: the files of its own standard library.

The synthetic workloads in ``workloads`` burn a known number of CPU seconds; these do real
work whose cost is whatever it costs: parsing, compiling, hashing, compressing, scanning
and querying the standard library's ``.py`` files.  Their costs are uneven (files range
from a few bytes to a few hundred KB), some run in C code that releases the GIL, and one
sends each file's text to the workers (a fat input) instead of a path.

Every task is a module-level function, so workers import it by reference, and returns a
small deterministic result (ints, short strings, tuples).  Files are listed in sorted
order and sampled evenly, so the items are the same on every run of one Python install;
the loop's results are the task's own, computed in the measuring process after the map.

``setup_lookup_task`` pays a one-time set-up on its first call in each process (an index
built from a few standard library modules), as a model loaded lazily would: each worker
pays it again.
"""

from __future__ import annotations

import ast
import hashlib
import io
import lzma
import os
import re
import sqlite3
import sysconfig
import tokenize
import types
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

# --------------------------------------------------------------------------- the files

# Folders of the standard library left out: installed packages (they differ between
# machines) and test suites (some files there are not valid Python on purpose).
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                        "__pycache__"})


@lru_cache(maxsize=1)
def stdlib_files() -> Tuple[str, ...]:
    """The standard library's ``.py`` files, sorted: ~730 files, ~12 MB on CPython 3.11."""
    root = sysconfig.get_paths()["stdlib"]
    found: List[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        found += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
    return tuple(sorted(found))


def sample_files(n: int) -> List[str]:
    """n paths spread evenly over the sorted list (every package represented, not just the
    first ones alphabetically); past the list's length, the list again, from the start
    (the second reads come from the page cache)."""
    files = stdlib_files()
    if n <= len(files):
        return [files[k * len(files) // n] for k in range(n)]
    return [files[k % len(files)] for k in range(n)]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def sources(n: int) -> List[Tuple[str, bytes]]:
    """(file name, source bytes): the text itself is the item, pickled to the workers."""
    return [(os.path.basename(p), _read(p)) for p in sample_files(n)]


# --------------------------------------------------------------------------- tasks
# One function per workload: adaptive_exec caches what it learns per function.


def parse_task(path: str) -> int:
    """Pure-Python-object work under the GIL: the number of nodes of the file's AST."""
    try:
        tree = ast.parse(_read(path), filename=path)
    except SyntaxError:
        return -1
    return sum(1 for _ in ast.walk(tree))


def _code_size(code: types.CodeType) -> int:
    total = len(code.co_code)
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            total += _code_size(const)
    return total


def compile_task(item: Tuple[str, bytes]) -> Tuple[str, int]:
    """Compile source text received as the item (a fat input): the bytecode's size."""
    name, source = item
    try:
        code = compile(source, name, "exec", dont_inherit=True)
    except SyntaxError:
        return name, -1
    return name, _code_size(code)


def hash_task(path: str) -> str:
    """Read a file and hash it: a system call and C code, tens of microseconds."""
    return hashlib.sha256(_read(path)).hexdigest()[:16]


def compress_task(path: str) -> int:
    """lzma-compress a file (C code that releases the GIL): the compressed length."""
    return len(lzma.compress(_read(path), preset=6))


_PATTERNS = [
    re.compile(rb"^\s*def\s+(\w+)", re.M),
    re.compile(rb"^\s*class\s+(\w+)", re.M),
    re.compile(rb"\bself\.(\w+)\s*="),
    re.compile(rb"(?:\"\"\"|''')"),
    re.compile(rb"#[^\n]*"),
    re.compile(rb"\b\d+(?:\.\d+)?\b"),
    re.compile(rb"\b(\w+)\(\s*\w+\s*=\s*"),  # calls with a keyword argument first
]


def regex_scan_task(path: str) -> Tuple[int, ...]:
    """Count the matches of a few regular expressions over a file's text."""
    text = _read(path)
    return tuple(sum(1 for _ in pattern.finditer(text)) for pattern in _PATTERNS)


_WORD = re.compile(r"[A-Za-z_]\w*")


def sqlite_task(path: str) -> Tuple[Tuple[str, int], ...]:
    """Load a file's identifiers into an in-memory SQLite table, one row each, and ask it
    for the three most frequent identifiers of over three characters."""
    text = _read(path).decode("utf-8", "replace")
    con = sqlite3.connect(":memory:")
    try:
        con.execute("CREATE TABLE words (line INTEGER, word TEXT)")
        con.executemany(
            "INSERT INTO words VALUES (?, ?)",
            ((n, m.group()) for n, line in enumerate(text.splitlines())
             for m in _WORD.finditer(line)))
        rows = con.execute(
            "SELECT word, COUNT(*) AS c FROM words WHERE length(word) > 3 "
            "GROUP BY word ORDER BY c DESC, word LIMIT 3").fetchall()
    finally:
        con.close()
    return tuple((word, count) for word, count in rows)


# --------------------------------------------------------------------------- set-up

# The modules whose identifiers make the index, read and parsed once per process.
_INDEX_FILES = 40
_index: Optional[Dict[str, int]] = None


def _build_index() -> Dict[str, int]:
    """identifier -> rank by frequency (0 = most frequent), over the identifiers of 40
    standard library files spread across it, with their ASTs walked: ~0.2 s, once."""
    counts: Dict[str, int] = {}
    for path in sample_files(_INDEX_FILES):
        tree = ast.parse(_read(path))
        for node in ast.walk(tree):
            name = getattr(node, "id", None) or getattr(node, "attr", None)
            if isinstance(name, str):
                counts[name] = counts.get(name, 0) + 1
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    return {word: rank for rank, word in enumerate(ranked)}


def _lookup_index() -> Dict[str, int]:
    global _index
    if _index is None:
        _index = _build_index()
    return _index


_CHUNK_LINES = 60
_TOP_LEVEL = re.compile(r"(?:def|class|async def|@)\b")


def setup_chunks(n: int) -> List[str]:
    """n chunks of standard library code, from sampled files, each cut at a top-level
    ``def``, ``class`` or decorator once it holds 60 lines, so most tokenise whole."""
    chunks: List[str] = []
    for path in sample_files(max(1, n // 2)):
        lines = _read(path).decode("utf-8", "replace").splitlines()
        start = 0
        for k, line in enumerate(lines):
            if k - start >= _CHUNK_LINES and _TOP_LEVEL.match(line):
                chunks.append("\n".join(lines[start:k]) + "\n")
                start = k
        chunks.append("\n".join(lines[start:]) + "\n")
        if len(chunks) >= n:
            return chunks[:n]
    return [chunks[k % len(chunks)] for k in range(n)]


def setup_lookup_task(chunk: str) -> Tuple[int, int]:
    """The chunk tokenised (pure Python, ~1-2 ms) and its names looked up in the
    per-process index, built on the first call: how many names are known, and the sum
    of their ranks.  A chunk cut inside a string or a block stops the tokeniser early,
    at the same place on every run."""
    index = _lookup_index()
    known = 0
    rank_sum = 0
    try:
        for token in tokenize.generate_tokens(io.StringIO(chunk).readline):
            if token.type == tokenize.NAME:
                rank = index.get(token.string)
                if rank is not None:
                    known += 1
                    rank_sum += rank
    except (tokenize.TokenError, SyntaxError):
        pass
    return known, rank_sum
