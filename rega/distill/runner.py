"""Self-distillation of D_g: the base model θ answers general instructions under the central prompt,
y_g ~ θ(p_c ⊕ x_g), with the paper's sampling (temperature 0.7, top-p 0.95).

``rega distill --distill configs/distill/embedded_general_en.yaml`` or, from code (a one-process fit before it
trains, :func:`ensure_distilled`), ``run_distillation(cfg)``. Both write ``output_dir/distilled.jsonl`` and
``summary.json`` (:mod:`rega.distill.output`).

* Fast: prompts are sorted by length and generated in batches with the KV cache (or by vLLM); on several devices
  or nodes (Lightning Fabric) rank r takes the not-yet-done instructions i with i % world_size == r.
* Restartable, exactly once: see :mod:`rega.distill.shards` for the protocol.
* Quality gates: see :mod:`rega.distill.quality` for the labels and the rule that keeps or drops them.
* What each rank derives from the config first: :mod:`rega.distill.context`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from rega.config import MERGED, DistillConfig
from rega.data.records import Record
from rega.distill.backends import HFBackend, VLLMBackend
from rega.distill.context import SUMMARY, Context, build_context, check_config, done_ids, is_complete
from rega.distill.output import merge, summary_text
from rega.distill.shards import (
    ShardWriter,
    check_settings,
    next_run_number,
    output_lock,
    partial_path,
    seal_leftovers,
    write_settings,
)
from rega.errors import ConfigError
from rega.io import waiting_lock
from rega.modules.generation import length_sorted_batches

log = logging.getLogger(__name__)

# Ranks wait at the final barrier for the slowest one; torch's default (30 min) is too short for big pools.
BARRIER_TIMEOUT = timedelta(hours=12)


_DDP_START = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork"}


def _make_backend(cfg: DistillConfig, ctx: Context, device: torch.device):
    if cfg.backend == "vllm":
        tp = cfg.devices if isinstance(cfg.devices, int) else 1
        return VLLMBackend(cfg.model, ctx.tokenizer, cfg.sampling, tensor_parallel_size=tp)
    return HFBackend(cfg.model, ctx.tokenizer, cfg.sampling, device)


def generate_share(
    cfg: DistillConfig,
    ctx: Context,
    mine: list[Record],
    shard: Path,
    device: torch.device,
    show: bool,
    desc: str,
) -> tuple[int, int, float]:
    """Generate this rank's instructions into its shard. Returns (instructions, generated tokens, seconds)."""
    from tqdm.auto import tqdm

    items, prompts = [], []
    for rec in mine:
        ids = ctx.prompt_ids(rec)
        if len(ids) <= cfg.max_prompt_tokens:  # longer ones are counted at merge, never cut
            items.append(rec)
            prompts.append(ids)
    if not items:
        return 0, 0, 0.0
    backend = _make_backend(cfg, ctx, device)
    writer = ShardWriter(shard)
    bar = tqdm(total=len(items), unit="instr", desc=desc, disable=not show, dynamic_ncols=True)
    tokens, start = 0, time.perf_counter()
    try:
        for batch in length_sorted_batches([len(p) for p in prompts], cfg.batch_size, cfg.max_batch_tokens):
            ids = [items[i].id for i in batch]
            gens = backend.generate([prompts[i] for i in batch], ids)
            writer.append(
                [
                    {
                        "id": rid,
                        "user_sha": ctx.user_sha[rid],
                        "text": gen.text,
                        "finish_reason": gen.finish_reason,
                        "tokens": len(gen.token_ids),
                        "backend": cfg.backend,
                    }
                    for rid, gen in zip(ids, gens)
                ]
            )
            tokens += sum(len(g.token_ids) for g in gens)
            bar.update(len(batch))
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.1f} tok/s", refresh=False)
        seconds = time.perf_counter() - start
        writer.finish()
    except BaseException:
        writer.close()  # stays *.partial: the next run seals it
        raise
    finally:
        bar.close()
    return len(items), tokens, seconds


def _worker(fabric, cfg: DistillConfig, progress: bool, ctx: Context | None = None) -> Path:
    """One rank's whole run: (rank 0) lock, settings, seal; generate own share; (rank 0) merge."""
    rank, world = fabric.global_rank, fabric.world_size
    out = Path(cfg.output_dir)
    ctx = ctx or build_context(cfg)
    with contextlib.ExitStack() as held:
        error, run = None, 0
        if rank == 0:
            try:
                held.enter_context(output_lock(out))
                if check_settings(out, ctx.settings):
                    write_settings(out, ctx.settings)
                for note in seal_leftovers(out):
                    log.info(note)
                run = next_run_number(out)
            except Exception as err:  # told to every rank, or they would wait for rank 0 forever
                error = f"{type(err).__name__}: {err}"
                fabric.broadcast((error, run), src=0)
                raise
        error, run = fabric.broadcast((error, run), src=0)
        if error:
            raise ConfigError(f"rank 0 failed: {error}")

        # Every rank reads the same sealed shards, so all agree on what is left and who does what.
        done = done_ids(cfg, ctx)
        todo = [r for r in ctx.records if r.id not in done]
        mine = todo[rank::world]
        if rank == 0:
            log.info(
                "distill: %d instructions, %d done before, %d to generate on %d rank(s)",
                len(ctx.records),
                len(ctx.records) - len(todo),
                len(todo),
                world,
            )
        desc = "distill" if world == 1 else f"distill rank 0/{world}"
        stats = generate_share(
            cfg, ctx, mine, partial_path(out, run, rank, world), fabric.device, progress and rank == 0, desc
        )
        gathered = fabric.all_gather(torch.tensor(stats, dtype=torch.float64, device=fabric.device))
        per_rank = gathered.reshape(-1, 3).tolist()
        fabric.barrier()  # every shard of this run is final before rank 0 reads them
        if rank == 0:
            items, tokens = sum(r[0] for r in per_rank), sum(r[1] for r in per_rank)
            seconds = max(r[2] for r in per_rank)
            run_stats = {
                "run": run,
                "world_size": world,
                "backend": cfg.backend,
                "generated": int(items),
                "generated_tokens": int(tokens),
                "seconds": round(seconds, 3),
                "instructions_per_s": round(items / seconds, 3) if seconds else None,
                "tokens_per_s": round(tokens / seconds, 3) if seconds else None,
            }
            merge(cfg, ctx, run_stats)
        fabric.barrier()  # the merged file exists before any rank returns its path
    return out / MERGED


