"""Checkpoints written atomically beside their target.

Lightning's default writer stages a checkpoint in ``$TMPDIR`` and moves it into place: a kill leaves a
checkpoint-sized file there that nothing removes, and when ``$TMPDIR`` is another filesystem the move is a copy.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from rega.io import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write into a temporary file beside the checkpoint and rename it (:func:`rega.io.atomic_write`): a kill
    leaves the previous checkpoint whole, and the next save removes the dead writer's temporary file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        with atomic_write(path, "wb") as handle:
            torch.save(checkpoint, handle)
