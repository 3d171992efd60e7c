"""Generation throughput: the distillation runner against a plain per-sample ``model.generate`` loop and against
``model.generate`` on the runner's own batches.

Same model, same instructions (the first ``--n`` of general_en, or the demo pool without shared data), same
central prompt, same decoding settings and ``max_new_tokens``. Sampled answers differ in length between them,
so the comparison is generated tokens per second (end-of-turn excluded), not seconds per instruction.

* runner: ``run_distillation`` into a fresh folder; its tokens/s is timed by the runner around the generation loop
  (batches, length sorting, KV cache, shard writes with fsync), model loading excluded; the wall time including
  the model load is reported too.
* baseline: one ``model.generate`` call per instruction on a model loaded once, timed around the loop.
* batched_generate: ``model.generate`` on the runner's length-sorted, left-padded batches with the runner's top-p:
  the runner's decoding loop (finished rows leave the batch) against generate's (they are fed padding).

The three rotate order for ``--repeats`` rounds; the headline is the median of the per-round ratios, since
timings on a shared machine drift 20-40 % between repeats.

Roofline (``decode_roofline``): one decoding step reads every weight once (and the KV cache), so its time is at
least those bytes over the machine's memory bandwidth (measured here: a read-only sum over 512 MiB, same threads)
and at least 2 x parameters x rows FLOPs over the GEMM rate (measured at the decode shape). Both bounds are set
against the measured time of a decode step (the model's forward on the KV cache, and the token choice) at batch 1
(the per-sample loop) and at the runner's batch size.

    .venv/bin/python benchmarks/bench_generation.py [--n 32] [--max-new-tokens 64] [--batch-size 32] [--repeats 3]
        [--greedy] [--threads 1] [--output benchmarks/results/generation.json]

Goal (issue 4): at least 4x the baseline's tokens/s on CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import load_average, machine_info, matmul_gflops  # noqa: E402


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


def batched_generate_tokens_per_s(
    model, tokenizer, prompts: list[list[int]], sampling, batch_size: int
) -> dict:
    """``model.generate`` on the runner's batches (sorted by length, left-padded, the same fast top-p): what the
    runner did before its own decoding loop, which drops finished rows instead of feeding them padding."""
    import torch

    from rega.modules.generation import (
        decoding_kwargs,
        left_padded,
        length_sorted_batches,
        pad_token_id,
        stop_token_ids,
    )

    stops, pad = stop_token_ids(model, tokenizer), pad_token_id(tokenizer)
    kwargs = decoding_kwargs(sampling, stops, pad)
    torch.manual_seed(sampling.seed)
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
            input_ids, attention, _ = left_padded([prompts[i] for i in batch], pad)
            out = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
            for new in out[:, input_ids.shape[1] :].tolist():
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


def read_bandwidth_gbs(seconds: float = 1.0) -> float:
    """Memory read bandwidth: a sum over 512 MiB of fp32, well beyond any cache."""
    import torch

    x = torch.ones(2**27)
    x.sum()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x.sum()
        count += 1
    return x.numel() * 4 * count / (time.perf_counter() - start) / 1e9


def decode_step_seconds(
    model, tokenizer, prompts: list[list[int]], sampling, steps: int = 16, room: bool = True
) -> float:
    """Median seconds of one decoding step (forward on the KV cache + the token choice) after prefilling these
    prompts: what the runner repeats per generated token of a batch. ``room=False``: transformers' cache as it
    comes (appending concatenates), what ``model.generate`` runs on."""
    import torch

    from rega.modules import generation as gen

    warper = gen.TemperatureTopP(sampling.temperature, sampling.top_p) if sampling.do_sample else None
    with torch.inference_mode():
        ids, mask, pos = gen.left_padded(prompts, gen.pad_token_id(tokenizer))
        start = gen.prefill(model, ids, mask, pos)
        if room:
            gen.make_room(start.cache, steps)
        logits, positions, times = start.last_logits, mask.sum(-1, keepdim=True), []
        for _ in range(steps):
            t = time.perf_counter()
            chosen = gen._next_tokens(logits, ids, sampling, warper)
            mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=-1)
            out = model(
                input_ids=chosen[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                **{start.cache_key: start.cache},
            )  # fmt: skip
            logits, positions = out.logits[:, -1], positions + 1
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_roofline(model, tokenizer, prompts: list[list[int]], sampling, batch_size: int) -> dict:
    """Measured decode step time at batch 1 and ``batch_size`` against the memory and compute bounds."""
    config = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    bandwidth = read_bandwidth_gbs()
    out = {"weight_bytes": weight_bytes, "read_bandwidth_gbs": round(bandwidth, 2), "batches": {}}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4
    for rows in sorted({1, batch_size}):
        batch = prompts[:rows]
        context = max(len(p) for p in batch) + 8  # the cache length in the middle of the 16 timed steps
        step = decode_step_seconds(model, tokenizer, batch, sampling)
        gemm = matmul_gflops(rows, config.hidden_size, config.hidden_size)  # a decode step's shape
        step_bytes = weight_bytes + kv_per_token * context * rows
        memory_bound, compute_bound = step_bytes / (bandwidth * 1e9), 2 * params * rows / (gemm * 1e9)
        out["batches"][str(rows)] = {
            "step_ms": round(step * 1e3, 2),
            "tokens_per_s": round(rows / step, 1),
            "bytes_per_step": step_bytes,
            "memory_bound_ms": round(memory_bound * 1e3, 2),
            "gemm_gflops": round(gemm, 1),
            "compute_bound_ms": round(compute_bound * 1e3, 2),
            "share_of_roofline": round(max(memory_bound, compute_bound) / step, 3),
        }
    # The cache with room against transformers' concatenating one: 48 steps at the batch size, 3 rounds.
    batch, pairs = prompts[:batch_size], []
    for _ in range(3):
        plain = decode_step_seconds(model, tokenizer, batch, sampling, steps=48, room=False)
        pairs.append((plain, decode_step_seconds(model, tokenizer, batch, sampling, steps=48)))
    out["cache_room"] = {
        "rows": len(batch),
        "step_ms_concatenating": round(statistics.median(p for p, _ in pairs) * 1e3, 2),
        "step_ms_with_room": round(statistics.median(r for _, r in pairs) * 1e3, 2),
        "speedup": round(statistics.median(p / r for p, r in pairs), 3),
    }
    return out


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


CONTENDERS = ("baseline", "batched_generate", "runner")


def run_rounds(cfg, model, tokenizer, prompts: list[list[int]], repeats: int) -> list[dict]:
    """The per-sample loop, batched ``generate`` and the runner once a round (order rotating), with the round's
    ratios of the runner's tokens/s to each other's."""
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-gen-") as tmp:
        for k in range(repeats):
            result = {}
            for name in CONTENDERS[k % 3 :] + CONTENDERS[: k % 3]:
                if name == "baseline":
                    result[name] = baseline_tokens_per_s(model, tokenizer, prompts, cfg.sampling)
                elif name == "batched_generate":
                    result[name] = batched_generate_tokens_per_s(
                        model, tokenizer, prompts, cfg.sampling, cfg.batch_size
                    )
                else:
                    result[name] = runner_tokens_per_s(cfg, Path(tmp), k)
            runner = result["runner"]["tokens_per_s"]
            result["ratio"] = round(runner / result["baseline"]["tokens_per_s"], 3)
            result["ratio_vs_batched_generate"] = round(
                runner / result["batched_generate"]["tokens_per_s"], 3
            )
            rounds.append(result)
            print(
                f"round {k + 1}/{repeats}: per-sample {result['baseline']['tokens_per_s']:.1f} tok/s, batched "
                f"generate {result['batched_generate']['tokens_per_s']:.1f}, runner {runner:.1f}: "
                f"{result['ratio']:.2f}x / {result['ratio_vs_batched_generate']:.2f}x",
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

    load_start = load_average()
    cfg = distill_config(args)
    model_cfg = cfg.model
    # The baseline renders exactly the prompts the runner renders.
    tokenizer = load_tokenizer(model_cfg)
    chat = ChatFormat(tokenizer, model_cfg.chat_template, model_cfg.system_placement)
    prompts = [chat.encode_prompt(chat.default_system or "", r.user_text) for r in load_instructions(cfg)]
    model = load_model(model_cfg).eval()
    rounds = run_rounds(cfg, model, tokenizer, prompts, args.repeats)
    roof = decode_roofline(model, tokenizer, prompts, cfg.sampling, args.batch_size)

    ratio = statistics.median(r["ratio"] for r in rounds)
    report = {
        "benchmark": "generation: distillation runner vs per-sample model.generate loop",
        "model": args.model,
        "instructions": len(prompts),
        "source": cfg.source[0].path,
        "sampling": asdict(cfg.sampling),
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "machine": machine_info(),
        "load_average": {"start": load_start, "end": load_average()},
        "rounds": rounds,
        "median_ratio": ratio,
        "median_ratio_vs_batched_generate": statistics.median(r["ratio_vs_batched_generate"] for r in rounds),
        "median_tokens_per_s": {
            name: statistics.median(r[name]["tokens_per_s"] for r in rounds) for name in CONTENDERS
        },
        "goal": ">= 4x on CPU",
        "decode_roofline": roof,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"median ratio {ratio:.2f}x (runner vs per-sample loop, generated tokens/s); wrote {args.output}")
    print_roofline(roof)


def print_roofline(roof: dict) -> None:
    print(
        f"decode roofline: {roof['weight_bytes'] / 2**20:.0f} MiB of weights per step, read bandwidth "
        f"{roof['read_bandwidth_gbs']} GB/s"
    )
    for rows, b in roof["batches"].items():
        print(
            f"  batch {rows}: step {b['step_ms']} ms ({b['tokens_per_s']} tok/s); bounds: memory "
            f"{b['memory_bound_ms']} ms, compute {b['compute_bound_ms']} ms; {b['share_of_roofline']:.0%} of roofline"
        )
    room = roof["cache_room"]
    print(
        f"  KV cache with room vs concatenating, batch {room['rows']}, 48 steps: {room['step_ms_with_room']} vs "
        f"{room['step_ms_concatenating']} ms a step ({room['speedup']:.2f}x)"
    )


if __name__ == "__main__":
    main()
