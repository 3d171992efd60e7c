"""``rega plan``: the memory per GPU, FLOPs and time of the fit its config files describe, without a GPU or the
weights (the model is built on the meta device from its config.json; see :mod:`rega.plan`)."""

from __future__ import annotations

import math
from dataclasses import asdict

from rega.errors import ConfigError
from rega.plan.cards import Card, card
from rega.plan.flops import flops_per_token, step_seconds
from rega.plan.memory import GIB, LAYOUTS, Batch, host_bytes_per_node, layout_of, per_gpu
from rega.plan.settings import (
    DEFAULT_GPUS_PER_NODE,
    Corpus,
    FitSettings,
    fit_settings,
    precision_of,
    read_tokenized,
)
from rega.plan.shape import Shape, count_shape
from rega.plan.sources import model_config_for
from rega.plan.table import plan_lines

# The trainer config that runs each layout (after configs/trainer/gpu.yaml).
LAYOUT_CONFIGS = {"ddp": "configs/trainer/ddp.yaml", "fsdp2": "configs/trainer/fsdp.yaml",
                  "hsdp": "configs/trainer/hsdp.yaml"}  # fmt: skip
FIT_MARGIN = 0.95  # a plan fits when its peak is under this share of the card: the allocator's fragmentation


def plan_command(
    fit_args: list[str],
    gpu: str = "h100-80gb",
    layout: str = "auto",
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    mfu: float = 0.4,
    tokens: int | None = None,
    tokenized: str | None = None,
    response_share: float | None = None,
    output: str | None = None,
) -> None:
    """Plan a fit: parameters, memory per GPU (DDP, FSDP2, HSDP), FLOPs and time, from the fit's arguments alone
    (no GPU, no weights, no download: the model is built on the meta device from its config.json). The fit's
    arguments are given as to ``fit`` (``--config FILE`` ..., overrides such as ``--data.batch_size 2``), beside
    the plan's own options below.

    Args:
        fit_args: the fit's arguments as one list (what the command line's other arguments become).
        gpu: the card: h100-80gb, h200-141gb, a100-80gb, a100-40gb, l40s-48gb, rtx4090-24gb or v100-32gb.
        layout: ddp, fsdp2, hsdp, or auto (DDP when everything fits one card, else HSDP across nodes, else FSDP2).
        nodes: nodes (default: trainer.num_nodes).
        gpus_per_node: GPUs per node (default: trainer.devices, or 8 when it is auto).
        mfu: share of the card's bf16 peak the executed FLOPs (recompute included) reach.
        tokens: training tokens of one epoch, for the run's time.
        tokenized: instead of ``tokens``, a fit's summary.json or a prepared-data record
            (``$REGA_CACHE/prepared/*.json``): tokens, examples and the response share.
        response_share: share of positions that predict a response token (the LM head runs on those only);
            default: from ``tokenized``, else 1.0 (the upper bound).
        output: also write the plan as JSON to this file.
    """
    from rega.io import write_json
    from rega.lightning_cli import resolve_fit_config

    if not fit_args:
        raise ConfigError(
            "plan: give the fit's configuration as to fit: --config MODEL.yaml --config TRAINER.yaml ..."
        )
    options = dict(gpu=gpu, layout=layout, nodes=nodes, gpus_per_node=gpus_per_node, mfu=mfu)
    corpus = read_tokenized(tokenized) if tokenized else (Corpus(tokens, "--tokens") if tokens else None)
    fit = resolve_fit_config([], fit_args)
    plan = build_plan(fit, corpus=corpus, response_share=response_share, **options)
    print("\n".join(plan_lines(plan)))
    if output:
        write_json(output, plan)
        print(f"wrote {output}")


def check_options(layout: str, mfu: float, response_share: float | None) -> None:
    if layout not in ("auto", *LAYOUTS):
        raise ConfigError(f"--layout {layout!r}: use auto, {', '.join(LAYOUTS)}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: a share of the peak, in (0, 1]")
    if response_share is not None and not 0 < response_share <= 1:
        raise ConfigError(f"--response_share {response_share}: a share of the positions, in (0, 1]")


