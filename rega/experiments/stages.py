"""The command lines of a grid run's stages (each runs in its own process, its output in a log file): rewrite
(SDFT), fit, merge (one LoRA per domain) and evaluate; and the domains a run holding some out trains on."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from rega.data.prompts import CENTRAL, read_prompts_file
from rega.data.strategies import ROLE, get_strategy
from rega.errors import ConfigError
from rega.paths import REPO_ROOT, resolve_path

# Stages that measure domain tasks only (held-out domains): general measures off.
GENERAL_OFF = ("--general_mc", "[]", "--drift", "[]", "--general_gen", "[]")


def cli_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "cli.py"), *args]


def module_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def fit_configs(grid, run) -> list[str]:
    return [*grid.fit_configs, *run.configs]


def seed_args(grid, run, seed: int | None) -> list[str]:
    """One seed for everything random in a fit: ``seed_everything`` (linked to the LoRA init, dropout masks, batch
    order and corpus draw D'_i) and, for strategies that read D_g, the self-distillation's sampling (its own
    stage and config: each seed's D_g in its folder)."""
    if seed is None:
        return []
    args = ["--seed_everything", str(seed)]
    if get_strategy(run.strategy).needs_general:
        root = Path(grid.distill_dir) if grid.distill_dir else Path(grid.output) / "distill"
        args += [
            "--data.distill.sampling.seed",
            str(seed),
            "--data.distill.output_dir",
            str(root / f"seed_{seed}"),
        ]
    return args


def trained(run_dir: Path) -> bool:
    """Whether a run's fit (or merge) finished: its adapter is written last and whole (save_adapter, merge)."""
    return (run_dir / "adapter" / "adapter_config.json").exists()


def fit_command(grid, run, run_dir: Path, seed: int | None = None) -> list[str]:
    args = [a for cfg in fit_configs(grid, run) for a in ("--config", cfg)]
    args += ["--data.corpus.strategy", run.strategy]
    if run.mix_ratio is not None:
        args += ["--data.corpus.mix_ratio", str(run.mix_ratio)]
    if run.only_domains:
        args += ["--data.corpus.only_domains", json.dumps(run.only_domains)]
    if run.heldout_domains:
        args += ["--data.corpus.only_domains", json.dumps(trained_domains(run, domains_of(grid)))]
    args += seed_args(grid, run, seed)
    args += [
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger.init_args.save_dir", str(run_dir),
        "--trainer.logger.init_args.name", "fit",
        "--model.adapter_dir", str(run_dir / "adapter"),
        *run.fit_args,
    ]  # fmt: skip
    last = sorted(run_dir.glob("fit/version_*/checkpoints/last.ckpt"))
    if last and not trained(run_dir):
        args += ["--ckpt_path", str(last[-1])]  # an interrupted fit continues where it stopped
    return cli_command("fit", *args)


def eval_command(grid, run, run_dir: Path, rules: list[str], output: Path) -> list[str]:
    args = ["--config", grid.eval_config] if grid.eval_config else []
    args += ["--strategy", run.strategy, "--rules", json.dumps(rules), "--output", str(output)]
    if run.strategy != "zero_shot":
        args += ["--adapter", str(run_dir / "adapter")]
    if run.only_domains:  # a single-domain run on its own domain(s)
        args += ["--domains", json.dumps(run.only_domains)]
    # A held-out run on its unseen domains alone: general ability is the question of the grid's other runs.
    if run.heldout_domains:
        args += ["--domains", json.dumps(run.heldout_domains), *GENERAL_OFF]
    return cli_command("evaluate", *args, *run.eval_args)


def heldout_rules(strategy: str) -> list[str]:
    """A held-out run answers under p_c and under the unseen domain's hand-written p_i, whatever its strategy's
    rules: every row of the report's held-out section then has both, beside the zero-shot and FT rows under p_c."""
    return list(dict.fromkeys([CENTRAL, *get_strategy(strategy).inference, ROLE]))


def auto_eval_command(grid, run, run_dir: Path) -> list[str]:
    """The held-out domains' tasks under the automatic role prompts (``rega prompts``' file), into ``eval_auto/``
    (general measures off, as in the run's first evaluation)."""
    command = eval_command(grid, run, run_dir, [ROLE], run_dir / "eval_auto")
    return [*command, "--prompts.file", grid.auto_prompts]


def trained_domains(run, domains: list[str]) -> list[str]:
    """The domains a run holding some out trains on: the grid's evaluation domains (``domains_of``) without them.
    Raises a ConfigError naming the run where that is no held-out split."""
    if run.only_domains:
        raise ConfigError(
            f"run {run.name!r} sets both heldout_domains and only_domains: give one (it trains on the grid's "
            "domains without the held-out ones)"
        )
    unknown = sorted(set(run.heldout_domains) - set(domains))
    if unknown:
        have = ", ".join(domains) or "none (no eval_config?)"
        raise ConfigError(
            f"run {run.name!r} holds out {', '.join(unknown)}: not a domain of the grid's evaluation tasks ({have})"
        )
    kept = [d for d in domains if d not in run.heldout_domains]
    if not kept and run.strategy != "zero_shot":
        raise ConfigError(
            f"run {run.name!r} holds out every domain of the grid ({', '.join(domains)}): nothing to train on"
        )
    return kept


def check_auto_prompts(path: str | None, heldout: list[str]) -> None:
    """The automatic prompts file must exist and hold a role for every held-out domain: a missing role would fall
    back to the built-in (hand-written) one, and the "automatic" row would silently measure that."""
    if path is None or not heldout:
        return
    hint = "write it with `python cli.py prompts` (docs/experiments.md, Unseen domains)"
    file = resolve_path(path)
    if not file.is_file():
        raise ConfigError(f"auto_prompts {path} does not exist: {hint}")
    roles = read_prompts_file(file).get("roles") or {}
    missing = sorted(set(heldout) - set(roles))
    if missing:
        raise ConfigError(f"auto_prompts {path} has no role for {', '.join(missing)}: {hint}")


def rewrite_command(grid, run, seed: int | None, output: Path) -> list[str]:
    """SDFT's rewrite of the run's domain data (the fit configs' sources and model), sampled with the run's seed."""
    settings = json.dumps(dataclasses.asdict(run.rewrite))
    args = [
        "--rewrite",
        settings,
        "--fit_configs",
        json.dumps(fit_configs(grid, run)),
        "--output_dir",
        str(output),
    ]
    if seed is not None:
        args += ["--seed", str(seed)]
    return cli_command("rewrite", *args)


def merge_command(grid, spec, adapters: dict[str, str], output: Path) -> list[str]:
    """Merging the named adapters on the base model of the grid's fit configs."""
    args = ["--fit_configs", json.dumps(list(grid.fit_configs)), "--adapters", json.dumps(adapters)]
    args += [
        "--output",
        str(output),
        "--combination_type",
        spec.combination_type,
        "--density",
        str(spec.density),
    ]
    if spec.weights is not None:
        args += ["--weights", json.dumps(spec.weights)]
    return module_command("rega.experiments.merge", *args)


def run_logged(command: list[str], log_path: Path) -> float:
    """Run a stage with its output in ``log_path``; raise with the log's tail if it fails."""
    start = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=stage_env(os.environ))
    if done.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"stage failed (exit {done.returncode}), see {log_path}:\n{tail}")
    return time.perf_counter() - start


