from __future__ import annotations

import pytest

from tiny_models import build_checkpoint, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer):
    """Build (once per session) a tiny checkpoint per family; returns family -> path."""
    made: dict[str, object] = {}
    root = tmp_path_factory.mktemp("ckpt")

    def get(family: str):
        if family not in made:
            made[family] = build_checkpoint(root / family, family, tokenizer)
        return made[family]

    return get
