"""TinkerBackend says plainly that it cannot fork checkpoints, under both names, and what to do instead."""

from __future__ import annotations

import pytest

import art_core as art
from art_tinker import TinkerBackend


async def test_fork_checkpoint_is_not_supported_and_names_the_alternative() -> None:
    backend = TinkerBackend(api_key="key")
    model = art.TrainableModel(name="b", project="p", base_model="m")
    try:
        for fork in (backend.fork_checkpoint, backend._experimental_fork_checkpoint):
            with pytest.raises(NotImplementedError, match=r"p/a into 'b'.*LocalBackend.fork_checkpoint"):
                await fork(model, from_model="a", not_after_step=3)
    finally:
        await backend.close()
