"""What every command module shares: exit codes, the one-line error, number formatting."""

from __future__ import annotations

import contextlib
import math
import signal
from typing import Any

from layertrack.workers.vocabulary import SCORE_OPTION_DEFAULTS, SCORE_OPTIONS

#: a job failed or did not finish in time; spooled submissions are left
EXIT_FAILED = 1
#: the command line is wrong (argparse's own code)
EXIT_USAGE = 2
#: the input or the service refused: a bad checkpoint, an API error, no database, no service
EXIT_INPUT = 3
#: interrupted with Ctrl-C
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure the user can act on. ``main`` prints ``error: <message>`` as one line on
    stderr (no traceback) and exits with ``code``; the message says what to do."""

    def __init__(self, message: str, code: int = EXIT_INPUT):
        super().__init__(message)
        self.message = message
        self.code = code


def score_options(args: Any) -> dict[str, Any]:
    """The job config of a submission's options (``--max-tokens`` ... one per SCORE_OPTIONS
    name): only the options given, so the service's defaults apply to the rest."""
    values = {k: getattr(args, k) for k in SCORE_OPTIONS}
    if getattr(args, "compare_to", None) is not None:  # a submission's: not a scoring option of its own
        values["compare_to"] = args.compare_to
    # a switch off by default is given only when on; one whose default is None (dynamics:
    # automatic) is given when set either way
    return {k: v for k, v in values.items()
            if v is not None and not (v is False and SCORE_OPTION_DEFAULTS.get(k) is False)}


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def stop_on_ctrl_c_and_sigterm() -> None:
    """For a command that runs until it is stopped or waits long (watch, up, wait, submit
    --wait, demo): Ctrl-C (SIGINT) and SIGTERM both raise KeyboardInterrupt in the main
    thread, however the command was started, and the command stops cleanly (its ``finally``
    blocks stop what it started). A shell without job control (a script, CI) starts a
    background command (``cmd &``) with SIGINT ignored, and exec keeps it ignored: without
    this, such a command would never see Ctrl-C or ``kill -INT``."""
    with contextlib.suppress(ValueError):  # not the main thread (a command run in a thread)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines too) folded into one space."""
    return " ".join(str(text).split())


def fmt(value: float | None, width: int = 10) -> str:
    """A score right-aligned in ``width`` characters; ``-`` for a missing or undefined one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    return f"{value:{width}.6f}"


def finite(value: Any) -> Any:
    """JSON has no NaN: an undefined score (a block that does nothing) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
