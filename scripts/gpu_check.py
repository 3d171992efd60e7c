#!/usr/bin/env python
"""Every GPU check of the project in one command and one JSON file (about 6 minutes on one H200; ``--budget-s``).

    python scripts/gpu_check.py --output gpu_check.json       # on a CUDA machine
    python scripts/gpu_check.py --dry-run --output dry.json   # anywhere: tiny fp32 shapes on CPU, seconds

Needs torch (CUDA build), transformers, Lightning and peft, and no network: models are randomly initialised
LLaMA shapes saved to a temporary folder with a word-level tokenizer built here; training rows are random
token ids packed by the project's ``pack_rows``/``collate_rows``. A failing check records its error in the
JSON and the next one runs; the file is rewritten after every check.

* ``environment``: versions, GPU, kernels (torch varlen attention and its parameters, SDPA backends).
* First what decides whether training is correct (``scripts/gpu_check_decisive.py``):
  ``packed_{llama,bloom}_{fp32,bf16}`` and ``packed_llama_4bit`` (each packed example's loss and LoRA gradients
  against the example alone, gradient checkpointing on, the backward on CUDA's autograd thread) and
  ``exact_resume`` (REGADataModule; a run stopped after a checkpoint and resumed from it repeats the uninterrupted
  losses; validation per domain). Each has ``ok``; the summary line lists the checks that are not (``wrong``).
* ``attention``: packed attention at LLaMA-7B shape (32 heads x 128, L=2048, ~7 examples a row, 4 rows) and
  with grouped-query heads (8 KV heads): each path's error against an fp32 per-sequence reference, forward +
  backward ms per layer: ``varlen`` (torch's flash varlen kernel, what training runs on CUDA in bf16),
  ``per_sequence`` (SDPA per example, the CPU/fp32 path), ``masked_sdpa`` (one SDPA over the row with the
  block-diagonal mask, as transformers does).
* ``train_*``: REGAModule steps on a 7B-shaped LLaMA (hidden 4096, 32 heads, MLP 11008, vocab 32000) with
  fewer decoder layers (``--layers``, default 4 and 8: a whole 7B does not fit the time budget), gradient
  checkpointing, 8 rows x 2048 tokens per step in micro-batches of 4: tokens/s, model FLOP/s, MFU against the
  dense bf16 peak (``--peak-tflops``: 989 for an H200 SXM), peak memory beside ``rega plan``'s prediction
  (``planned_peak_gib``), loss and LoRA dtypes, the attention path that ran. ``extrapolation`` fits step time,
  FLOPs and memory (measured and planned) linearly in the layer count and reads them at LLaMA-7B's 32 layers. Then ``bf16-true`` (the project's: LoRA weights stay fp32), ``generation``
  (batched sampling with the KV cache), ``qlora`` (if bitsandbytes imports) and ``fsdp2`` (one rank). Steps are
  timed as they train: each batch planned on the host as it moves (rega.modules.batch_plan: no device sync).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, when run as a script

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gpu_check_decisive import PAD, build_tokenizer, exact_resume, packed_vs_alone  # noqa: E402

FULL = dict(device="cuda", dtype="bfloat16", precision="bf16-mixed", rows=4, length=2048, examples=7,
            heads=32, head_dim=128, kv_heads=8, hidden=4096, mlp=11008, vocab=32000, layers=(4, 8),
            batch_rows=8, micro=4, steps=6, warmup=2, repeats=10, prompts=64, new_tokens=128)  # fmt: skip
DRY = dict(FULL, device="cpu", dtype="float32", precision="32-true", rows=2, length=64, examples=4, heads=4,
           head_dim=16, kv_heads=2, hidden=64, mlp=128, vocab=512, layers=(1, 2), batch_rows=4, micro=2,
           steps=2, warmup=1, repeats=2, prompts=4, new_tokens=8)  # fmt: skip
TARGET_LAYERS = 32  # LLaMA-7B


class Report:
    """The JSON, rewritten after every check so a run cut short keeps what it measured."""

    def __init__(self, path: Path, budget_s: float):
        self.path, self.budget_s, self.start = path, budget_s, time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict = {"meta": {"argv": sys.argv[1:], "started": time.strftime("%Y-%m-%dT%H:%M:%S")}}

    def run(self, name: str, fn, *args, **kwargs) -> dict:
        began = time.perf_counter()
        if began - self.start > self.budget_s:
            result = {"skipped": f"time budget of {self.budget_s:.0f} s spent"}
        else:
            try:
                result = fn(*args, **kwargs)
            except Exception as err:  # one failing check never stops the others
                error = f"{type(err).__name__}: {err}"[:2000]
                result = {"error": error, "traceback": traceback.format_exc()[-4000:]}
        result["check_seconds"] = round(time.perf_counter() - began, 2)
        self.data[name] = result
        self.data["meta"]["seconds"] = round(time.perf_counter() - self.start, 1)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))
        return result


def sig(value: float) -> float:
    return float(f"{value:.4g}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def environment(device: str) -> dict:
    from rega.modules.attention import varlen_function

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "peft", "lightning", "bitsandbytes", "flash_attn", "numpy"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception as err:  # absent, or fails to import (bitsandbytes without CUDA)
            versions[name] = f"unavailable: {type(err).__name__}"
    found = varlen_function()
    kernels = {"varlen_attn_parameters": sorted(found[1]) if found else None}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        versions["gpu"] = {"name": props.name, "capability": list(torch.cuda.get_device_capability(0)),
                           "memory_gib": round(props.total_memory / 2**30, 1)}  # fmt: skip
        versions["cudnn"] = torch.backends.cudnn.version()
        backends = torch.backends.cuda
        kernels.update(bf16=torch.cuda.is_bf16_supported(),
                       sdpa_flash=backends.is_flash_attention_available(),
                       sdpa_flash_enabled=backends.flash_sdp_enabled(),
                       sdpa_mem_efficient_enabled=backends.mem_efficient_sdp_enabled(),
                       sdpa_cudnn_enabled=backends.cudnn_sdp_enabled())  # fmt: skip
    return {"versions": versions, "kernels": kernels}


# --- packed attention ---------------------------------------------------------------------------------------
def random_layout(cfg: dict, rng):
    """Rows of ``length`` tokens holding ``examples`` packed sequences each (position ids restart at 0)."""
    from rega.modules.attention import PackedLayout

    position_ids = torch.empty(cfg["rows"], cfg["length"], dtype=torch.long)
    for r in range(cfg["rows"]):
        cuts = np.sort(rng.choice(np.arange(1, cfg["length"]), size=cfg["examples"] - 1, replace=False))
        for s, e in zip([0, *cuts], [*cuts, cfg["length"]]):
            position_ids[r, s:e] = torch.arange(e - s)
    return PackedLayout.of(position_ids.to(cfg["device"]))


def timed_ms(fn, device: str, repeats: int) -> float:
    """Median milliseconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return round(1e3 * float(np.median(times)), 3)