def stage_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of a stage. A grid running as a SLURM job's single task (``--ntasks-per-node=1``) hides
    that layout from its fits, which Lightning would otherwise reject with more than one GPU; a fit then starts one
    process per GPU of the node itself. PYTHONPATH carries the repository, so ``python -m`` stages find rega."""
    env = {**environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environ.get("PYTHONPATH")]))
    if env.get("SLURM_NTASKS") == "1":
        env.pop("SLURM_NTASKS")
    return env


def domains_of(grid) -> list[str]:
    """The role-prompt domains of the evaluation tasks (for the prompt-by-domain matrix)."""
    if not grid.eval_config:
        return []
    from rega.data.loaders import load_many

    return sorted({r.domain for r in load_many(eval_tasks(grid.eval_config)).records} - {"general"})


def eval_tasks(eval_config: str) -> list:
    """The evaluation tasks of an ``evaluate`` config, read by the command's own parser (so a task list kept in a
    file of its own, ``tasks: ../data/en_dev.yaml``, resolves as it does for the command)."""
    from jsonargparse import CLI, capture_parser

    from rega.eval.runner import evaluate_command

    parser = capture_parser(lambda: CLI(evaluate_command, args=[], as_positional=False))
    return parser.instantiate(parser.parse_args(["--config", eval_config])).tasks or []
