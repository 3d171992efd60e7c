"""Where a training micro-batch's time goes: torch.profiler over forward + backward of REGAModule on one packed row
of 512 tokens (3 examples, 43 % response tokens) of the embedded model, fp32, 2 threads, LoRA dropout on.

    .venv/bin/python benchmarks/profile_step.py

(``bench_training.py --profile`` profiles inside Lightning; on this machine that crashed the child process, so this
script profiles the same computation without Lightning.)
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from rega.modules.attention import packed_rows
from rega.modules.lit_module import REGAModule
from rega.modules.model import LoraSettings, ModelConfig

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def packed_row(length: int = 512) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 49000, (1, length))
    positions = torch.cat([torch.arange(n) for n in (200, 150, 162)]).unsqueeze(0)
    labels = torch.full((1, length), -100)
    for start, end in ((120, 200), (300, 350), (420, length)):  # the three responses
        labels[:, start:end] = ids[:, start:end]
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    module = REGAModule(model=ModelConfig(), lora=LoraSettings())
    module.configure_model()
    module.train()
    batch = packed_row()

    def step() -> None:
        with packed_rows():
            losses, _ = module.token_losses(batch)
            losses.mean().backward()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"{e.key:<60} {100 * e.self_cpu_time_total / total:5.1f}%  calls {e.count}")
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    print(f"matmuls: {100 * matmul / total:.1f}% of self CPU time")


if __name__ == "__main__":
    main()
