"""Command line entry point: ``actrain <command>``.

User mistakes (bad flags, missing folders, broken files) print one line naming the problem
and exit with code 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import os
import sys
from collections.abc import Sequence

from actrain import malloc
from actrain.commands import COMMANDS
from actrain.errors import EXIT_USAGE, TrainingStopped, UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line (argparse prints the whole usage block first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="actrain",
        description="Adversarial Concurrent Training and its baselines.",
        epilog=(
            "environment: ACTRAIN_DATA (where data sets are downloaded; default"
            " ~/.cache/actrain/data), ACTRAIN_MALLOC (auto: restart with jemalloc where the"
            " system has it, about 9 % faster CPU steps; system; or a malloc library's path),"
            " ACTRAIN_KEEP_FREED_MEMORY=0 (let glibc hand freed memory back), ACTRAIN_PROGRESS"
            " (progress bars are drawn when stderr is a terminal; 1: always, 0: never)"
        ),
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"actrain.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"actrain.commands.{name}":
                continue  # command not part of this build
            raise
        module.register(sub)
    return parser


def _unrecognized(parser: argparse.ArgumentParser, command: str | None, extra: list[str]) -> None:
    """argparse's "unrecognized arguments", from the command's parser, with a did-you-mean."""
    target = parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            target = action.choices[command]
    options = [o for a in target._actions for o in a.option_strings if o.startswith("--")]
    flags = [e.split("=", 1)[0] for e in extra if e.startswith("--")]
    close = difflib.get_close_matches(flags[0], options, n=1, cutoff=0.85) if flags else []
    hint = f"; did you mean {close[0]}?" if close else ""
    target.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the command itself (not a call from Python): jemalloc where found
        try:
            malloc.use_fast_malloc()
        except FileNotFoundError as exc:
            print(f"actrain: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except OSError:
            pass  # the restart failed: go on with the C library's malloc
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra:  # named by the command's own parser ("actrain: error: ... see actrain --help")
        _unrecognized(parser, getattr(ns, "command", None), extra)
    ns.argv = list(sys.argv[1:] if argv is None else argv)  # recorded with results
    if getattr(ns, "version", False):
        from actrain import __version__

        print(__version__)
        return 0
    if ns.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return ns.func(ns)  # (a torchrun worker leaves its group in entry())
    except UserError as exc:
        # the message as written: quotes are part of it ("unknown loss 'x'"); several lines
        # (a wrapped cause) become one
        msg = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        if os.environ.get("RANK", "0") == "0":  # under torchrun: once, not once per process
            print(f"actrain {ns.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingStopped as exc:
        print(f"actrain {ns.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"actrain {ns.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `actrain eval ... | head -1`: the reader has what it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for SIGPIPE
    except OSError as exc:  # a file the command reads or writes (full disk, permissions, ...)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"actrain {ns.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())


def entry() -> None:
    """``actrain`` and ``python -m actrain``: :func:`main`, then exit with its code; a torchrun
    worker leaves without the interpreter's teardown (:func:`actrain.distributed.leave`)."""
    rc = main()
    # Only a module that imported in full: Ctrl-C during `import torch` leaves parts of torch
    # in sys.modules, and importing it again there ended "interrupted" with a traceback.
    distributed = sys.modules.get("actrain.distributed")
    if distributed is not None and distributed.launched():
        distributed.leave(rc)
    raise SystemExit(rc)
