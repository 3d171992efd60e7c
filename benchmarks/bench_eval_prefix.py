"""A whole evaluation with and without the shared-prefix prefill: time per stage, and whether every score agrees.

Each variant is the real command a grid runs, ``cli.py evaluate`` of the base model on an evaluation config (by
default ``configs/eval/cpu_en_forgetting.yaml``: domain tasks, general MC, drift and 160-token general answers),
with smaller limits so a round takes a few minutes; variants alternate order over ``--rounds`` rounds, on the same
threads (headline: median of per-round ratios of each stage's seconds, from ``eval.json``'s ``meta.timings``):

* ``whole``: ``--share_prefix false``, every row of a batch prefilled whole (what evaluation did before).
* ``shared``: ``--share_prefix true``: a batch's common leading tokens (system prompt, chat template) prefilled once
  and their KV cache repeated per row (``rega.modules.generation.prefill_rows``).
* ``--extra NAME=ARGS`` adds variants, e.g. ``--extra "b16=--batch_size 16"`` (on top of ``shared``).

Exactness, per variant against ``whole``: the share of per-item results (domain scores and picks, general MC,
drift log-likelihoods to 1e-4, general answers' F1/ROUGE-L/length) and of general answers' texts that are
identical. Writes ``benchmarks/results/eval_prefix.json``.

    .venv/bin/python benchmarks/bench_eval_prefix.py [--rounds 2] [--threads 2] [--limit-per-task 8] [--gen 25]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, machine_info, repo_relative  # noqa: E402

STAGES = ("domain_s", "general_mc_s", "drift_s", "general_gen_s", "total_s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/eval/cpu_en_forgetting.yaml")
    parser.add_argument("--limit-per-task", type=int, default=8)
    parser.add_argument("--mc", type=int, default=50, help="items of each general MC set")
    parser.add_argument("--drift", type=int, default=20)
    parser.add_argument("--gen", type=int, default=25, help="general_gen instructions of each source")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--extra", action="append", default=[], help="NAME=ARGS: another variant")
    parser.add_argument("--output", default=str(RESULTS / "eval_prefix.json"))
    return parser.parse_args(argv)


def variants(args) -> dict[str, list[str]]:
    out = {"whole": ["--share_prefix", "false"], "shared": ["--share_prefix", "true"]}
    for spec in args.extra:
        name, _, extra = spec.partition("=")
        out[name] = ["--share_prefix", "true", *shlex.split(extra)]
    return out


def evaluate(args, extra: list[str], output: Path) -> dict:
    command = [
        sys.executable, "cli.py", "evaluate", "--config", args.config, "--strategy", "zero_shot",
        "--limit_per_task", str(args.limit_per_task), "--general_mc_limit", str(args.mc),
        "--drift_limit", str(args.drift), "--general_gen_limit", str(args.gen), "--threads", str(args.threads),
        "--output", str(output), *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((output / "eval.json").read_text(encoding="utf-8"))


def _flat(items: dict, prefix: str = "") -> dict[str, object]:
    """Every per-item value of ``eval.json``'s ``items``, keyed by its path and index."""
    out: dict[str, object] = {}
    for key, value in items.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out.update({f"{prefix}{key}[{k}]": v for k, v in enumerate(value)})
    return out


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-4
    return a == b


def exactness(result: dict, reference: dict) -> dict:
    ours, theirs = _flat(result["items"]), _flat(reference["items"])
    same = sum(_same(ours.get(key), value) for key, value in theirs.items())
    answers = [
        (text, result["general_gen_answers"][source].get(item))
        for source, texts in reference.get("general_gen_answers", {}).items()
        for item, text in texts.items()
    ]
    return {
        "per_item_values": len(theirs),
        "per_item_identical": same / len(theirs),
        "general_answers": len(answers),
        "general_answers_identical": sum(a == b for a, b in answers) / max(1, len(answers)),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = variants(args)
    seconds: dict[str, dict[str, list[float]]] = {name: {s: [] for s in STAGES} for name in runs}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
            for name in order:
                results[name] = evaluate(args, runs[name], Path(tmp) / f"{name}_{round_}")
                for stage in STAGES:
                    seconds[name][stage].append(results[name]["meta"]["timings"].get(stage, 0.0))
                print(f"round {round_} {name}: {seconds[name]['total_s'][-1]:.1f} s", flush=True)
    ratios = {
        name: {
            stage: statistics.median(
                a / b for a, b in zip(seconds["whole"][stage], seconds[name][stage]) if b
            )
            for stage in STAGES
        }
        for name in runs
        if name != "whole"
    }
    summary = {
        "benchmark": "evaluation: shared-prefix prefill vs whole rows (cli.py evaluate, base model)",
        "settings": {**vars(args), "output": repo_relative(args.output)},
        "variants": {name: " ".join(extra) for name, extra in runs.items()},
        "seconds": seconds,
        "speedup_vs_whole": ratios,
        "exactness_vs_whole": {
            name: exactness(results[name], results["whole"]) for name in runs if name != "whole"
        },
        "machine": machine_info(),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for name, stages in ratios.items():
        print(f"{name} vs whole: " + ", ".join(f"{stage} {value:.2f}x" for stage, value in stages.items()))
        print(f"  exactness: {json.dumps(summary['exactness_vs_whole'][name])}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
