"""adaptive-exec (or python -m adaptive_exec) demo | calibrate | cache ...: the arguments,
and the demo's and calibration's reports (what ``cache list|show|stats`` prints is
``cache_views``'s).

Bad arguments are argparse's errors (the usage line, exit status 2), as in pip or any
other argparse tool, and so is a ``cache show`` name that matches no entry or several;
exit status 1 is kept for a run that went wrong (a cache that cannot be read)."""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from typing import Callable, Optional, TextIO

from . import __version__, api, calibration
from .api import ParallelFunction
from .demo_workloads import DEMOS

PROG = "adaptive-exec"  # also under ``python -m``, where argparse would say "__main__.py"
DEMO_NAMES = [name for name, *_ in DEMOS]
EPILOG = f"""examples:
  {PROG} demo --only tiny heavy --scale 0.5   two workloads at half size
  {PROG} calibrate --workers 4                measure a pool of 4 workers
  {PROG} cache show my_function               what was measured about my_function
"""


def _demo(args: argparse.Namespace) -> int:
    print("adaptive_exec demo: each workload runs as a plain loop, then through "
          "adaptive_map, and the results are compared.\n")
    for name, func, make_items, blurb in DEMOS:
        if args.only and name not in args.only:
            continue
        items = make_items(args.scale)
        # Short workloads are timed best of three, alternating, so that neither side is
        # charged for the first growth of the heap; long ones once (pool start-up counts).
        # Each timed result is freed before the other side runs: a 300k-item list still
        # alive makes the next one allocate fresh memory, a 20% handicap on tiny.
        expected = [func(x) for x in items]  # untimed, alive during both timings alike
        loop_s = ours_s = float("inf")
        same = True
        for _ in range(3):
            t0 = time.perf_counter()
            timed = [func(x) for x in items]
            loop_s = min(loop_s, time.perf_counter() - t0)
            del timed
            pf = ParallelFunction(func)
            t0 = time.perf_counter()
            got = pf.map(items)
            ours_s = min(ours_s, time.perf_counter() - t0)
            same = same and got == expected
            del got
            if loop_s > 0.2:
                break
        report = pf.last_report
        assert report is not None
        plan = report.plan
        status = "same results" if same else "RESULTS DIFFER"
        print(f"== {name}: {blurb.format(n=len(items))}")  # (--scale: the items that ran)
        print(f"   plan:    {plan.mode}, {plan.n_workers} worker(s), chunks of {plan.chunksize}")
        print(f"   why:     {plan.reason}")
        # What ran, where it was not the plan (items run in the caller, chunks resized).
        for label, said in (("ran", report.ran), ("adjusted", report.adjusted)):
            if said:
                print(f"   {label + ':':<9}{said}")
        print(f"   loop {loop_s:.3f} s, adaptive_exec {ours_s:.3f} s: "
              f"speedup {loop_s / ours_s:.2f}x ({status})\n")
        if not same:
            return 1
    from . import cache_views as views

    views.print_rows([("calibration", ""),
                      *views.calibration_rows(calibration.get().to_dict(), indent="  ")])
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from . import cache_views as views  # the rows ``cache stats`` shows a calibration in

    views.print_rows(views.calibration_rows(api.calibrate(args.workers).to_dict()))
    # api.calibrate keeps the constants for its process only (a map saves them as it
    # ends); this process ends now, and the point of running it was the next ones.
    calibration.save()
    return 0


def _cache(args: argparse.Namespace) -> int:
    from . import cache as store
    from . import cache_views as views

    action = args.action  # argparse has checked its arguments: only show takes one
    if action == "path":
        print(store.path())
        return 0
    try:
        if action == "clear":
            n = store.clear()
            if n is None:
                print(f"cannot clear the cache at {store.path()}: it is locked by another "
                      f"process, or cannot be written here ({store.status()}); nothing "
                      "was removed", file=sys.stderr)
                return 1
            print(f"cleared {n} entries from {store.path()}")
            return 0
        if action == "stats":
            return views.print_stats(as_json=args.json)
        if action == "list":
            return views.print_list()
        return views.print_show(args.target, as_json=args.json)
    except Exception as exc:
        print(f"cannot read the cache at {store.path()}: {exc}", file=sys.stderr)
        return 1


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written; subcommands' help in one column."""

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        # argparse measures a subcommand's name without the indent it is printed with,
        # so the help of a long one ("calibrate") went onto a line of its own.
        if action.help is not argparse.SUPPRESS:
            for subaction in self._iter_indented_subactions(action):
                width = len(self._format_action_invocation(subaction)) + self._current_indent
                self._action_max_length = max(self._action_max_length, width)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {text!r})")
    return value


