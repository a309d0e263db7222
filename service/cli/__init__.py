"""The ``layertrack`` command line.

    layertrack score PATH_OR_URI [--max-tokens N] [--seq-len N] [--json] ...   score here
    layertrack up [--roots DIR ...]                                            run the service
    layertrack submit RUN STEP PATH_OR_URI [--wait]                            use the service
    layertrack watch LOCATION --run RUN [--once]                               follow a training run
    layertrack backfill LOCATION --run RUN [--revisions GLOB] [--dry-run]      submit an existing series
    layertrack demo                                                            the paper's dynamics

Modules: ``parser`` (every option), ``local`` (score, demo: compute on this machine),
``remote`` (commands that call the API), ``series`` (watch and backfill: list a directory,
a prefix or Hub revisions here, submit through the API), ``admin`` (tokens, migrations: the database),
``up`` (the service's processes). This package imports no torch: commands that need the
compute side import it when they run.

Every failure ends as one line on stderr, ``error: <what to do>``, and a non-zero exit
(2: usage, 3: refused input or service, 1: a job failed or timed out); an unexpected one
too, unless LAYERTRACK_DEBUG=1 asks for the traceback.

Output piped into a reader that stops early (``layertrack trend RUN | head``) ends quietly
with exit code 141 (128 + SIGPIPE, as the shell reports ``yes | head``), no traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

from .common import EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_USAGE, CliError, one_line
from .parser import build_parser

__all__ = ["CliError", "build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # --help prints, then exits
        func = getattr(args, "func", None)
        if func is None:  # no command (or a command group without its action): the list, not a traceback
            args.help_parser.print_help()
            sys.stdout.flush()
            return EXIT_USAGE
    except BrokenPipeError:
        return _reader_gone()
    try:
        code = func(args)
        sys.stdout.flush()  # here, not at exit: a reader that went away is a BrokenPipeError we can catch
        return code
    except BrokenPipeError:
        return _reader_gone()
    except CliError as e:
        print(f"error: {one_line(e.message)}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:
        if os.environ.get("LAYERTRACK_DEBUG"):
            raise
        from ..settings import describe_settings_error

        refused = describe_settings_error(e)  # a LAYERTRACK_ variable the settings refuse: the user's input
        if refused:
            print(f"error: {one_line(refused)}", file=sys.stderr)
            return EXIT_INPUT
        print(f"error: unexpected {type(e).__name__}: {one_line(e)} (LAYERTRACK_DEBUG=1 shows the traceback; "
              "please report it)", file=sys.stderr)
        return EXIT_FAILED


#: the exit code when stdout's reader went away (128 + SIGPIPE)
EXIT_PIPE = 141


def _reader_gone() -> int:
    """stdout's pipe was closed by its reader: point stdout at /dev/null, so that the
    interpreter's final flush of what is still buffered fails no more, and exit quietly."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_PIPE
