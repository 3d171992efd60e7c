"""Each LoRA-level change of rega.modules.fast_lora measured alone, side by side in one process (issue 15).

Forward + backward of one packed 512-token row (3 examples, the profile's layout) through the embedded SmolLM2-135M
cut to its first ``--layers`` decoder layers (the LM head on response positions, as in training), fp32, LoRA r16 on
all 7 projections, dropout 0.05, in training mode. The same model is switched between three LoRA forwards, in
rotating order each round:

* ``peft``: peft's ``lora.Linear.forward`` (``F.dropout`` per adapter: 7 bernoulli masks a layer);
* ``fast_alone``: fast_lora's forward with every adapter on its own: the mask from random bits and the B product
  added inside one ``addmm`` (7 masks a layer, as peft);
* ``fast``: fast_lora as trained: plus one mask per layer input shared by q/k/v and by gate/up, and their A
  projections fused into one matmul each (4 masks a layer).

Headline: per-round time ratios, median over rounds. Each round also times an fp32 GEMM at the MLP shape
(512 x 576 @ 576 x 1536, the same threads, ~1 s) between the paths, so each path's useful matmul rate (decoder
forward + backward to the inputs of every token, LM head on response positions; LoRA's own FLOPs not counted) is
compared with the GEMM rate of the same moment: on a shared machine the load changes within minutes.

    .venv/bin/python benchmarks/bench_lora_layer.py [--layers 4] [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from peft.tuners.lora.layer import Linear as LoraLinear  # noqa: E402

from benchmarks.common import cpu_model, load_average, matmul_gflops  # noqa: E402
from benchmarks.profile_step import packed_batch  # noqa: E402
from rega.config import ModelConfig  # noqa: E402
from rega.modules.fast_lora import FastLoraLinear  # noqa: E402
from rega.modules.lit_module import REGAModule  # noqa: E402
from rega.modules.model import LoraSettings  # noqa: E402

PATHS = ("peft", "fast_alone", "fast")


def switch(model, path: str, groups: dict) -> None:
    """Put every adapter of ``model`` on ``path``'s forward (class and sibling groups; same parameters)."""
    for module, group in groups.items():
        module.__class__ = LoraLinear if path == "peft" else FastLoraLinear
        module._fast_group = group if path == "fast" else None


def useful_gflop(module, batch) -> float:
    """Decoder forward + backward to the inputs on every token, LM head on response positions (GFLOP)."""
    decoder = module.model.get_base_model().get_decoder()
    layer = sum(m.base_layer.weight.numel() for m in decoder.layers[0].modules() if hasattr(m, "base_layer"))
    tokens = batch["input_ids"].numel()
    head = module.model.get_base_model().get_output_embeddings().weight.numel()
    response = int((batch["labels"][:, 1:] != -100).sum())
    return 4 * (len(decoder.layers) * layer * tokens + head * response) / 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "lora_layer.json"))
    return parser.parse_args(argv)


def cut_module(layers: int) -> REGAModule:
    """The embedded model with LoRA, in training mode, cut to its first ``layers`` decoder layers."""
    torch.manual_seed(0)
    module = REGAModule(model=ModelConfig(), lora=LoraSettings())
    module.configure_model()
    module.train()
    decoder = module.model.get_base_model().get_decoder()
    decoder.layers = decoder.layers[:layers]
    decoder.config.num_hidden_layers = layers
    return module


def time_paths(module: REGAModule, batch, rounds: int) -> tuple[dict, dict, list[float]]:
    """(wall seconds, CPU seconds per path, GEMM GFLOP/s per round): the paths in rotating order each round,
    the GEMM rate timed between the first two paths of the round."""
    groups = {m: m._fast_group for m in module.model.modules() if isinstance(m, FastLoraLinear)}
    cpu_seconds: dict[str, list[float]] = {p: [] for p in PATHS}

    def run(path: str) -> float:
        switch(module.model, path, groups)
        cpu = time.process_time()
        start = time.perf_counter()
        losses, _ = module.token_losses(batch)
        losses.mean().backward()
        module.model.zero_grad(set_to_none=True)
        cpu_seconds[path].append(time.process_time() - cpu)
        return time.perf_counter() - start

    for path in PATHS:
        run(path)  # warm-up
        cpu_seconds[path].clear()
    seconds: dict[str, list[float]] = {p: [] for p in PATHS}
    gemm: list[float] = []
    for r in range(rounds):
        order = PATHS[r % 3 :] + PATHS[: r % 3]
        for i, path in enumerate(order):
            seconds[path].append(run(path))
            if i == 1:
                gemm.append(matmul_gflops(512, 576, 1536))
    return seconds, cpu_seconds, gemm


def ratios(seconds: dict[str, list[float]]) -> dict[str, float]:
    """Per-round time ratios of the path pairs, median over rounds."""
    s = seconds
    return {
        "fast_alone vs peft": statistics.median(p / f for p, f in zip(s["peft"], s["fast_alone"])),
        "fast vs fast_alone": statistics.median(a / f for a, f in zip(s["fast_alone"], s["fast"])),
        "fast vs peft": statistics.median(p / f for p, f in zip(s["peft"], s["fast"])),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start_load = load_average()
    module = cut_module(args.layers)
    batch = {k: v for k, v in packed_batch(1).items() if k != "token_domain"}
    gflop = useful_gflop(module, batch)
    seconds, cpu_seconds, gemm = time_paths(module, batch, args.rounds)
    report = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "layers": args.layers,
        "rounds": args.rounds,
        "median_s": {p: statistics.median(v) for p, v in seconds.items()},
        "seconds": seconds,
        "speedup": ratios(seconds),
        # CPU time of the process: less sensitive to other processes' load than wall time (exact with 1 thread)
        "speedup_cpu_time": ratios(cpu_seconds),
        "cpu_seconds": cpu_seconds,
        "gemm_gflops": gemm,
        "useful_gflop": gflop,
        "gemm_share": {  # per round: the path's useful GFLOP/s over that round's GEMM rate
            p: statistics.median(gflop / t / g for t, g in zip(v, gemm)) for p, v in seconds.items()
        },
        "load_average": [start_load, load_average()],
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    keys = ("cpu", "median_s", "speedup", "speedup_cpu_time", "gemm_share", "load_average")
    print(json.dumps({k: report[k] for k in keys}, indent=1))
    return report


if __name__ == "__main__":
    main()
