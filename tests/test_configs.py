"""Every YAML under configs/ parses with the command it belongs to (no model is loaded, nothing runs)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from rega.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BASE = [str(CONFIGS / "model/embedded.yaml"), str(CONFIGS / "trainer/cpu.yaml")]


def print_config(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code in (0, None), out.getvalue()
    return out.getvalue()


def command_for(path: Path) -> list[str]:
    """The command line that parses ``path``; fit configs are layered on the embedded model and CPU trainer."""
    group = path.relative_to(CONFIGS).parts[0]
    if group in ("model", "trainer", "experiment"):
        layers = [*BASE, str(path)] if str(path) not in BASE else BASE
        return ["fit", *[arg for layer in layers for arg in ("--config", layer)], "--print_config"]
    if group == "distill":  # a distill file is the DistillConfig itself, so a fit's data.distill can name it
        return ["distill", "--distill", str(path), "--print_config"]
    command = {"data": "corpus", "eval": "evaluate", "grid": "grid"}[group]
    return [command, "--config", str(path), "--print_config"]


ALL = sorted(p for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("judge_"))


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses(path):
    printed = print_config(command_for(path))
    assert printed.strip()


def test_judge_configs_load():
    from rega.eval.judge import load_judge_config

    for path in CONFIGS.glob("eval/judge_*.yaml"):
        config = load_judge_config(path)
        assert config.model and config.base_url


def test_experiment_files_start_with_their_command():
    for path in CONFIGS.rglob("*.yaml"):
        if path.parts[-2] in ("experiment", "distill") or path.parent.name == "grid":
            first = path.read_text().splitlines()[0]
            assert first.startswith("# python cli.py ") or first.startswith("# rega "), path


def test_overriding_a_layer_wins():
    printed = print_config(
        ["fit", "--config", BASE[0], "--config", BASE[1], "--trainer.max_epochs", "5", "--print_config"]
    )
    assert "max_epochs: 5" in printed


def test_plugin_strategy_runs_through_the_cli(tmp_path, monkeypatch):
    """The README's worked example: a strategy registered in a plugin module, selected by name from a config."""
    import json
    import sys

    from rega.data.strategies import STRATEGIES

    (tmp_path / "my_strategies.py").write_text(
        "from rega.data.prompts import CENTRAL\n"
        "from rega.data.strategies import DOMAIN, GENERAL_KIND, ROLE, as_examples, register_strategy\n"
        "@register_strategy('rega_no_ri', needs_general=True, inference=(CENTRAL, ROLE))\n"
        "def rega_no_ri(inputs):\n"
        "    return (as_examples(inputs.general_records, CENTRAL, inputs.prompts, GENERAL_KIND)\n"
        "            + as_examples(inputs.domain_records, ROLE, inputs.prompts, DOMAIN))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("REGA_PLUGINS", "my_strategies")
    try:
        main([
            "corpus", "--corpus.strategy", "rega_no_ri", "--corpus.prompts.central", "You are helpful.",
            "--corpus.domains", '[{"path": "demo:legal.jsonl"}]',
            "--corpus.general", '[{"path": "demo:general.jsonl", "domain": "general"}]',
            "--output", str(tmp_path / "out"),
        ])  # fmt: skip
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert manifest["strategy"] == "rega_no_ri"
        assert manifest["counts"]["by_kind"] == {"general": 80, "domain": 40}
    finally:
        STRATEGIES.pop("rega_no_ri", None)
        sys.modules.pop("my_strategies", None)
