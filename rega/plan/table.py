"""The printed plan: a few header lines, the memory table (GiB per GPU, one column per layout), compute, run time,
host memory, the layout choice, and the assumptions behind the numbers."""

from __future__ import annotations

from rega.plan.memory import CONTEXT_BYTES, GIB, LAYOUTS

ITEMS = (
    "base weights", "root unit, gathered", "all-gather buffers", "LoRA weights", "gradients", "AdamW states",
    "DDP gradient buckets",
)  # fmt: skip
WIDTH = 13  # one layout column


def plan_lines(plan: dict) -> list[str]:
    return [*header_lines(plan), "", *memory_lines(plan), "", *compute_lines(plan), *assumption_lines(plan)]


def header_lines(plan: dict) -> list[str]:
    model, gpu, batch = plan["model"], plan["gpu"], plan["batch"]
    shape = model["shape"]
    quantized = ", 4-bit NF4" if model["load_in_4bit"] else ""
    lora = model["lora"]
    return [
        f"REGA plan: {model['name_or_path']} ({shape['model_type']}; {model['config']})",
        f"parameters    base {shape['base_params']:,} ({shape['base_params'] / 1e9:.2f} B), {model['dtype']}"
        f"{quantized}",
        f"              LoRA r={lora['r']} on {', '.join(shape['lora_targets'])}: {shape['lora_params']:,} "
        f"trainable ({100 * shape['lora_params'] / shape['base_params']:.2f} % of base)",
        f"GPUs          {gpu['nodes']} node(s) x {gpu['gpus_per_node']} {gpu['name']} ({gpu['memory_gib']:g} GiB, "
        f"{gpu['tflops']:g} {'bf16' if gpu['bf16'] else 'fp16'} TFLOP/s dense)",
        f"micro-batch   {batch['micro_batch']} rows x {batch['max_length']} tokens; LM head on "
        f"{100 * batch['response_share']:.0f} % of positions ({batch['response_share_from']})",
        f"precision     trainer {batch['precision']}; gradient checkpointing {batch['checkpointing']}",
    ]


def memory_lines(plan: dict) -> list[str]:
    memory, gpu, own = plan["memory_gib"], plan["gpu"], plan["batch"]["checkpointing"]
    shards = {"ddp": "ddp", "fsdp2": f"fsdp2 /{gpu['nodes'] * gpu['gpus_per_node']}",
              "hsdp": f"hsdp /{gpu['gpus_per_node']}"}  # fmt: skip
    lines = ["memory per GPU, GiB".ljust(30) + "".join(shards[n].rjust(WIDTH) for n in LAYOUTS)]

    def row(label: str, state: str, key: str, verdict: bool = False) -> str:
        cells = []
        for name in LAYOUTS:
            value = memory[name][state].get(key)
            cell = "-" if value is None else f"{value:.2f}"
            if verdict and value is not None:
                cell += " ok" if plan["fits"][name][state] else " NO"
            cells.append(cell.rjust(WIDTH))
        return f"  {label:<28}" + "".join(cells)

    lines += [row(item, own, item) for item in ITEMS]
    marks = {state: " *" if state == own else "" for state in ("on", "off")}
    lines += [row(f"activations, ckpt {s}{marks[s]}", s, "activations") for s in ("on", "off")]
    lines.append(row("CUDA context", own, "CUDA context"))
    lines += [row(f"peak, ckpt {s}{marks[s]}", s, "peak", verdict=True) for s in ("on", "off")]
    lines.append(f"  (* the fit's setting; ok: under 95 % of {gpu['memory_gib']:g} GiB)")
    return lines


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def compute_lines(plan: dict) -> list[str]:
    c, gpu, host, layout = plan["compute"], plan["gpu"], plan["host_gib_per_node"], plan["layout"]
    flops = c["flops_per_token"]
    parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in flops.items() if k != "total" and v)
    run = (
        f"{c['steps']:,} steps x {duration(c['step_seconds'])} = {duration(c['run_hours'] * 3600)} "
        f"({c['steps_from']})"
        if c["steps"]
        else c["steps_from"]
    )
    loads = (
        "every rank loads the whole base" if layout["chosen"] == "ddp" or plan["model"]["load_in_4bit"]
        else "rank 0 loads the whole base, the other ranks receive their shards"
    )  # fmt: skip
    return [
        f"compute       {flops['total'] / 1e9:.1f} GFLOP per token ({parts}); attention over "
        f"{c['attended_length']:.0f} tokens ({c['attended_from']})",
        f"              per step and GPU: {c['step_tokens_per_gpu']:,} tokens, {c['step_flops_per_gpu'] / 1e12:,.0f} "
        f"TFLOP = {duration(c['step_seconds'])} at MFU {c['mfu']:g}",
        f"run           {run}",
        f"host memory   {host:.1f} GiB on the busiest of {gpu['nodes']} node(s) x {gpu['gpus_per_node']} ranks at load "
        f"({loads})",
        f"layout        {layout['chosen']} ({layout['asked']}; {layout['config_file']}): {layout['why']}",
    ]


def assumption_lines(plan: dict) -> list[str]:
    notes = [
        "activations: the tensors autograd keeps per layer in this project's forward (rega/plan/memory.py); "
        "with checkpointing each layer's input plus one layer's recompute and gradients",
        f"CUDA context and workspaces {CONTEXT_BYTES / GIB:g} GiB; allocator fragmentation and communication "
        "buffers beyond the all-gathers are not counted",
        "FLOPs: the frozen base computes input gradients only; checkpointing recomputes the decoder forward; the "
        "step time assumes communication hidden behind compute",
        *plan.get("notes", []),
    ]
    return ["assumptions", *(f"  - {note}" for note in notes)]
