"""The end of a framework writer's rank, once every output is written and the process group
is destroyed: no interpreter teardown. A thread a framework's components leave behind (a data
loader's, a checkpointer's) was once still joinable at exit, and the C++ runtime aborted the
rank ("terminate called without an active exception", exit -6) after the work was done."""

from __future__ import annotations

import os
import sys


def exit_now() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