def build_plan(
    fit: dict, gpu: str = "h100-80gb", layout: str = "auto", nodes: int | None = None,
    gpus_per_node: int | None = None, mfu: float = 0.4, corpus: Corpus | None = None,
    response_share: float | None = None,
) -> dict:  # fmt: skip
    """The plan of a resolved fit configuration, as plain values (what the table shows and the JSON holds)."""
    check_options(layout, mfu, response_share)
    target, settings = card(gpu), fit_settings(fit)
    hf_config, source = model_config_for(settings.model)
    shape = count_shape(hf_config, settings.lora)
    nodes = nodes or settings.nodes
    per_node = gpus_per_node or settings.gpus_per_node or DEFAULT_GPUS_PER_NODE
    if nodes < 1 or per_node < 1:
        raise ConfigError(f"--nodes {nodes} --gpus_per_node {per_node}: both must be at least 1")
    share, share_source = response_share_of(response_share, corpus)
    batch = Batch(settings.micro_batch, settings.max_length, share)
    memory = memory_table(shape, settings, batch, nodes, per_node)
    checkpointing = "on" if settings.model.gradient_checkpointing else "off"
    chosen, why = choose_layout(layout, memory, checkpointing, target, nodes, per_node)
    return {
        "model": model_record(settings, shape, source),
        "gpu": {**asdict(target), "nodes": nodes, "gpus_per_node": per_node},
        "batch": {"micro_batch": batch.rows, "max_length": batch.length, "batch_size": settings.batch_size,
                  "response_share": share, "response_share_from": share_source,
                  "precision": settings.precision, "checkpointing": checkpointing},
        "memory_gib": memory,
        "fits": {name: {c: fits(m["peak"], target) for c, m in by_c.items()} for name, by_c in memory.items()},
        "layout": {"asked": layout, "chosen": chosen, "why": why, "config_file": LAYOUT_CONFIGS[chosen],
                   "configured": settings.strategy},
        "compute": compute_record(shape, settings, batch, target, mfu, corpus, nodes * per_node),
        "host_gib_per_node": round(host_bytes_per_node(shape, precision_of(settings),
                                                        layout_of(chosen, nodes, per_node)) / GIB, 2),
        "notes": notes_of(settings, shape, target, chosen),
    }  # fmt: skip


def notes_of(settings: FitSettings, shape: Shape, target: Card, chosen: str) -> list[str]:
    """What the reader should know about this plan beyond the fixed assumptions."""
    notes = []
    if shape.family is None:
        notes.append(
            f"model type {shape.model_type!r} has no record in rega/modules/architectures.py: its activations "
            "follow the LLaMA block's formula"
        )
    if not target.bf16 and settings.model.dtype == "bfloat16":
        notes.append(f"{target.name} has no bf16: load the model in float16 (its fp16 peak is shown)")
    if settings.model.dtype == "float32" and not settings.model.load_in_4bit:
        notes.append("float32 weights: fp32 matmuls run far below the bf16 peak the time assumes")
    if settings.strategy in LAYOUT_CONFIGS and settings.strategy != chosen:
        notes.append(f"the configs run {settings.strategy}; this plan chooses {chosen}")
    return notes


def response_share_of(asked: float | None, corpus: Corpus | None) -> tuple[float, str]:
    if asked is not None:
        return asked, "--response_share"
    if corpus is not None and corpus.supervised:
        return corpus.supervised / corpus.tokens, f"supervised tokens of {corpus.source}"
    return 1.0, "upper bound: every position"


def model_record(settings: FitSettings, shape: Shape, source: str) -> dict:
    return {
        "name_or_path": settings.model.name_or_path, "config": source, "dtype": settings.model.dtype,
        "load_in_4bit": settings.model.load_in_4bit, "lora": asdict(settings.lora),
        "fast_lora": settings.fast_lora, "shape": asdict(shape),
    }  # fmt: skip


def memory_table(shape: Shape, settings: FitSettings, batch: Batch, nodes: int, per_node: int) -> dict:
    """GiB per GPU by layout, then checkpointing on/off, then item."""
    precision = precision_of(settings)
    table = {}
    for name in LAYOUTS:
        layout = layout_of(name, nodes, per_node)
        table[name] = {
            state: {k: round(v / GIB, 3) for k, v in per_gpu(shape, precision, batch, layout, on).items()}
            for state, on in (("on", True), ("off", False))
        }
    return table