def _make_fabric(cfg: DistillConfig, in_process: bool):
    from lightning.fabric import Fabric

    if in_process:
        return Fabric(accelerator=cfg.accelerator, devices=1, strategy="auto")
    strategy = cfg.strategy
    if strategy in _DDP_START:
        from lightning.fabric.strategies import DDPStrategy

        strategy = DDPStrategy(start_method=_DDP_START[strategy], timeout=BARRIER_TIMEOUT)
    return Fabric(
        accelerator=cfg.accelerator, devices=cfg.devices, strategy=strategy, num_nodes=cfg.num_nodes
    )


def _run(cfg: DistillConfig, progress: bool, in_process: bool) -> tuple[Path, bool]:
    check_config(cfg)
    ctx = build_context(cfg)
    out = Path(cfg.output_dir)
    check_settings(out, ctx.settings)  # read-only here: refuse before any process or model is started
    if is_complete(cfg, ctx):
        log.info("distill: %s is complete for these settings; nothing to do", out / MERGED)
        return out / MERGED, True
    # Inside a running distributed job (a Trainer's processes) start no processes of our own.
    in_process = in_process or (torch.distributed.is_available() and torch.distributed.is_initialized())
    if cfg.backend == "vllm":
        in_process = True  # vLLM spreads over this node's GPUs itself
    fabric = _make_fabric(cfg, in_process)
    if fabric.world_size == 1:
        return _worker(fabric, cfg, progress, ctx), True
    path = fabric.launch(_worker, cfg, progress)
    return Path(path), fabric.global_rank == 0


def run_distillation(cfg: DistillConfig, *, progress: bool = True, in_process: bool = False) -> Path:
    """Distill D_g as configured and return the merged JSONL; returns at once when it is already complete.

    With several devices, ``strategy: ddp`` re-runs the current command line once per extra rank (Lightning's
    script launcher), so call it with more than one device only from ``rega distill`` or with ``ddp_spawn``.
    ``in_process=True`` (for callers inside a running job, such as a fit before it trains) ignores devices/strategy/num_nodes
    and generates in this process on one device.
    """
    return _run(cfg, progress, in_process)[0]


@contextlib.contextmanager
def preserved_random_state():
    """Leave the global random generators (Python, NumPy, torch CPU and CUDA) as they were: a fit that distils D_g
    first then trains exactly as one whose D_g already existed (sampling consumes random numbers, and the LoRA
    weights are drawn after it, when the model is configured)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


# Fits take turns on this one; `rega distill` holds .distill.lock (and refuses a busy folder).
FIT_LOCK = ".fit.lock"


def _say_waiting(out: Path) -> None:
    log.info("distill: another fit is generating %s; waiting for it", out)


def ensure_distilled(cfg: DistillConfig, processes: int) -> Path:
    """D_g for a training run: generated here when the run is one process, else it must exist already.

    A multi-process fit never distils: one rank would generate for hours while the others wait at a barrier (and
    time out); ``rega distill`` spreads the work over every GPU instead.
    """
    if processes == 1:
        # Fits started together that need the same D_g (a grid's array jobs) take turns: the first generates it,
        # the others wait and find it complete.
        out = Path(cfg.output_dir)
        with waiting_lock(out / FIT_LOCK, on_wait=lambda: _say_waiting(out)), preserved_random_state():
            return run_distillation(cfg, in_process=True)
    check_config(cfg)
    if not is_complete(cfg, build_context(cfg)):
        raise ConfigError(
            f"D_g ({Path(cfg.output_dir) / MERGED}) is missing or incomplete, and a fit on {processes} processes "
            "does not generate it: first run `python cli.py distill --distill FILE` with the distill file your "
            "experiment names under data.distill (scripts/distill_multi_gpu.sh uses every GPU)"
        )
    return Path(cfg.output_dir) / MERGED


def distill_command(distill: DistillConfig, progress: bool = True):
    """Self-distill general instructions with the base model (D_g) and write output_dir/distilled.jsonl.

    Args:
        distill: what to distill, with which model and sampling, where to, on which devices.
        progress: show a progress bar (instructions/s, tokens/s, ETA) on rank 0.
    """
    path, is_rank_zero = _run(distill, progress, in_process=False)
    if is_rank_zero:
        summary = json.loads((path.parent / SUMMARY).read_text(encoding="utf-8"))
        print(summary_text(summary))
        print(f"wrote {path} and {path.parent / SUMMARY}")
