"""What the torchtitan writers of both releases share (no torchtitan import here: each release's
writer runs with only its own torchtitan installed): the random token samples, the train state
torchtitan's Trainer saves, and the end of a rank."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset


class RandomTokens(IterableDataset):
    """(``{"input": tokens[:-1]}``, ``tokens[1:]``) samples, as torchtitan's text datasets yield them."""

    def __init__(self, seed: int, vocab: int, seq: int) -> None:
        self.seed, self.vocab, self.seq = seed, vocab, seq

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            ids = torch.randint(0, self.vocab, (self.seq + 1,), generator=gen)
            yield {"input": ids[:-1]}, ids[1:]


class TrainState(Stateful):
    """What torchtitan's Trainer saves as ``train_state``."""

    def __init__(self) -> None:
        self.step, self.ntokens_seen = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step, self.ntokens_seen = state_dict["step"], state_dict["ntokens_seen"]


def exit_now() -> None:
    """End the rank once every output is written and the process group is destroyed: no
    interpreter teardown. A thread a framework's components leave behind (a data loader's, a
    checkpointer's) was once still joinable at exit, and the C++ runtime aborted the rank
    ("terminate called without an active exception", exit -6) after the work was done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