def fits(peak_gib: float, target: Card) -> bool:
    return peak_gib <= FIT_MARGIN * target.memory_gib


def choose_layout(
    asked: str, memory: dict, checkpointing: str, target: Card, nodes: int, per_node: int
) -> tuple[str, str]:
    """(layout, why in one line): the asked one, or for ``auto`` DDP when everything fits one card, else HSDP
    across nodes when that fits, else FSDP2 over every GPU."""
    peak = {name: memory[name][checkpointing]["peak"] for name in LAYOUTS}
    of = f"of {target.memory_gib:g} GiB"
    if asked != "auto":
        verdict = "fits" if fits(peak[asked], target) else "does NOT fit"
        return asked, f"as asked: {peak[asked]:.1f} GiB per GPU {of}, {verdict}"
    world = nodes * per_node
    if fits(peak["ddp"], target):
        return "ddp", (
            f"the whole model, its LoRA states and activations fit one card ({peak['ddp']:.1f} GiB {of}): "
            "no sharding traffic"
        )
    big = f"DDP would need {peak['ddp']:.1f} GiB {of}"
    if nodes > 1 and fits(peak["hsdp"], target):
        return "hsdp", (
            f"{big}; sharded over the {per_node} GPUs of a node ({peak['hsdp']:.1f} GiB), replicated across the "
            f"{nodes} nodes, so only gradients cross the network"
        )
    if fits(peak["fsdp2"], target):
        return "fsdp2", f"{big}; sharded over all {world} GPUs it needs {peak['fsdp2']:.1f} GiB"
    remedy = "turn on model.model.gradient_checkpointing, " if checkpointing == "off" else ""
    remedy += (
        "lower model.micro_batch_size or data.max_length, set load_in_4bit, or add GPUs or a bigger card"
    )
    best = "fsdp2" if world > 1 else "ddp"
    return best, f"does NOT fit: {best} over {world} GPU(s) still needs {peak[best]:.1f} GiB {of}; {remedy}"


def attended_length(settings: FitSettings, corpus: Corpus | None) -> tuple[float, str]:
    """The sequence length attention spans per token: attention runs per packed example (its mean length when
    the corpus is known, else max_length, the bound)."""
    if corpus is not None and corpus.examples and settings.batching == "packed":
        return min(corpus.tokens / corpus.examples, settings.max_length), f"mean example of {corpus.source}"
    return settings.max_length, "data.max_length, the upper bound"


def run_steps(settings: FitSettings, corpus: Corpus | None, world: int) -> tuple[int | None, str]:
    """Optimizer steps of the run, and where the number comes from."""
    if corpus is not None and settings.max_epochs:
        rows = corpus.rows(settings.max_length, settings.batching)
        per_epoch = math.ceil(rows / (settings.batch_size * world))
        steps = per_epoch * settings.max_epochs
        why = (
            f"{settings.max_epochs} epochs x {per_epoch:,} steps; an epoch: {rows:,} rows of {corpus.tokens:,} "
            f"tokens from {corpus.source}"
        )
        if settings.max_steps and settings.max_steps < steps:
            return settings.max_steps, f"trainer.max_steps (before {why})"
        return steps, why
    if settings.max_steps:
        return settings.max_steps, "trainer.max_steps"
    return None, "unknown: pass --tokens N or --tokenized summary.json"


def compute_record(
    shape: Shape, settings: FitSettings, batch: Batch, target: Card, mfu: float, corpus: Corpus | None,
    world: int,
) -> dict:  # fmt: skip
    attended, attended_from = attended_length(settings, corpus)
    per_token = flops_per_token(shape, attended, batch.response_share, settings.model.gradient_checkpointing)
    step_tokens = settings.batch_size * settings.max_length  # data.batch_size packed rows per GPU and step
    step_flops = per_token["total"] * step_tokens
    step_s = step_seconds(step_flops, target.tflops, mfu)
    steps, steps_from = run_steps(settings, corpus, world)
    return {
        "flops_per_token": per_token, "attended_length": attended, "attended_from": attended_from,
        "step_tokens_per_gpu": step_tokens, "step_flops_per_gpu": step_flops, "mfu": mfu,
        "step_seconds": step_s, "steps": steps, "steps_from": steps_from,
        "run_hours": steps * step_s / 3600 if steps else None,
    }  # fmt: skip
