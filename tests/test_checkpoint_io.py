"""Training outputs replaced whole: Lightning checkpoints (AtomicCheckpointIO) and the peft adapter (save_adapter)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from rega.modules.checkpoint_io import AtomicCheckpointIO


def test_a_checkpoint_killed_mid_write_leaves_the_previous_one_and_nothing_in_tmpdir(tmp_path):
    target, tmpdir = tmp_path / "last.ckpt", tmp_path / "tmpdir"
    tmpdir.mkdir()
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    script = textwrap.dedent(f"""
        import os, torch
        from rega.modules.checkpoint_io import AtomicCheckpointIO
        def dies_midway(obj, handle):
            handle.write(b"partial checkpoint bytes"); handle.flush(); os._exit(9)
        torch.save = dies_midway
        AtomicCheckpointIO().save_checkpoint({{"step": 2}}, {str(target)!r})
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], env={"TMPDIR": str(tmpdir), "PATH": ""}, timeout=120
    )
    assert done.returncode == 9
    assert torch.load(target, weights_only=True) == {"step": 1}  # the previous checkpoint, whole
    assert not [p for p in tmpdir.iterdir() if p.is_file()]  # (torch keeps a compiler cache folder there)
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1  # the dead writer's file sits beside the target, where the next save looks

    AtomicCheckpointIO().save_checkpoint({"step": 3}, target)
    assert torch.load(target, weights_only=True) == {"step": 3}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint({}, target, storage_options={"x": 1})


def test_adapter_save_that_fails_keeps_the_previous_adapter(tiny_model_config, tmp_path):
    from rega.modules.lit_module import REGAModule, save_adapter

    module = REGAModule(model=tiny_model_config)
    module.configure_model()
    target = tmp_path / "adapter"
    save_adapter(module.model, module.tokenizer, target)
    before = sorted(p.name for p in target.iterdir())
    assert "adapter_config.json" in before and "adapter_model.safetensors" in before

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_adapter(module.model, Broken(), target)  # weights written, tokenizer fails: nothing replaced
    assert sorted(p.name for p in target.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name != "adapter"]


def test_the_cli_trainer_writes_checkpoints_atomically(tiny_model_dir, tmp_path):
    from rega.lightning_cli import REGACLI, TRAINER_DEFAULTS, REGADataModule, REGAModule

    cli = REGACLI(
        REGAModule, REGADataModule, run=False,
        args=["--config", "tests/configs/tiny_fit.yaml", "--model.model.name_or_path", str(tiny_model_dir),
              "--trainer.default_root_dir", str(tmp_path), "--data.cache", str(tmp_path)],
        trainer_defaults=TRAINER_DEFAULTS,
    )  # fmt: skip
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


KILLED_SAVE = """
import sys, time, torch
from rega.modules.checkpoint_io import AtomicCheckpointIO
def stalls_midway(obj, handle):
    handle.write(b"partial checkpoint bytes"); handle.flush(); print("writing", flush=True); time.sleep(60)
torch.save = stalls_midway
AtomicCheckpointIO().save_checkpoint({"step": 4}, sys.argv[1])
"""


def test_a_sigkilled_save_is_cleaned_by_the_next_run_in_any_version(tmp_path):
    """A step-named checkpoint is never written again and a resume writes into a new version folder: the next
    run's first save still removes what the killed one left, and leaves a live writer's file alone."""
    import os
    import signal

    from rega.io import HOST

    old, new = tmp_path / "rega/version_0/checkpoints", tmp_path / "rega/version_1/checkpoints"
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, str(old / "epoch=0-step=4.ckpt")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    (left,) = [p for p in old.iterdir() if p.name.startswith(".epoch=0-step=4.ckpt.~")]
    live = old / f".other.ckpt.~{HOST}~{os.getppid()}~x.tmp"
    live.write_text("being written")

    AtomicCheckpointIO().save_checkpoint({"step": 5}, new / "last.ckpt")
    assert not left.exists() and live.exists()
    assert torch.load(new / "last.ckpt", weights_only=True) == {"step": 5}