def _worker_count(text: str) -> int:
    from .system import usable_cpus

    value, most = _positive_int(text), usable_cpus()
    if value > most:
        raise argparse.ArgumentTypeError(
            f"must be at most {most}, the CPUs this process may use (got {text!r})")
    return value


# The demo's workloads at 100x take minutes and a few GB; more is a typo, not a demo.
MAX_SCALE = 100.0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value <= MAX_SCALE):  # nan fails this too
        raise argparse.ArgumentTypeError(
            f"must be a number > 0 and at most {MAX_SCALE:g} (got {text!r})")
    return value


def _add_demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo", help="run built-in workloads, show the plans and speedups",
        description="Run each built-in workload as a plain loop, then through "
                    "adaptive_map; print the plan chosen, why, and the speedup.")
    demo.add_argument("--only", nargs="+", choices=DEMO_NAMES, metavar="NAME",
                      help=f"run only these workloads, of: {', '.join(DEMO_NAMES)}")
    demo.add_argument("--scale", type=_positive_float, default=1.0, metavar="FACTOR",
                      help="multiply each workload's number of items by FACTOR, a number "
                           f"> 0 and at most {MAX_SCALE:g} (default: 1)")
    demo.set_defaults(handler=_demo)


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    cal = sub.add_parser(
        "calibrate", help="measure this machine's pool constants",
        description="Start a fresh worker pool and measure its start-up time, the "
                    "overhead of one task and the cost of sending a byte; they are "
                    "kept in the cache for the plans of later processes.")
    cal.add_argument("--workers", type=_worker_count, default=None, metavar="N",
                     help="the pool size to measure with, from 1 to the CPUs this "
                          "process may use (default: all of them)")
    cal.set_defaults(handler=_calibrate)


def _add_cache(sub: argparse._SubParsersAction) -> None:
    cache = sub.add_parser(
        "cache", help="inspect or clear the persistent feature cache",
        formatter_class=_HelpFormatter,
        description="The cache keeps what was measured about each function, so that its\n"
                    "next map plans without sampling. Without an action: its path.")
    actions = cache.add_subparsers(dest="action", title="actions", metavar="ACTION")
    cache.set_defaults(handler=_cache, action="path", target=None, json=False)
    actions.add_parser("path", help="print the cache file's path",
                       description="Print the cache file's path.")
    actions.add_parser("list", help="one line per cached function, most recently used "
                                    "first", description="List the cached functions.")
    show = actions.add_parser(
        "show", help="everything measured about one function",
        description="Show everything the cache holds about one function: its features "
                    "and its run history.")
    show.add_argument("target", metavar="NAME",
                      help="the function's name (qualname, module.qualname or its last "
                           "part) or a prefix of it, or the first 4 or more characters of "
                           "its fingerprint (see: cache list)")
    show.add_argument("--json", action="store_true",
                      help="print the function's entries (one per machine) as a JSON list")
    stats = actions.add_parser("stats", help="what the cache file holds and its settings",
                               description="Print what the cache file holds, its limits "
                                           "and the calibration stored for this machine.")
    stats.add_argument("--json", action="store_true", help="print the figures as JSON")
    actions.add_parser("clear", help="delete every entry, for every machine",
                       description="Delete every entry and calibration in the cache file.")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, epilog=EPILOG, formatter_class=_HelpFormatter,
        description="adaptive_exec's command line: try it on built-in workloads, measure\n"
                    "this machine, look into what it has learnt.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, title="commands",
                                metavar="COMMAND")
    _add_demo(sub)
    _add_calibrate(sub)
    _add_cache(sub)
    _remember_parsers(parser)
    return parser


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Each parser's defaults name it (a subcommand's override its program's), so that
    the innermost one used is the one that says what is wrong with the arguments."""
    parser.set_defaults(parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _remember_parsers(sub)


def _show_warning(message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: Optional[TextIO] = None, line: Optional[str] = None
                  ) -> None:
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the subcommand's parser, with its usage line, not the program's
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler: Callable[[argparse.Namespace], int] = args.handler
    with warnings.catch_warnings():
        # The library's warnings (a cache it cannot use) are one line for people here,
        # not a source location in __main__.py.
        warnings.showwarning = _show_warning
        return handler(args)