def attention_paths(layout) -> dict:
    from rega.modules.attention import per_sequence_packed, varlen_arguments, varlen_packed

    def masked(q, k, v):  # as transformers' SDPA with a mask: KV heads repeated, one L x L mask per row
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        keep = layout.same_sequence()[:, None]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2)

    paths = {"per_sequence": lambda q, k, v: per_sequence_packed(q, k, v, layout, None, None, 0.0),
             "masked_sdpa": masked}  # fmt: skip
    probe = torch.empty(1, 1, 1, 8, device=layout.starts.device, dtype=torch.bfloat16)
    if varlen_arguments(probe, None, 0.0) is not None:
        paths["varlen"] = lambda q, k, v: varlen_packed(q, k, v, layout, None, varlen_arguments(q, None, 0.0))
    return paths


def attention_case(cfg: dict, kv_heads: int, rng) -> dict:
    from rega.modules.attention import per_sequence_packed

    device, dtype = cfg["device"], getattr(torch, cfg["dtype"])
    layout = random_layout(cfg, rng)
    rows, heads, length, dim = cfg["rows"], cfg["heads"], cfg["length"], cfg["head_dim"]
    inputs = [torch.randn(rows, h, length, dim, device=device) for h in (heads, kv_heads, kv_heads)]
    weight = torch.randn(rows, length, heads, dim, device=device)  # d(loss)/d(output)

    def forward_backward(fn, tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, weight.to(out.dtype))
        return out.detach().float(), [g.float() for g in grads]

    ref, ref_grads = forward_backward(lambda *t: per_sequence_packed(*t, layout, None, None, 0.0), inputs)
    low = [t.to(dtype) for t in inputs]
    shape = dict(rows=rows, heads=heads, kv_heads=kv_heads, length=length, head_dim=dim, dtype=cfg["dtype"])
    result = {"shape": {**shape, "sequences": int(layout.starts.sum())}, "paths": {}}
    for name, fn in attention_paths(layout).items():
        out, grads = forward_backward(fn, low)
        errors = {"out": (out - ref).abs().max() / ref.abs().max()}
        for n, g, r in zip("qkv", grads, ref_grads):
            errors[f"grad_{n}"] = (g - r).abs().max() / r.abs().max()
        leaves = [t.detach().requires_grad_() for t in low]
        step = lambda fn=fn, leaves=leaves: fn(*leaves).backward(weight.to(dtype))  # noqa: E731
        ms = timed_ms(step, device, cfg["repeats"])
        result["paths"][name] = {"max_rel_error_vs_fp32": {k: sig(float(e)) for k, e in errors.items()},
                                 "fwd_bwd_ms_per_layer": ms}  # fmt: skip
    return result


