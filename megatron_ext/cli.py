"""The command-line home: the base class of user mistakes, the one-line-error parser and what the tools share.

Every command line of the project (pretrain_gpt.py, the tools, the ALCF front end) reports a mistake as one
``error: ...`` line with exit status 2 and no traceback. A mistake found after parsing raises a subclass of
:class:`UserError` (ConfigError, DataListError, TokenizerError, CheckpointError, PlatformError, LaunchError,
ConvertError, ...), so each ``main()`` catches one type. This module imports only the standard library: it is the
bottom of the package's import order.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn


class UserError(Exception):
    """A user mistake (a flag, a variable, a file given): the message is one line naming it and what is expected.

    Subclasses keep their historical builtin base too (``ValueError`` or ``RuntimeError``) for callers that
    catch those."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a mistake in one line (no usage dump) and exits with status 2.

    The line points at ``PROG --help`` when the parser was given a ``prog`` (argv[0] is not a name a user typed
    when a tool runs as a module or inside another program), else at ``--help``. Prefix abbreviations are off
    (``allow_abbrev=False``): a mistyped or foreign flag is an error, never bound to the flag it starts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        prog = kwargs.get("prog", args[0] if args else None)
        self._help_hint = f"{prog} --help" if prog else "--help"

    def parse_known_args(  # type: ignore[override]  # the same call; typeshed's overloads need not be repeated
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._argv = list(sys.argv[1:] if args is None else args)  # for error(): argparse does not pass them on
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}{self._negative_value_hint(message)} (see {self._help_hint})\n")

    def _negative_value_hint(self, message: str) -> str:
        """argparse reads `--lr -1e-3` as two flags (only values like -1 or -.5 pass as numbers): name the = form."""
        m = re.fullmatch(r"argument (\S+): expected one argument", message)
        argv = getattr(self, "_argv", [])
        for flag, value in zip(argv, argv[1:]):
            if m and flag in m.group(1).split("/") and re.fullmatch(r"-[0-9.]+(?:[eE][+-]?[0-9]+)?[a-zA-Z]?", value):
                return f"; a negative value is written {flag}={value}"
        return ""


def report(error: UserError | OSError) -> int:
    """Prints a user mistake as the one ``error:`` line on stderr; returns the exit status 2."""
    if isinstance(error, OSError):
        print(f"error: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
    else:
        print(f"error: {error}", file=sys.stderr)
    return 2


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (megatron-core's checkpoint errors run to many lines)."""
    lines = [s.strip() for s in str(error).splitlines() if s.strip()]
    return lines[0] if lines else type(error).__name__


def os_reason(error: OSError) -> str:
    """An OSError's cause in words, without its file name: 'no space left on device', 'read-only file system'."""
    text = error.strerror or (os.strerror(error.errno) if error.errno else str(error))
    return text[:1].lower() + text[1:]


def run_tool(run: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Runs a tool's ``run(argv)``; a user mistake (or an unreadable file) ends in one ``error:`` line and exit
    status 2, also when called in-process (a bad flag returns argparse's status instead of exiting)."""
    try:
        return run(argv)
    except (UserError, OSError) as e:
        return report(e)
    except SystemExit as e:  # a bad flag (its line is printed) or --help
        return e.code if isinstance(e.code, int) else 2


def check_image_path(flag: str, path: str | os.PathLike[str]) -> None:
    """A plot's output must be a file name whose extension matplotlib writes (checked before any work)."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    ext = os.path.splitext(str(path))[1].lstrip(".").lower()
    if os.path.isdir(path) or ext not in formats:
        raise UserError(f"{flag} {path}: expected an image file name ending in .png, .pdf, .svg, ...")


def human_bytes(n: float) -> str:
    """A size as people read it (3 significant digits, decimal units): 460 kB, not 0.00 GB."""
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f} B"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned text table: first column left-aligned, the numbers right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
