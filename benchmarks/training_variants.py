"""bench_training's variants, each run in its own child process: our Lightning fit, HF Trainer + peft, and the
equal-loss check, with the clock that times their optimizer steps."""

from __future__ import annotations

import math
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import load_average, peak_rss_mib
from benchmarks.training_data import hf_features, read_sample

LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LEARNING_RATE = 2e-4
# Ablations, as settings passed to REGAModule / the Trainer (no subclassing, no monkeypatching): whole: the whole
# batch in one forward/backward (micro_batch_size None); bf16: Lightning bf16-mixed; eager: eager attention
# (transformers' block-diagonal packed mask, the old masked path); compile: torch.compile per decoder layer
# (REGAModule(compile_layers=True)); peftlora: peft's own LoRA forward (REGAModule(fast_lora=False): a dropout mask
# per adapter, no fusion); mbN: N packed rows per forward/backward (micro_batch_size N; the default is 1).
PATCHES = {"whole", "bf16", "eager", "compile", "peftlora"}
MICRO_BATCH_PATCH = re.compile(r"mb([1-9][0-9]*)")
HF_VARIANTS = ("hf_default", "hf_grouped", "hf_sorted")


def apply_patches(variant: str) -> list[str]:
    return variant.split("+")[1:]


def unknown_patches(patches: list[str]) -> list[str]:
    return [p for p in patches if p not in PATCHES and not MICRO_BATCH_PATCH.fullmatch(p)]


def micro_batch_size(patches: list[str]) -> int | None:
    """Rows per forward/backward: None (the whole batch) for ``whole``, N for ``mbN``, else REGAModule's 1."""
    if "whole" in patches:
        return None
    sizes = [int(m.group(1)) for p in patches if (m := MICRO_BATCH_PATCH.fullmatch(p))]
    return sizes[-1] if sizes else 1


# --- step timing ------------------------------------------------------------------------------------------------
class StepClock:
    """Wall time between consecutive optimizer-step ends, with each step's token counts."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.last: float | None = None
        self.steps: list[dict] = []

    def start(self) -> None:
        self.last = time.perf_counter()
        self.last_cpu = time.process_time()

    def tick(self, real: int, supervised: int, total: int) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        now, cpu = time.perf_counter(), time.process_time()
        self.steps.append(
            {"seconds": now - self.last, "cpu_seconds": cpu - self.last_cpu, "real": real,
             "supervised": supervised, "total": total}
        )  # fmt: skip
        self.last, self.last_cpu = now, cpu


def summarize(steps: list[dict], warmup: int) -> dict:
    measured = steps[warmup:]
    seconds = sum(s["seconds"] for s in measured)
    cpu_seconds = sum(s["cpu_seconds"] for s in measured)
    real = sum(s["real"] for s in measured)
    supervised = sum(s["supervised"] for s in measured)
    total = sum(s["total"] for s in measured)
    return {
        "measured_steps": len(measured),
        "seconds": round(seconds, 3),
        "nonpad_tokens": real,
        "supervised_tokens": supervised,
        "padded_tokens": total,
        "nonpad_tokens_per_s": round(real / seconds, 2),
        "padded_tokens_per_s": round(total / seconds, 2),
        "supervised_tokens_per_s": round(supervised / seconds, 2),
        "padding_fraction": round(1 - real / max(1, total), 4),
        # CPU time of all our threads: less sensitive to other processes' load than wall time (not immune:
        # OpenMP threads spin while they wait for a descheduled sibling)
        "cpu_seconds": round(cpu_seconds, 3),
        "nonpad_tokens_per_cpu_s": round(real / cpu_seconds, 2),
        "step_seconds": [round(s["seconds"], 3) for s in steps],
        "step_nonpad_tokens": [s["real"] for s in steps],
    }


def counts_from_batch(batch) -> tuple[int, int, int]:
    if "token_domain" in batch:
        real = int((batch["token_domain"] >= 0).sum())
    else:
        real = int(batch["attention_mask"].sum())
    return real, int((batch["labels"] != -100).sum()), batch["input_ids"].numel()


def start_profiler():
    import torch

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)
    profiler.__enter__()
    return profiler


def stop_profiler(profiler) -> str:
    profiler.__exit__(None, None, None)
    return profiler.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60
    )


# --- children ---------------------------------------------------------------------------------------------------
def setup_threads(cfg: dict) -> None:
    import torch

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])


def model_config(cfg: dict):
    from rega.config import ModelConfig

    return ModelConfig(name_or_path=cfg["model_path"], dtype=cfg["dtype"], attn_implementation=cfg["attn"])


def ours_parts(cfg: dict, patches: list[str], work: Path):
    """(data module, REGAModule) of an ``ours`` variant: the sample's corpus folder, the patches as settings."""
    from rega.datamodules.rega_datamodule import REGADataModule
    from rega.modules.lit_module import REGAModule
    from rega.modules.model import LoraSettings

    mc = model_config(cfg)
    if "eager" in patches:
        mc.attn_implementation = "eager"
    datamodule = REGADataModule(
        corpus_dir=cfg["corpus_dir"], model=mc, max_length=cfg["max_length"], batch_size=cfg["batch_size"],
        batching=cfg["batching"], cache=str(work / "cache"), seed=cfg["seed"],
    )  # fmt: skip
    module = REGAModule(
        model=mc, lora=LoraSettings(**LORA), learning_rate=LEARNING_RATE, adapter_dir=str(work / "adapter"),
        micro_batch_size=micro_batch_size(patches), seed=cfg["seed"], fast_lora="peftlora" not in patches,
        compile_layers="compile" in patches,
    )  # fmt: skip
    return datamodule, module


