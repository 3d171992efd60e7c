"""Where one training step's wall time goes, per LoRA path, on this machine (issue 15).

A step is what ``REGAModule.training_step`` does with a batch of 8 packed rows of 512 tokens (the embedded
SmolLM2-135M, fp32, LoRA r16 on all 7 projections, dropout 0.05): forward + backward of each row (one-row
micro-batches), gradient norm, AdamW step. Synthetic rows: examples of 60-300 tokens packed greedily, the last
40 % of each example supervised (the shared corpus' share of response tokens is 37 %).

Three measurements, the LoRA paths (``fast``: rega.modules.fast_lora, ``peft``: peft's forward) interleaved:

1. phases, without the profiler: forward, backward, optimizer (norm + AdamW + zero_grad), by ``perf_counter``;
2. one step under ``torch.profiler``, self CPU time of each op attributed to a category: ``matmul`` (mm, addmm,
   bmm), ``attention`` (SDPA flash kernels, forward and backward), ``dropout masks`` (everything under peft's
   ``aten::dropout`` / its backward, or under fast_lora's ``drop``; the mask's multiply in fast_lora's backward
   is counted as element-wise), ``element-wise/other ops`` (every other op: norms, SiLU, rotary, adds, copies,
   cross-entropy, AdamW's foreach kernels), and ``python/dispatch`` (the step's wall time under the profiler
   minus all ops' self time: Python, module calls, autograd bookkeeping, the profiler's own cost; an upper bound);
3. Lightning's loop: ``--lightning-steps`` steps of ``Trainer.fit`` (TensorBoard logger, as configs/trainer/cpu.yaml)
   timed from one ``on_train_batch_end`` to the next, minus the time inside ``training_step``.

    .venv/bin/python benchmarks/profile_step.py [--rows 8] [--paths fast peft] [--output benchmarks/results/profile_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from benchmarks.common import cpu_model, load_average  # noqa: E402
from rega.config import ModelConfig  # noqa: E402
from rega.modules import fast_lora  # noqa: E402
from rega.modules.lit_module import REGAModule  # noqa: E402
from rega.modules.model import LoraSettings  # noqa: E402

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm"}
DROPOUT = ("aten::dropout", "aten::native_dropout", "NativeDropoutBackward0", "lora_dropout")
ATTENTION = ("scaled_dot_product", "flash_attention")
CATEGORIES = ("matmul", "attention", "dropout masks", "element-wise/other ops", "python/dispatch")


def packed_batch(
    rows: int,
    length: int = 512,
    seed: int = 0,
    vocab: int = 49000,
    example_tokens: tuple[int, int] = (60, 300),
) -> dict[str, torch.Tensor]:
    """``rows`` packed rows of random examples (``example_tokens``: the range of their lengths), the last 40 % of
    each example its response."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = torch.full((rows, length), -100)
    positions = torch.zeros((rows, length), dtype=torch.long)
    domain = torch.zeros((rows, length), dtype=torch.long)
    for r in range(rows):
        col = 0
        while col < length:
            n = min(int(torch.randint(*example_tokens, (1,), generator=g)), length - col)
            positions[r, col : col + n] = torch.arange(n)
            start = col + int(0.6 * n)
            labels[r, start : col + n] = ids[r, start : col + n]
            col += n
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "token_domain": domain}


def build(path: str) -> REGAModule:
    torch.manual_seed(0)
    module = REGAModule(model=ModelConfig(), lora=LoraSettings(), fast_lora=path == "fast")
    module.configure_model()
    module.train()
    return module


def step(module: REGAModule, batch, optimizer, times: dict | None = None) -> None:
    """training_step's work without Lightning: one-row micro-batches, token-mean loss, norm, AdamW."""
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    forward = backward = 0.0
    for r in range(batch["input_ids"].size(0)):
        micro = {k: v[r : r + 1] for k, v in batch.items() if k != "token_domain"}
        t0 = time.perf_counter()
        losses, _ = module.token_losses(micro)
        loss = losses.sum() / supervised
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        forward += t1 - t0
        backward += t2 - t1
    t3 = time.perf_counter()
    with record_function("optimizer"):
        params = [p for p in module.model.parameters() if p.grad is not None]
        torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if times is not None:
        times["forward"].append(forward)
        times["backward"].append(backward)
        times["optimizer"].append(time.perf_counter() - t3)


def categorize(prof, wall_us: float) -> dict[str, float]:
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.events():
        chain, parent = [event.name], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if event.name in ("optimizer", "lora_dropout") or event.name.startswith(
            ("autograd::", "ProfilerStep")
        ):
            continue  # scopes: their ops are counted
        if any(name in DROPOUT for name in chain):
            key = "dropout masks"
        elif any(a in name for name in chain for a in ATTENTION):
            key = "attention"
        elif event.name in MATMULS:
            key = "matmul"
        else:
            key = "element-wise/other ops"
        totals[key] += event.self_cpu_time_total
    totals["python/dispatch"] = max(0.0, wall_us - sum(totals.values()))
    return {k: 100 * v / wall_us for k, v in totals.items()}


