"""The command line as its users meet it: ``python -m adaptive_exec`` (the same ``main`` as
the ``adaptive-exec`` console script) run in a subprocess, as a shell would."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adaptive_exec import __version__, cache, cache_schema, cli
from adaptive_exec.demo_workloads import DEMOS
from adaptive_exec.records import fmt_bytes, fmt_s

DATE = r"\d{4}-\d\d-\d\d \d\d:\d\d"

# Two module-level functions whose names share a prefix: "squ" names both.
WORK = textwrap.dedent("""
    def square(x):
        return x * x

    def square_root(x):
        return x ** 0.5
""")
FILL = ("from adaptive_exec import parallelize\n"
        "import cli_work\n"
        "for f in (cli_work.square, cli_work.square_root):\n"
        "    parallelize(f).map(range(1000))\n")


def aex(*args: str, cache_dir: Path | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if cache_dir is not None:
        env[cache.ENV_DIR] = str(cache_dir)
    return subprocess.run([sys.executable, "-m", "adaptive_exec", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> Path:
    """A cache dir holding cli_work.square and cli_work.square_root (filled by a map in
    another process, as a user's script would)."""
    base = tmp_path_factory.mktemp("cli")
    (base / "cli_work.py").write_text(WORK)
    cache_dir = base / "cache"
    subprocess.run([sys.executable, "-c", FILL], cwd=base, check=True, timeout=120,
                   env={**os.environ, cache.ENV_DIR: str(cache_dir)})
    return cache_dir


def rows(text: str, indent: str = "") -> dict[str, str]:
    """The ``label: value`` lines of ``text`` that start with ``indent`` and no more;
    asserts their values are in one column."""
    found = re.findall(rf"^({indent}\S[^:\n]*:)( +)(\S.*)$", text, re.M)
    assert found, text
    assert len({len(label) + len(gap) for label, gap, _ in found}) == 1, text  # aligned
    return {label[len(indent):-1]: value for label, _, value in found}


# --- 1, 2: version, name -----------------------------------------------------------------


def test_version():
    proc = aex("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"adaptive-exec {__version__}\n"


ENTRY_POINT = ("import sys; sys.argv[0] = '/usr/local/bin/anything'; "
               "from adaptive_exec.cli import main; sys.exit(main())")


@pytest.mark.parametrize("how", ["module", "entry point"])
def test_the_program_calls_itself_adaptive_exec(how):
    """``python -m`` would be "__main__.py" to argparse, a console script its file name."""

    def run(*args):
        if how == "module":
            return aex(*args)
        return subprocess.run([sys.executable, "-c", ENTRY_POINT, *args],
                              capture_output=True, text=True, timeout=60)

    assert run("--help").stdout.startswith("usage: adaptive-exec [")
    bad = run("demo", "--no-such-option")
    assert bad.returncode == 2
    assert "usage: adaptive-exec demo" in bad.stderr
    assert "adaptive-exec demo: error: unrecognized arguments: --no-such-option" in bad.stderr
    missing = run()
    assert missing.returncode == 2 and "adaptive-exec: error:" in missing.stderr


# --- 3: help ---------------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) for the program and each of its subcommands."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_help_has_a_sentence_for_every_command_and_option():
    seen = 0
    for path, parser in _parsers(cli.make_parser()):
        shown = aex(*path, "--help")
        assert shown.returncode == 0, (path, shown.stderr)
        assert shown.stdout.startswith(f"usage: {' '.join(('adaptive-exec', *path))} ")
        if path:
            assert parser.description and _flat(parser.description) in _flat(shown.stdout)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:  # one line per subcommand
                    assert choice.help and len(choice.help.split()) >= 3, (path, choice)
                    line = rf"^ +{choice.dest} +{re.escape(choice.help)}$"
                    assert re.search(line, shown.stdout, re.M), (path, shown.stdout)
                    seen += 1
                continue
            assert action.help and len(action.help.split()) >= 3, (path, action.dest)
            assert _flat(action.help) in _flat(shown.stdout), (path, action.dest)
            seen += 1
    assert seen >= 20  # every subcommand and option was looked at
    top = aex("--help").stdout
    examples = top[top.index("examples:"):]
    assert 2 <= len(re.findall(r"^  adaptive-exec \w+", examples, re.M)) <= 3


# --- 4: bad arguments are argparse's errors ------------------------------------------------


def test_an_unknown_demo_workload_is_an_error_that_lists_the_names():
    proc = aex("demo", "--only", "tiny", "no_such_workload")
    assert proc.returncode == 2
    assert "== tiny" not in proc.stdout  # nothing ran
    assert "usage: adaptive-exec demo" in proc.stderr and "no_such_workload" in proc.stderr
    for name, *_ in DEMOS:
        assert name in proc.stderr


@pytest.mark.parametrize("args, valid", [
    (("calibrate", "--workers", "0"), "must be a positive integer"),
    (("calibrate", "--workers", "-2"), "must be a positive integer"),
    (("calibrate", "--workers", "two"), "must be a positive integer"),
    (("calibrate", "--workers", "100000"), "must be at most"),
    (("demo", "--scale", "0"), "must be a number > 0"),
    (("demo", "--scale", "-0.5"), "must be a number > 0"),
    (("demo", "--scale", "nan"), "must be a number > 0"),
    (("demo", "--scale", "1e12"), "must be a number > 0 and at most 100"),
])
def test_out_of_range_numbers_are_errors_that_say_what_is_valid(args, valid):
    proc = aex(*args)
    assert proc.returncode == 2, proc.stdout
    assert proc.stdout == ""  # nothing was measured or run
    assert f"usage: adaptive-exec {args[0]}" in proc.stderr
    assert f"argument {args[1]}: {valid}" in proc.stderr
    assert f"(got '{args[2]}')" in proc.stderr


# --- 5: cache show finds one function, or says why not ---------------------------------------


def _shown(proc: subprocess.CompletedProcess[str]) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    return re.findall(r"^== (\S+)$", proc.stdout, re.M)


def test_cache_show_by_name_prefix_or_fingerprint(filled):
    # An exact name wins over the longer names it begins.
    for query in ("square", "cli_work.square", "cli_work:square"):
        assert _shown(aex("cache", "show", query, cache_dir=filled)) == ["cli_work:square"]
    for query in ("square_r", "cli_work.square_r", "square_root"):
        assert _shown(aex("cache", "show", query, cache_dir=filled)) == \
            ["cli_work:square_root"]
    fingerprint = json.loads(aex("cache", "show", "square_root", "--json",
                                 cache_dir=filled).stdout)[0]["fingerprint"]
    assert _shown(aex("cache", "show", fingerprint[:6], cache_dir=filled)) == \
        ["cli_work:square_root"]


def test_cache_show_lists_the_candidates_when_several_match(filled):
    listed = {e["qualname"]: e["fingerprint"] for q in ("square", "square_root")
              for e in json.loads(aex("cache", "show", q, "--json", cache_dir=filled).stdout)}
    proc = aex("cache", "show", "squ", cache_dir=filled)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "longer name" in proc.stderr and "fingerprint" in proc.stderr
    for qualname, fingerprint in listed.items():
        line = rf"^ +{fingerprint[:12]} +cli_work +{qualname}$"
        assert re.search(line, proc.stderr, re.M), proc.stderr


def test_cache_show_says_when_nothing_matches(filled, tmp_path):
    proc = aex("cache", "show", "no_such_function", cache_dir=filled)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "no cache entry matches 'no_such_function'" in proc.stderr
    assert "square" in proc.stderr and "square_root" in proc.stderr  # a few known names
    empty = aex("cache", "show", "square", cache_dir=tmp_path / "empty")
    assert empty.returncode == 2 and "empty" in empty.stderr
    # A cache that cannot be read is not the user's mistake: exit status 1.
    (tmp_path / "unreadable" / cache.FILENAME).mkdir(parents=True)
    broken = aex("cache", "show", "square", cache_dir=tmp_path / "unreadable")
    assert broken.returncode == 1 and "cannot read the cache" in broken.stderr


# --- 6: readable text for people, JSON for scripts -----------------------------------------


def test_cache_stats_for_people_and_for_scripts(filled):
    people = aex("cache", "stats", cache_dir=filled)
    assert people.returncode == 0, people.stderr
    assert "{" not in people.stdout and "True" not in people.stdout
    facts = rows(people.stdout)
    data = json.loads(aex("cache", "stats", "--json", cache_dir=filled).stdout)
    assert data["entries"] == 2 and isinstance(data["size_bytes"], int)
    assert facts["entries"] == "2"
    assert facts["exists"] == "yes"
    assert facts["size"] == fmt_bytes(data["size_bytes"])
    assert re.fullmatch(r"\d+(\.\d)? (B|KB|MB|GB)", facts["size"])
    for label in ("least recently used", "most recently used"):
        assert re.fullmatch(DATE, facts[label]), label
    assert facts["file"] == data["path"] == str(filled / cache.FILENAME)


def test_cache_show_for_people_and_for_scripts(filled):
    people = aex("cache", "show", "square_root", cache_dir=filled)
    assert people.returncode == 0, people.stderr
    facts = rows(people.stdout, indent="  ")
    (entry,) = json.loads(aex("cache", "show", "square_root", "--json",
                              cache_dir=filled).stdout)
    assert set(entry["features"]) == set(cache_schema.FEATURE_COLUMNS)
    assert entry["qualname"] == "square_root" and entry["module"] == "cli_work"
    f = entry["features"]
    assert facts["fingerprint"] == entry["fingerprint"]
    assert facts["time per item"] == fmt_s(f["mean_s"])
    assert re.fullmatch(r"[\d.]+ (ns|µs|ms|s)", facts["time per item"])
    assert facts["result size, pickled"] == fmt_bytes(f["pickle_size"])
    assert facts["picklable"] == "yes"
    for label in ("first measured", "last measured", "last used"):
        assert re.fullmatch(DATE, facts[label]), label
    assert not re.search(r"\de-\d|True|False|None", people.stdout)  # no raw values
    for run in entry["runs"]:  # the history in the same units
        est, act = (re.escape(fmt_s(run[k])) for k in ("estimated_s", "actual_s"))
        assert re.search(rf"^    {DATE} +{run['n_items']} +{run['mode']} .* {est} +{act} ",
                         people.stdout, re.M), people.stdout


def test_cache_clear_that_cannot_clear_says_so_and_fails(filled, tmp_path):
    # Another process held the write lock past the busy timeout: "cleared 0 entries",
    # exit 0, and both entries still there.
    import shutil
    import sqlite3

    copy = tmp_path / "cache"
    shutil.copytree(filled, copy)
    holder = sqlite3.connect(str(copy / cache.FILENAME), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held
        blocked = aex("cache", "clear", cache_dir=copy)
        assert blocked.returncode == 1, blocked.stdout + blocked.stderr
        assert "cannot clear the cache" in blocked.stderr and "cleared" not in blocked.stdout
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    assert json.loads(aex("cache", "stats", "--json", cache_dir=copy).stdout)["entries"] == 2
    done = aex("cache", "clear", cache_dir=copy)
    assert done.returncode == 0 and "cleared 2 entries" in done.stdout, done.stderr


def test_the_demo_names_the_items_that_ran(tmp_path):
    # With --scale 0.3 it said "x 100 items" where 30 ran (a hunting helper's finding).
    proc = aex("demo", "--only", "heavy", "--scale", "0.3", cache_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "== heavy: ~20 ms of CPU x 30 items" in proc.stdout, proc.stdout
    assert "same results" in proc.stdout


def test_cache_list_of_a_cache_that_cannot_be_read_is_not_empty(tmp_path):
    # It said "the cache is empty" with exit status 0, where show says it cannot read it.
    (tmp_path / "unreadable" / cache.FILENAME).mkdir(parents=True)
    proc = aex("cache", "list", cache_dir=tmp_path / "unreadable")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "cannot read the cache" in proc.stderr
    assert "empty" not in proc.stdout
    fresh = aex("cache", "list", cache_dir=tmp_path / "none")  # no file yet: empty, 0
    assert fresh.returncode == 0 and "empty" in fresh.stdout