def lightning_clock(clock: StepClock, cfg: dict, report: dict, profile: bool):
    """A Lightning callback that ticks ``clock`` at every step's end (and profiles the first measured steps)."""
    import lightning as L

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module):
            report["rss_after_setup_mib"] = round(peak_rss_mib(), 1)
            clock.start()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.counts = counts_from_batch(batch)
            if profile and batch_idx == cfg["warmup"]:
                self.profiler = start_profiler()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.tick(*self.counts)
            if profile and batch_idx == cfg["warmup"] + cfg["profile_steps"] - 1:
                report["profile"] = stop_profiler(self.profiler)

    return Clock()


def run_ours(cfg: dict, variant: str) -> dict:
    import lightning as L

    patches = apply_patches(variant)
    work = Path(tempfile.mkdtemp(prefix="rega-bench-ours-"))
    datamodule, module = ours_parts(cfg, patches, work)
    clock = StepClock(cfg["device"] == "cuda")
    profile = cfg.get("profile") and variant in cfg.get("profile_variants", [])
    report: dict = {}
    cuda = cfg["device"] == "cuda"
    steps = cfg["steps"]
    if steps == 0:  # one epoch: every example once (after the warm-up)
        datamodule.prepare_data()
        datamodule.setup("fit")
        steps = len(datamodule.train_dataloader())
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1,
        precision="bf16-mixed" if cuda or "bf16" in patches else "32-true",
        max_steps=cfg["warmup"] + steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=str(work), callbacks=[lightning_clock(clock, cfg, report, profile)],
    )  # fmt: skip
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.update(summarize(clock.steps, cfg["warmup"]))
    report["patches"] = patches
    return report


