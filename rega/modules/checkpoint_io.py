"""Checkpoints written atomically beside their target.

Lightning's default writer stages a checkpoint in ``$TMPDIR`` and moves it into place: a kill leaves a
checkpoint-sized file there that nothing removes, and when ``$TMPDIR`` is another filesystem the move is a copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from rega.io import atomic_write, remove_stale_temps_in


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write into a temporary file beside the checkpoint and rename it (:func:`rega.io.atomic_write`): a kill
    leaves the previous checkpoint whole, and the next save removes the dead writer's temporary file, in this
    run's checkpoint folder and in those of the run's other versions (a resume writes into a new version)."""

    def __init__(self) -> None:
        super().__init__()
        self._cleaned: set[Path] = set()  # folders already rid of dead writers' temporary files

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if Path(path).parent not in self._cleaned:
            self._cleaned.add(Path(path).parent)
            for folder in run_checkpoint_folders(Path(path).parent):
                remove_stale_temps_in(folder)
        with atomic_write(path, "wb") as handle:
            torch.save(checkpoint, handle)


def run_checkpoint_folders(folder: Path) -> list[Path]:
    """``folder`` and, in Lightning's layout (``NAME/version_N/checkpoints``), the checkpoint folders of the
    run's other versions."""
    if folder.name != "checkpoints" or not folder.parent.name.startswith("version_"):
        return [folder]
    return [folder, *(p for p in folder.parent.parent.glob("version_*/checkpoints") if p != folder)]
