"""A resume never changes what was asked for (a checkpoint's other settings stop the run, one line per field,
unless ``--resume_settings checkpoint``), and a checkpoint that cannot be read ends in one line naming it."""

from __future__ import annotations

import subprocess
import zipfile

import pytest
import torch
from cluster_helpers import fit_args, run_env

from rega.cli import main
from rega.modules.resume import SETTINGS_KEY


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """(fit arguments, last.ckpt) of a two-step fit of the tiny model."""
    root = tmp_path_factory.mktemp("resume")
    args = fit_args(tiny_model_dir, root, "--trainer.max_steps", "2", "--trainer.max_epochs", "1")
    done = subprocess.run(args, env=run_env(), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return args[2:], next(root.rglob("last.ckpt"))


def refused(capsys, argv: list[str]) -> list[str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def parsed_config(monkeypatch, argv: list[str]):
    """The config a fit would instantiate, after the checkpoint check (nothing is loaded)."""
    from rega.lightning_cli import REGACLI, run_lightning_cli

    class Parsed(Exception):
        pass

    def stop(cli):
        raise Parsed(cli.config)

    monkeypatch.setattr(REGACLI, "before_instantiate_classes", stop)
    with pytest.raises(Parsed) as parsed:
        run_lightning_cli(argv)
    return parsed.value.args[0].fit


def test_a_checkpoint_records_the_data_settings(trained):
    _, checkpoint = trained
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    assert state[SETTINGS_KEY]["max_length"] == 192
    assert state[SETTINGS_KEY]["corpus"]["strategy"] == "rega"
    assert state["hyper_parameters"]["lora"]["r"] == 16


@pytest.mark.parametrize(
    "option, line",
    [
        (["--model.lora.r", "4"], "model.lora.r is 4 here and 16 in the checkpoint"),
        (["--model.model.name_or_path", "embedded"], "model.model.name_or_path is embedded here and "),
        (["--data.corpus.strategy", "ftrp"], "data.corpus.strategy is ftrp here and rega in the checkpoint"),
        (["--data.max_length", "128"], "data.max_length is 128 here and 192 in the checkpoint"),
    ],
)
def test_a_resume_with_other_settings_is_refused_field_by_field(trained, capsys, option, line):
    args, checkpoint = trained
    lines = refused(capsys, [*args, *option, "--ckpt_path", str(checkpoint)])
    assert lines[0] == f"error: --ckpt_path {checkpoint}: {line}" or lines[0].startswith(
        f"error: --ckpt_path {checkpoint}: {line}"
    )
    assert len(lines) == 2 and "--resume_settings checkpoint" in lines[1]


def test_resume_settings_checkpoint_takes_the_checkpoints(trained, monkeypatch):
    args, checkpoint = trained
    asked = [*args, "--model.lora.r", "4", "--data.max_length", "128", "--ckpt_path", str(checkpoint)]
    config = parsed_config(monkeypatch, [*asked, "--resume_settings", "checkpoint"])
    assert config.model.lora.r == 16 and config.data.max_length == 192


def test_the_seed_is_checked_and_taken_through_seed_everything(trained, capsys, monkeypatch):
    """The module's and the data's seeds are linked from seed_everything: a checkpoint's are taken through it."""
    args, checkpoint = trained
    lines = refused(capsys, [*args, "--seed_everything", "7", "--ckpt_path", str(checkpoint)])
    assert lines[:2] == [
        f"error: --ckpt_path {checkpoint}: model.seed is 7 here and 1234 in the checkpoint",
        f"error: --ckpt_path {checkpoint}: data.seed is 7 here and 1234 in the checkpoint",
    ]
    take = ["--resume_settings", "checkpoint"]
    config = parsed_config(
        monkeypatch, [*args, "--seed_everything", "7", "--ckpt_path", str(checkpoint), *take]
    )
    assert config.seed_everything == config.model.seed == config.data.seed == 1234


def test_a_resume_with_the_same_settings_goes_on(trained, monkeypatch):
    args, checkpoint = trained
    config = parsed_config(
        monkeypatch, [*args, "--model.compile_layers", "true", "--ckpt_path", str(checkpoint)]
    )
    assert config.model.compile_layers and config.data.max_length == 192  # how a step runs is not a setting


def unreadable_files(checkpoint, tmp_path):
    data = checkpoint.read_bytes()
    (tmp_path / "torn.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.ckpt").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    with zipfile.ZipFile(tmp_path / "other.ckpt", "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    return {
        "torn.ckpt": "truncated or damaged",
        "garbage.ckpt": "not a PyTorch file",
        "empty.ckpt": "empty",
        "tensor.ckpt": "made by another program (it holds a Tensor)",
        "other.ckpt": "a zip archive but not a PyTorch checkpoint",
    }


def test_an_unreadable_checkpoint_ends_in_one_line_naming_it(trained, capsys, tmp_path):
    args, checkpoint = trained
    for name, problem in unreadable_files(checkpoint, tmp_path).items():
        lines = refused(capsys, [*args, "--ckpt_path", str(tmp_path / name)])
        assert len(lines) == 1 and str(tmp_path / name) in lines[0] and problem in lines[0], lines
        assert "weights_only" not in lines[0]
    assert "no such file" in refused(capsys, [*args, "--ckpt_path", str(tmp_path / "missing.ckpt")])[0]


def test_a_setting_added_since_the_checkpoint_is_no_difference_while_unset():
    """A checkpoint written before corpus.prompts.write existed trained without it: unset, it differs in nothing;
    set, it does."""
    from rega.modules.resume import differences

    then = {"data": {"corpus": {"prompts": {"lang": "en", "file": None}}}}
    now = {"data": {"corpus": {"prompts": {"lang": "en", "file": None, "write": None}}}}
    assert differences(now, then) == []
    now["data"]["corpus"]["prompts"]["write"] = {"k": 8}
    assert differences(now, then) == ["data.corpus.prompts.write is {'k': 8} here and absent in the other"]
