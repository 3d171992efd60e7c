"""What fusing the decoder's element-wise code would buy a training step (issue 15): a measured proposal.

One training row (packed, 512 tokens, the embedded SmolLM2-135M, fp32, LoRA r16 on 7 projections, fast_lora)
forward and backward, with transformers' LLaMA element-wise pieces run eagerly (as training runs today) or each
replaced by a ``torch.compile``d pure function of the same arithmetic (inductor fuses its forward and backward
kernels; shapes dynamic, so one graph serves every row length):

* ``norm``: RMSNorm (``LlamaRMSNorm.forward``: square, mean, rsqrt, two multiplies; 61 per row),
* ``mlp``: the MLP's ``silu(gate) * up`` (30 per row; the three projections stay as they are),
* ``rotary``: ``apply_rotary_pos_emb`` (q and k of 30 layers),
* ``all``: the three together.

Each configuration is a patch of transformers' classes in this process only. Rounds interleave the
configurations, each round runs the same rows from the same seed (same dropout masks), and the first round
checks the loss and every LoRA gradient against the eager run. Ratios are medians of per-round ratios.

    .venv/bin/python benchmarks/bench_elementwise.py [--threads 2] [--rounds 5] [--rows 3]
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
import torch.nn.functional as F  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

from benchmarks.common import RESULTS, cpu_model, load_average, repo_relative  # noqa: E402
from benchmarks.profile_step import build, packed_batch  # noqa: E402

CONFIGS = {
    "eager": (),
    "norm": ("norm",),
    "mlp": ("mlp",),
    "rotary": ("rotary",),
    "all": ("norm", "mlp", "rotary"),
}
EAGER = (
    modeling_llama.LlamaRMSNorm.forward,
    modeling_llama.LlamaMLP.forward,
    modeling_llama.apply_rotary_pos_emb,
)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic as a pure function (a module argument would make dynamo guard on each of 61)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class Patches:
    """The compiled pieces, switched on by name."""

    def __init__(self):
        self.norm = torch.compile(rms_norm, dynamic=True)
        self.silu_mul = torch.compile(silu_mul, dynamic=True)
        self.rotary = torch.compile(EAGER[2], dynamic=True)

    def apply(self, names: tuple[str, ...]) -> None:
        patches = self

        def norm_forward(module, x):
            return patches.norm(x, module.weight, module.variance_epsilon)

        def mlp_forward(module, x):
            return module.down_proj(patches.silu_mul(module.gate_proj(x), module.up_proj(x)))

        modeling_llama.LlamaRMSNorm.forward = norm_forward if "norm" in names else EAGER[0]
        modeling_llama.LlamaMLP.forward = mlp_forward if "mlp" in names else EAGER[1]
        modeling_llama.apply_rotary_pos_emb = self.rotary if "rotary" in names else EAGER[2]


def run_rows(module, batch, rows: int) -> tuple[float, list[float], list[torch.Tensor]]:
    """(seconds, per-row losses, LoRA gradients) of forward + backward of ``rows`` one-row micro-batches."""
    torch.manual_seed(0)  # the same dropout masks for every configuration
    losses, start = [], time.perf_counter()
    for r in range(rows):
        micro = {k: v[r : r + 1] for k, v in batch.items() if k != "token_domain"}
        token_losses, _ = module.token_losses(micro)
        loss = token_losses.sum() / 100
        loss.backward()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    grads = [p.grad.clone() for p in module.model.parameters() if p.grad is not None]
    module.model.zero_grad(set_to_none=True)
    return seconds, losses, grads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--output", default=str(RESULTS / "elementwise.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = load_average()
    module, batch, patches = build("fast"), packed_batch(args.rows), Patches()
    compile_start = time.perf_counter()
    for names in CONFIGS.values():  # warm-up, and every graph compiled before timing
        patches.apply(names)
        run_rows(module, batch, 1)
    compile_seconds = time.perf_counter() - compile_start
    seconds: dict[str, list[float]] = {name: [] for name in CONFIGS}
    checks: dict[str, dict] = {}
    for rnd in range(args.rounds):
        order = list(CONFIGS)[rnd % len(CONFIGS) :] + list(CONFIGS)[: rnd % len(CONFIGS)]
        for name in order:  # round 0 starts with eager: the reference the others are checked against
            patches.apply(CONFIGS[name])
            t, losses, grads = run_rows(module, batch, args.rows)
            seconds[name].append(t)
            if rnd == 0 and name == "eager":
                reference = (losses, grads)
            elif rnd == 0:
                checks[name] = {
                    "loss_max_abs_diff": max(abs(a - b) for a, b in zip(losses, reference[0])),
                    "grad_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(grads, reference[1])),
                }
    patches.apply(())
    rounds = len(seconds["eager"])
    report = {
        "cpu": cpu_model(), "threads": args.threads, "rows": args.rows, "rounds": rounds,
        "compile_and_warmup_s": round(compile_seconds, 1),
        "seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
        "speedup_vs_eager": {
            k: round(statistics.median(seconds["eager"][i] / v[i] for i in range(rounds)), 3) for k, v in seconds.items()
        },
        "equivalence": checks, "load_average": [load_start, load_average()],
        "command": " ".join(
            ["benchmarks/bench_elementwise.py", *map(repo_relative, sys.argv[1:] if argv is None else argv)]
        ),
    }  # fmt: skip
    for name, ratio in report["speedup_vs_eager"].items():
        median = statistics.median(seconds[name])
        print(f"{name:7s} {median:7.2f} s per {args.rows} rows   {ratio:.3f}x eager   {checks.get(name, '')}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