def lightning_overhead(module: REGAModule, rows: int, steps: int) -> dict:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    inside: list[float] = []
    intervals: list[float] = []
    plain_step = module.training_step

    def timed_step(batch, batch_idx):
        t = time.perf_counter()
        out = plain_step(batch, batch_idx)
        inside.append(time.perf_counter() - t)
        return out

    class Clock(L.Callback):
        last = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now = time.perf_counter()
            if self.last is not None:
                intervals.append(now - self.last)
            self.last = now

    module.training_step = timed_step  # instance attribute: times this module only
    batches = [packed_batch(rows, seed=i) for i in range(steps + 1)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=steps + 1, logger=TensorBoardLogger(tmp, name="p"),
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            log_every_n_steps=1, callbacks=[Clock()], default_root_dir=tmp,
        )  # fmt: skip
        module.on_train_end = lambda: None  # no adapter save
        trainer.fit(module, train_dataloaders=loader)
    overhead = [i - s for i, s in zip(intervals, inside[1:])]
    return {
        "steps": len(intervals),
        "step_s": statistics.median(intervals),
        "loop_s": statistics.median(overhead),
        "loop_share": statistics.median(o / i for o, i in zip(overhead, intervals)),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--paths", nargs="+", default=["fast", "peft"], choices=["fast", "peft"])
    parser.add_argument("--timed-steps", type=int, default=2)
    parser.add_argument("--lightning-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "profile_step.json"))
    return parser.parse_args(argv)


def profiled_step(module: REGAModule, batch, optimizer, times: dict, real: int) -> dict:
    """One step under the profiler: the phases' shares (from the unprofiled ``times``), op categories, top ops."""
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(module, batch, optimizer)
    wall_us = (time.perf_counter() - t0) * 1e6
    phases = {k: statistics.median(v) for k, v in times.items()}
    total = sum(phases.values())
    return {
        "step_s": total,
        "tokens_per_s": real / total,
        "phases_share": {k: 100 * v / total for k, v in phases.items()},
        "profiled_step_s": wall_us / 1e6,
        "categories_share": categorize(prof, wall_us),
        "top_ops": [
            (e.key, round(100 * e.self_cpu_time_total / wall_us, 2), e.count)
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
        ],
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    start_load = load_average()
    # fast_lora's mask as a profiler scope (peft's is aten::dropout already)
    plain_drop = fast_lora.drop

    def scoped_drop(x, p):
        with record_function("lora_dropout"):
            return plain_drop(x, p)

    fast_lora.drop = scoped_drop
    modules = {path: build(path) for path in args.paths}
    optimizers = {
        p: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=2e-4)
        for p, m in modules.items()
    }
    batch = packed_batch(args.rows)
    real = int((batch["token_domain"] >= 0).sum())
    times = {p: {"forward": [], "backward": [], "optimizer": []} for p in modules}
    for path in modules:  # warm-up
        step(modules[path], packed_batch(1, seed=99), optimizers[path])
    for _ in range(args.timed_steps):
        for path in modules:
            step(modules[path], batch, optimizers[path], times[path])
    report: dict = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "rows": args.rows,
        "tokens": real,
        "paths": {},
    }
    for path in modules:
        report["paths"][path] = profiled_step(modules[path], batch, optimizers[path], times[path], real)
    if args.lightning_steps:
        report["lightning"] = lightning_overhead(modules[args.paths[0]], args.rows, args.lightning_steps)
    report["load_average"] = [start_load, load_average()]
    fast_lora.drop = plain_drop
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    paths = list(report["paths"])
    lines = [
        f"CPU: {report['cpu']}, {report['threads']} threads, {report['rows']} rows x 512 tokens "
        f"({report['tokens']} tokens); load {report['load_average'][0]} -> {report['load_average'][1]}",
        "",
        "| share of step wall time | " + " | ".join(paths) + " |",
        "|---|" + "---:|" * len(paths),
    ]
    for key in ("forward", "backward", "optimizer"):
        lines.append(
            f"| phase: {key} | "
            + " | ".join(f"{report['paths'][p]['phases_share'][key]:.1f}%" for p in paths)
            + " |"
        )
    for key in CATEGORIES:
        lines.append(
            f"| {key} | "
            + " | ".join(f"{report['paths'][p]['categories_share'][key]:.1f}%" for p in paths)
            + " |"
        )
    lines.append(
        "| step s (no profiler) | " + " | ".join(f"{report['paths'][p]['step_s']:.2f}" for p in paths) + " |"
    )
    lines.append(
        "| tokens/s | " + " | ".join(f"{report['paths'][p]['tokens_per_s']:.1f}" for p in paths) + " |"
    )
    if "lightning" in report:
        lt = report["lightning"]
        lines += [
            "",
            f"Lightning loop ({paths[0]}, {lt['steps']} steps): {lt['loop_s'] * 1e3:.0f} ms of a "
            f"{lt['step_s']:.2f} s step ({100 * lt['loop_share']:.2f} %) outside training_step.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