def attention(cfg: dict) -> dict:
    rng = np.random.default_rng(0)
    return {
        "mha_llama7b": attention_case(cfg, cfg["heads"], rng),
        "gqa": attention_case(cfg, cfg["kv_heads"], rng),
    }


# --- a 7B-shaped model, its tokenizer, packed rows ------------------------------------------------------
def model_dir(cfg: dict, layers: int, root: Path) -> Path:
    """A randomly initialised LLaMA of the configured shape with ``layers`` decoder layers, saved once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / f"llama-{layers}l"
    if not (path / "config.json").exists():
        config = LlamaConfig(
            vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["mlp"],
            num_hidden_layers=layers, num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
            max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=PAD,
        )  # fmt: skip
        torch.manual_seed(0)
        with torch.device(cfg["device"]):  # initialised on the GPU: seconds, not minutes
            model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, cfg["dtype"]))
        model.save_pretrained(path, safe_serialization=True)
        build_tokenizer(cfg["vocab"]).save_pretrained(path)
        del model
    return path


def packed_batches(cfg: dict, count: int):
    """``count`` batches of ``batch_rows`` rows, each packing about ``examples`` random examples."""
    from rega.datamodules.tokenized import BatchDataset, TokenizedExamples, pack_rows

    rng = np.random.default_rng(0)  # the same batches in every run, so runs can be compared
    mean = cfg["length"] // cfg["examples"]
    lengths = rng.integers(mean // 2, mean * 3 // 2, size=2 * cfg["batch_rows"] * count * cfg["examples"])
    data = TokenizedExamples(
        tokens=rng.integers(PAD + 1, cfg["vocab"], size=int(lengths.sum())).astype(np.int32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        spans=np.stack([(lengths * 0.6).astype(np.int32), lengths], 1).astype(np.int32),
        span_offsets=np.arange(len(lengths) + 1, dtype=np.int64), domain_ids=np.zeros(len(lengths), dtype=np.int16),
        domains=["random"],
    )  # fmt: skip
    rows = pack_rows(
        lengths.tolist(), cfg["length"]
    )  # longest examples first: shuffled, as plan_batches does
    rows = [rows[i] for i in rng.permutation(len(rows))][: cfg["batch_rows"] * count]
    batches = [rows[i : i + cfg["batch_rows"]] for i in range(0, len(rows), cfg["batch_rows"])]
    return data, BatchDataset(data, batches, pad_id=PAD)


def step_flops(cfg: dict, layers: int, data, rows: list[list[int]]) -> dict:
    """FLOPs of one LoRA step: forward; backward to the inputs only (frozen weights get no weight gradient;
    attention backward 2.5x its forward); causal attention within each example; the LM head on response
    positions only; plus the forward recomputed by gradient checkpointing for ``hardware``."""
    d = cfg["hidden"]
    linear = 2 * (4 * d * d + 3 * d * cfg["mlp"])  # per token and layer, forward (multi-head attention)
    lengths = [int(data.lengths[i]) for row in rows for i in row]
    tokens, pairs = sum(lengths), sum(n * (n + 1) // 2 for n in lengths)
    supervised = sum(int(end - start) for row in rows for i in row for start, end in data.label_spans(i))
    head = 2 * d * cfg["vocab"] * supervised
    layer_forward = linear * tokens + 4 * d * pairs
    model = layers * (2 * linear * tokens + 3.5 * 4 * d * pairs) + 2 * head
    return {"tokens": tokens, "model": model, "hardware": model + layers * layer_forward}


# --- training through REGAModule ----------------------------------------------------------------------------
@contextlib.contextmanager
def counting_attention_paths():
    """Count the calls of each packed-attention path (looked up in the module at call time)."""
    import rega.modules.attention as attention

    names = {"varlen": "varlen_packed", "per_sequence": "per_sequence_packed"}
    originals = {key: getattr(attention, attr) for key, attr in names.items()}
    counts = dict.fromkeys(names, 0)

    def counted(key):
        def call(*args, **kwargs):
            counts[key] += 1
            return originals[key](*args, **kwargs)

        return call

    for key, attr in names.items():
        setattr(attention, attr, counted(key))
    try:
        yield counts
    finally:
        for key, attr in names.items():
            setattr(attention, attr, originals[key])


def fit(cfg: dict, root: Path, layers: int, precision: str, strategy, options: dict, dataset):
    """Train on every batch of ``dataset``; returns the module, the trainer, step times and last loss, and the
    number of calls of each attention path."""
    import lightning as L
    from torch.utils.data import DataLoader

    from rega.config import ModelConfig
    from rega.modules.lit_module import REGAModule
    from rega.modules.model import LoraSettings
    from rega.modules.precision import frozen_half_precision

    class StepTimes(L.Callback):
        def __init__(self):
            self.times, self.loss = [], None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            sync(cfg["device"])
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            sync(cfg["device"])
            self.times.append(time.perf_counter() - self.started)
            self.loss = outputs["loss"] if isinstance(outputs, dict) else outputs

    path = model_dir(cfg, layers, root)
    module = REGAModule(model=ModelConfig(name_or_path=str(path), **options), lora=LoraSettings(),
                        micro_batch_size=cfg["micro"], adapter_dir=str(root / "adapter"))  # fmt: skip
    timer = StepTimes()
    trainer = L.Trainer(**frozen_half_precision(dict(
        accelerator="gpu" if cfg["device"] == "cuda" else "cpu", devices=1, precision=precision,
        strategy=strategy or "auto", max_steps=len(dataset), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
        default_root_dir=str(root),
    )))  # fmt: skip
    if cfg["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loader = DataLoader(dataset, batch_size=None)  # REGAModule plans each batch on the host as it moves
    with counting_attention_paths() as calls:
        trainer.fit(module, train_dataloaders=loader)
    return module, trainer, timer, dict(calls)


def train(
    cfg: dict, root: Path, layers: int, precision: str, peak: float | None, strategy=None, **model
) -> dict:
    from torch.distributed.fsdp import FSDPModule

    gc.collect()  # the previous check's model
    if cfg["device"] == "cuda":
        torch.cuda.empty_cache()
    options = {"dtype": cfg["dtype"], "gradient_checkpointing": True, "chat_template": "vicuna_v1.1", **model}
    data, dataset = packed_batches(cfg, cfg["warmup"] + cfg["steps"])
    module, trainer, timer, calls = fit(cfg, root, layers, precision, strategy, options, dataset)
    timed = range(cfg["warmup"], len(timer.times))
    seconds = sum(timer.times[i] for i in timed)
    flops = [step_flops(cfg, layers, data, dataset.batches[i]) for i in timed]
    params = dict(module.model.named_parameters())
    lora = next(p for n, p in params.items() if "lora_A" in n)
    base = next(p for n, p in params.items() if "q_proj.base_layer" in n)
    cuda = cfg["device"] == "cuda"
    result = {
        "layers": layers, "precision": precision, "model_options": options,
        "strategy": type(trainer.strategy).__name__, "fsdp2_sharded": isinstance(module.model, FSDPModule),
        "steps_timed": len(timed), "rows_per_step": cfg["batch_rows"], "micro_batch_rows": cfg["micro"],
        "row_tokens": cfg["length"], "step_seconds": sig(seconds / len(timed)),
        "examples_per_row": sig(np.mean([len(r) for i in timed for r in dataset.batches[i]])),
        "tokens_per_s": sig(sum(f["tokens"] for f in flops) / seconds),
        "model_flops_per_step": sig(sum(f["model"] for f in flops) / len(timed)),
        "model_tflops_per_s": sig(sum(f["model"] for f in flops) / seconds / 1e12),
        "hardware_tflops_per_s": sig(sum(f["hardware"] for f in flops) / seconds / 1e12),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "planned_peak_gib": planned_peak(cfg, model_dir(cfg, layers, root), precision, options, data, strategy),
        "loss": float(timer.loss), "loss_dtype": str(timer.loss.dtype), "lora_dtype": str(lora.dtype),
        "base_weight_dtype": str(base.dtype), "attention_calls": calls,
    }  # fmt: skip
    if peak:
        result["mfu"] = sig(result["model_tflops_per_s"] * 1e12 / peak)
        result["hfu"] = sig(result["hardware_tflops_per_s"] * 1e12 / peak)
    return result


def planned_peak(cfg: dict, path: Path, precision: str, options: dict, data, strategy) -> float | str:
    """What ``rega plan`` predicts for this run's peak of allocated memory (its peak less the CUDA context, which
    max_memory_allocated does not count), for comparison with the measured peak; or the error it raised."""
    from rega.plan.command import build_plan

    fit = {
        "model": {"model": {"name_or_path": str(path), **options}, "micro_batch_size": cfg["micro"]},
        "data": {"max_length": cfg["length"], "batch_size": cfg["batch_rows"], "batching": "packed"},
        "trainer": {"precision": precision, "devices": 1, "num_nodes": 1},
    }
    share = float((data.spans[:, 1] - data.spans[:, 0]).sum() / data.offsets[-1])  # response tokens' share
    layout = "fsdp2" if strategy else "ddp"
    try:
        plan = build_plan(fit, layout=layout, nodes=1, gpus_per_node=1, response_share=share)
    except Exception as err:  # the measurement stands without it
        return f"{type(err).__name__}: {err}"
    memory = plan["memory_gib"][layout]["on" if options.get("gradient_checkpointing") else "off"]
    return round(memory["peak"] - memory["CUDA context"], 2)


def extrapolation(runs: list[dict], peak: float | None) -> dict:
    """Step time, FLOPs (same batches in both runs) and peak memory linear in the layers, read at 32."""
    a, b = sorted(runs, key=lambda r: r["layers"])

    def at_target(key: str) -> float:
        slope = (b[key] - a[key]) / (b["layers"] - a["layers"])
        return a[key] + (TARGET_LAYERS - a["layers"]) * slope

    seconds = at_target("step_seconds")
    result = {"from_layers": [a["layers"], b["layers"]], "to_layers": TARGET_LAYERS,
              "step_seconds": sig(seconds),
              "seconds_per_layer": sig((b["step_seconds"] - a["step_seconds"]) / (b["layers"] - a["layers"])),
              "tokens_per_s": sig(a["tokens_per_s"] * a["step_seconds"] / seconds),
              "model_tflops_per_s": sig(at_target("model_flops_per_step") / seconds / 1e12)}  # fmt: skip
    if a["peak_memory_gib"] is not None:
        result["peak_memory_gib"] = round(at_target("peak_memory_gib"), 2)
    if all(isinstance(run["planned_peak_gib"], float) for run in (a, b)):
        result["planned_peak_gib"] = round(at_target("planned_peak_gib"), 2)
    if peak:
        result["mfu"] = sig(result["model_tflops_per_s"] * 1e12 / peak)
    return result


def fsdp2(cfg: dict, root: Path, layers: int, peak: float | None) -> dict:
    try:  # the project's FSDP2 strategy where it exists, else Lightning's
        from rega.modules.fsdp import FSDP2Strategy

        strategy = FSDP2Strategy()
    except ImportError:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    return train(cfg, root, layers, cfg["precision"], peak, strategy=strategy)


def qlora(cfg: dict, root: Path, layers: int, peak: float | None) -> dict:
    if cfg["device"] != "cuda":
        return {"skipped": "QLoRA needs CUDA"}
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:
        return {"skipped": f"bitsandbytes does not import: {type(err).__name__}: {err}"[:500]}
    return train(cfg, root, layers, "bf16-mixed", peak, load_in_4bit=True, dtype="bfloat16")


def generation(cfg: dict, root: Path, layers: int) -> dict:
    from rega.config import ModelConfig, SamplingConfig
    from rega.model_source import load_tokenizer
    from rega.modules.generation import generate
    from rega.modules.model import load_model

    config = ModelConfig(name_or_path=str(model_dir(cfg, layers, root)), dtype=cfg["dtype"])
    model = load_model(config).to(cfg["device"]).eval()
    rng = np.random.default_rng(1)
    sizes = rng.integers(32, 256, cfg["prompts"])
    prompts = [rng.integers(PAD + 1, cfg["vocab"], size=int(n)).tolist() for n in sizes]
    sampling, tokenizer = SamplingConfig(max_new_tokens=cfg["new_tokens"]), load_tokenizer(config)
    sync(cfg["device"])
    start = time.perf_counter()
    answers = list(generate(model, tokenizer, prompts, sampling, batch_size=16))
    sync(cfg["device"])
    seconds = time.perf_counter() - start
    new = sum(len(a.token_ids) for a in answers)
    return {"layers": layers, "prompts": len(prompts), "batch_size": 16, "new_tokens": new,
            "seconds": sig(seconds), "new_tokens_per_s": sig(new / seconds)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="gpu_check.json", help="the JSON file to write")
    parser.add_argument("--dry-run", action="store_true", help="tiny fp32 shapes on CPU")
    parser.add_argument("--layers", type=int, nargs=2, help="the decoder-layer counts trained (4 8)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H200 SXM: 989)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no check after this")
    args = parser.parse_args(argv)
    cfg = dict(DRY if args.dry_run else FULL)
    cfg["layers"] = tuple(args.layers or cfg["layers"])
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --dry-run")
    peak = args.peak_tflops * 1e12 if cfg["device"] == "cuda" else None
    report = Report(Path(args.output), args.budget_s)
    report.data["meta"].update(dry_run=args.dry_run, config=cfg, peak_tflops=peak and args.peak_tflops)
    small, large = cfg["layers"]
    with tempfile.TemporaryDirectory(prefix="rega-gpu-check-") as tmp:
        root = Path(tmp)
        report.run("environment", environment, cfg["device"])
        for arch in ("llama", "bloom"):
            for bf16 in (False, True):
                report.run(
                    f"packed_{arch}_{'bf16' if bf16 else 'fp32'}", packed_vs_alone, cfg, root, arch, bf16
                )
        four_bit = dict(load_in_4bit=True, dtype="bfloat16")
        report.run("packed_llama_4bit", packed_vs_alone, cfg, root, "llama", True, **four_bit)
        report.run("exact_resume", exact_resume, cfg, root)
        report.run("attention", attention, cfg)
        runs = [
            report.run(f"train_{n}_layers", train, cfg, root, n, cfg["precision"], peak)
            for n in (small, large)
        ]
        if not any("error" in r or "skipped" in r for r in runs):
            report.run("extrapolation", extrapolation, runs, peak)
        report.run("train_bf16_true", train, cfg, root, small, "bf16-true", peak, dtype="bfloat16")
        report.run("generation", generation, cfg, root, small)
        report.run("qlora", qlora, cfg, root, small, peak)
        report.run("fsdp2", fsdp2, cfg, root, small, peak)  # last: it starts a process group
    failed = [k for k, v in report.data.items() if "error" in v]
    wrong = [k for k, v in report.data.items() if v.get("ok") is False]
    summary = {
        "output": args.output,
        "seconds": report.data["meta"]["seconds"],
        "failed": failed,
        "wrong": wrong,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