def sorted_batches_order(lengths: list[int], batch_size: int, seed: int) -> list[int]:
    """Example order for ``hf_sorted``: the whole sample sorted by length, cut into batches, batches shuffled (a
    seeded order): HF then pads about as little on a small sample as group_by_length does on the whole corpus."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return [i for batch in batches for i in batch]


def hf_parts(cfg: dict):
    """(tokenizer, peft model, Trainer rows) of the HF variants: the same examples, the same LoRA."""
    from peft import LoraConfig, get_peft_model

    from rega.data.chat import ChatFormat
    from rega.model_source import load_tokenizer
    from rega.modules.architectures import LLAMA_PROJECTIONS
    from rega.modules.model import load_model

    mc = model_config(cfg)
    tokenizer = load_tokenizer(mc)
    chat = ChatFormat(tokenizer, mc.chat_template, mc.system_placement)
    features = hf_features(chat, read_sample(cfg["corpus_dir"]), cfg["max_length"])
    model = load_model(mc)
    model.config.use_cache = False  # the usual training setting; also keeps the cache out of the timing
    model = get_peft_model(
        model,
        LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                   target_modules=list(LLAMA_PROJECTIONS), bias="none", task_type="CAUSAL_LM"),
    )  # fmt: skip
    return tokenizer, model, features


def hf_arguments(cfg: dict, work: str, rows: int, grouped: bool, sorted_batches: bool):
    from transformers import TrainingArguments

    cuda = cfg["device"] == "cuda"
    return TrainingArguments(
        output_dir=work, per_device_train_batch_size=cfg["batch_size"],
        max_steps=cfg["warmup"] + (cfg["steps"] or math.ceil(rows / cfg["batch_size"])),
        learning_rate=LEARNING_RATE, weight_decay=0.0, optim="adamw_torch", lr_scheduler_type="cosine",
        train_sampling_strategy="group_by_length" if grouped else "sequential" if sorted_batches else "random",
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=not cuda, bf16=cuda, seed=cfg["seed"],
    )  # fmt: skip


def run_hf(cfg: dict, grouped: bool, sorted_batches: bool = False) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback

    tokenizer, model, features = hf_parts(cfg)
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    pending: list[tuple[int, int, int]] = []  # batches are collated ahead of their step (FIFO)

    def collator(rows):
        batch = pad(rows)
        pending.append(counts_from_batch(batch))
        return batch

    clock = StepClock(cfg["device"] == "cuda")
    report: dict = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            report["rss_after_setup_mib"] = round(peak_rss_mib(), 1)
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.tick(*pending.pop(0))

    if sorted_batches:
        order = sorted_batches_order([len(f["input_ids"]) for f in features], cfg["batch_size"], cfg["seed"])
        features = [features[i] for i in order]
    work = tempfile.mkdtemp(prefix="rega-bench-hf-")
    trainer = Trainer(
        model=model, args=hf_arguments(cfg, work, len(features), grouped, sorted_batches), train_dataset=features,
        data_collator=collator, processing_class=tokenizer, callbacks=[Clock()],
    )  # fmt: skip
    try:
        trainer.train()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.update(summarize(clock.steps, cfg["warmup"]))
    if cfg["device"] == "cuda":
        report["cuda_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return report


# --- the equal-loss check ---------------------------------------------------------------------------------------
def hf_loss(module, features: list[dict], batch_size: int, device) -> dict:
    """Mean response-token loss the Hugging Face way: padded batches, full logits, shifted cross-entropy."""
    import torch.nn.functional as F
    from transformers import DataCollatorForSeq2Seq

    pad = DataCollatorForSeq2Seq(module.tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    total, count = 0.0, 0
    start = time.perf_counter()
    for i in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in pad(features[i : i + batch_size]).items()}
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100,
            reduction="sum",
        ).item()  # fmt: skip
        count += int((batch["labels"][:, 1:] != -100).sum())
    return {"mean_loss": total / count, "tokens": count, "seconds": time.perf_counter() - start}


def ours_loss(module, data, cfg: dict, device, bf16: bool = False) -> dict:
    """Mean response-token loss our way: ``REGAModule.token_losses`` on packed batches."""
    import torch

    from rega.datamodules.tokenized import collate_rows, plan_batches

    total, count = 0.0, 0
    start = time.perf_counter()
    cast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 or device.type == "cuda")
    for rows in plan_batches(data.lengths.tolist(), "packed", cfg["batch_size"], cfg["max_length"], 0):
        batch = {k: v.to(device) for k, v in collate_rows(data, rows, module.tokenizer.pad_token_id).items()}
        with cast:
            losses, _ = module.token_losses(batch)
        total += float(losses.double().sum())
        count += losses.numel()
    return {"mean_loss": total / count, "tokens": count, "seconds": time.perf_counter() - start}


def run_loss_check(cfg: dict) -> dict:
    """Mean response-token loss of the untrained LoRA model over the same examples, computed both ways."""
    import torch

    from rega.datamodules.tokenized import domain_list, tokenize
    from rega.modules.lit_module import REGAModule
    from rega.modules.model import LoraSettings

    examples = read_sample(cfg["corpus_dir"])[: cfg["loss_examples"]]
    mc = model_config(cfg)
    # Training mode (the per-sequence attention path) without dropout: the loss the first step computes.
    module = REGAModule(model=mc, lora=LoraSettings(**{**LORA, "dropout": 0.0}))
    data = tokenize(module.chat, examples, domain_list(examples), cfg["max_length"])
    module.configure_model()
    device = torch.device(cfg["device"])
    module.to(device).train()
    features = hf_features(module.chat, examples, cfg["max_length"])
    result: dict = {"examples": len(features)}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.no_grad(), autocast:
        result["hf_full_logits"] = hf_loss(module, features, cfg["batch_size"], device)
        result["ours_packed"] = ours_loss(module, data, cfg, device)
        if "bf16" in cfg.get("loss_patches", []):
            result["ours_packed+bf16"] = ours_loss(module, data, cfg, device, bf16=True)
    reference = result["hf_full_logits"]["mean_loss"]
    result["max_abs_diff"] = max(
        abs(v["mean_loss"] - reference) for k, v in result.items() if k.startswith("ours") and "bf16" not in k
    )
    return result


def child_main(variant: str, cfg: dict) -> dict:
    setup_threads(cfg)
    load_start = load_average()
    start = time.perf_counter()
    if variant == "loss_check":
        result = run_loss_check(cfg)
    elif variant.startswith("ours"):
        result = run_ours(cfg, variant)
    elif variant in HF_VARIANTS:
        result = run_hf(cfg, grouped=variant == "hf_grouped", sorted_batches=variant == "hf_sorted")
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    import torch

    result.update(
        variant=variant,
        wall_seconds=round(time.perf_counter() - start, 1),
        peak_rss_mib=round(peak_rss_mib(), 1),
        torch_threads=torch.get_num_threads(),
        load_average_start=load_start,
        load_average_end=load_average(),
    )
    if torch.cuda.is_available() and cfg["device"] == "cuda":
        result["cuda_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result
