"""Generation throughput: the distillation runner against a plain per-sample ``model.generate`` loop.

Same model, same instructions (the first ``--n`` of general_en, or the demo pool without shared data), same
central prompt, same decoding settings and ``max_new_tokens``. Sampled answers differ in length between the two,
so the comparison is generated tokens per second (end-of-turn excluded), not seconds per instruction.

* runner: ``run_distillation`` into a fresh folder; its tokens/s is timed by the runner around the generation loop
  (batches, length sorting, KV cache, shard writes with fsync), model loading excluded; the wall time including
  the model load is reported too.
* baseline: one ``model.generate`` call per instruction on a model loaded once, timed around the loop.

The two alternate (ABBA order) for ``--repeats`` rounds; the headline is the median of the per-round ratios, since
timings on a shared machine drift 20-40 % between repeats.

    .venv/bin/python benchmarks/bench_generation.py [--n 32] [--max-new-tokens 64] [--batch-size 32] [--repeats 3]
        [--greedy] [--threads 1] [--output benchmarks/results/generation.json]

Goal (issue 4): at least 4x the baseline's tokens/s on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def baseline_tokens_per_s(model, tokenizer, prompts: list[list[int]], sampling) -> dict:
    """The naive way: one prompt at a time, no batching (the KV cache is on, as generate's default)."""
    import torch

    from rega.modules.generation import stop_token_ids

    stops = stop_token_ids(model, tokenizer)
    kwargs = {
        "max_new_tokens": sampling.max_new_tokens,
        "do_sample": sampling.do_sample,
        "eos_token_id": stops,
    }
    kwargs["pad_token_id"] = tokenizer.pad_token_id
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    torch.manual_seed(sampling.seed)
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            input_ids = torch.tensor([ids])
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
            new = out[0, len(ids) :].tolist()
            tokens += next((k for k, t in enumerate(new) if t in stops), len(new))
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 3)}


def runner_tokens_per_s(cfg, workdir: Path, round_no: int) -> dict:
    from rega.distill.context import SUMMARY
    from rega.distill.runner import run_distillation

    cfg = replace(cfg, output_dir=str(workdir / f"round{round_no}"))
    start = time.perf_counter()
    path = run_distillation(cfg, progress=False)
    wall = time.perf_counter() - start
    run = json.loads((path.parent / SUMMARY).read_text())["last_run"]
    return {
        "tokens": run["generated_tokens"],
        "seconds": run["seconds"],
        "tokens_per_s": run["tokens_per_s"],
        "wall_seconds_with_model_load": round(wall, 3),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="embedded", help="model name_or_path (default: the embedded SmolLM2)"
    )
    parser.add_argument("--n", type=int, default=32, help="number of instructions")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="runner batch size")
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds of (baseline, runner), alternating order"
    )
    parser.add_argument(
        "--greedy", action="store_true", help="greedy decoding instead of the paper's sampling"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for both (0: torch's default). 1 is the stable choice on a shared machine: with "
        "2 OpenMP threads and another busy process, every small op waits for a descheduled thread (10x slower)",
    )
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "generation.json"))
    return parser.parse_args(argv)


def distill_config(args: argparse.Namespace):
    """The runner's settings: the first ``--n`` general_en instructions (the demo pool without shared data)."""
    from rega.config import DataSource, DistillConfig, ModelConfig, SamplingConfig
    from rega.modules.generation import GREEDY
    from rega.paths import shared_data_dir

    pool = (
        "shared:general_en/train.jsonl"
        if (shared_data_dir() / "general_en").is_dir()
        else "demo:general.jsonl"
    )
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    if args.greedy:
        sampling = replace(GREEDY, max_new_tokens=args.max_new_tokens)
    return DistillConfig(
        source=[DataSource(path=pool)],
        model=ModelConfig(name_or_path=args.model),
        sampling=sampling,
        limit=args.n,
        batch_size=args.batch_size,
        accelerator="cpu",
    )


def run_rounds(cfg, model, tokenizer, prompts: list[list[int]], repeats: int) -> list[dict]:
    """Baseline and runner once a round (ABBA order), with the round's runner/baseline tokens/s ratio."""
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-gen-") as tmp:
        for k in range(repeats):
            result = {}
            order = ("baseline", "runner") if k % 2 == 0 else ("runner", "baseline")
            for name in order:
                if name == "baseline":
                    result[name] = baseline_tokens_per_s(model, tokenizer, prompts, cfg.sampling)
                else:
                    result[name] = runner_tokens_per_s(cfg, Path(tmp), k)
            result["ratio"] = round(result["runner"]["tokens_per_s"] / result["baseline"]["tokens_per_s"], 3)
            rounds.append(result)
            print(
                f"round {k + 1}/{repeats}: baseline {result['baseline']['tokens_per_s']:.1f} tok/s, "
                f"runner {result['runner']['tokens_per_s']:.1f} tok/s, ratio {result['ratio']:.2f}x",
                flush=True,
            )
    return rounds


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from rega.data.chat import ChatFormat
    from rega.distill.context import load_instructions
    from rega.model_source import load_tokenizer
    from rega.modules.model import load_model

    cfg = distill_config(args)
    model_cfg = cfg.model
    # The baseline renders exactly the prompts the runner renders.
    tokenizer = load_tokenizer(model_cfg)
    chat = ChatFormat(tokenizer, model_cfg.chat_template, model_cfg.system_placement)
    prompts = [chat.encode_prompt(chat.default_system or "", r.user_text) for r in load_instructions(cfg)]
    model = load_model(model_cfg).eval()
    rounds = run_rounds(cfg, model, tokenizer, prompts, args.repeats)

    ratio = statistics.median(r["ratio"] for r in rounds)
    report = {
        "benchmark": "generation: distillation runner vs per-sample model.generate loop",
        "model": args.model,
        "instructions": len(prompts),
        "source": cfg.source[0].path,
        "sampling": asdict(cfg.sampling),
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "load_average_at_end": list(os.getloadavg()),
        "rounds": rounds,
        "median_ratio": ratio,
        "median_tokens_per_s": {
            name: statistics.median(r[name]["tokens_per_s"] for r in rounds)
            for name in ("baseline", "runner")
        },
        "goal": ">= 4x on CPU",
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"median ratio {ratio:.2f}x (runner vs per-sample loop, generated tokens/s); wrote {args.output}")


if __name__ == "__main__":
    main()
