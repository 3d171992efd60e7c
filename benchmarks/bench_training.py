"""Training throughput: our fit loop (REGAModule + REGADataModule, packed rows, Lightning) against a plain
Hugging Face ``transformers.Trainer`` + peft loop, with and without ``group_by_length``.

Same model, same LoRA config (r=16, alpha=32, dropout 0.05, all 7 LLaMA projections), AdamW at 2e-4, same batch
(8 rows) and maximum length (512), same examples with the same token ids and labels (both sides tokenize with
``ChatFormat.encode_many``), fp32, ``OMP_NUM_THREADS`` = ``torch.set_num_threads`` = 2.

Data: the ``rega`` corpus of ``configs/data/shared_en.yaml`` (English domain sets + general_en under the model's
own p_c), randomly subsampled to ``--examples`` examples.

Variants, each in a fresh child process so that its peak RSS is its own:

* ``hf_default``: ``Trainer`` with ``DataCollatorForSeq2Seq`` (pad to the longest in the batch, labels -100 on
  prompt and padding), random order.
* ``hf_sorted``: the same with the whole sample sorted by length into batches of ``--batch-size``, the batches in a
  seeded random order (``sequential`` sampler): HF's padding on a small sample close to group_by_length's on the
  whole corpus, measured rather than estimated (the equal-padding comparison; column *vs HF sorted batches*).
* ``hf_grouped``: the same with ``train_sampling_strategy="group_by_length"`` (``group_by_length=True`` before
  transformers 5).
* ``ours``: ``REGAModule`` + ``REGADataModule(batching="packed")`` under ``lightning.Trainer(max_steps=...)``
  as users run it: one packed row per forward/backward, one optimizer step per batch, LM head on response
  positions only, per-sequence causal attention.
* ``ours+X[+Y]``: ours with the named settings of :data:`PATCHES` (``whole``: the whole batch in one
  forward/backward; ``peftlora``: peft's LoRA forward instead of rega.modules.fast_lora; ``bf16``, ``eager``
  (the masked attention path), ``compile``): ablations,
  and proposals measured before they are applied.

Every variant runs ``--warmup`` steps, then ``--steps`` measured steps (CPU default: one epoch, so that every
variant trains on the same examples; a fixed number of steps would favour ``group_by_length``, whose first batches
are its longest ones, or hurt it, depending on the sample); a step's time is the wall time from the end
of the previous optimizer step to the end of this one (data loading, forward, backward, optimizer and the loop's
own bookkeeping). Variants alternate order over ``--rounds`` rounds; the headline ratio is the median of the
per-round ratios, because timings on a shared 2-core machine drift 20-40 % between repeats.

A separate child checks that both paths compute the same loss: the mean response-token loss of the untrained LoRA
model over the same examples, once the Hugging Face way (full logits, shifted cross-entropy, padded batches) and
once with ``REGAModule.token_losses`` on packed batches in training mode (per-sequence attention, LoRA dropout off).
That micro-batches give the whole batch's gradient is tested in tests/test_training.py.

    .venv/bin/python benchmarks/bench_training.py [--quick] [--variants hf_default hf_grouped ours]
        [--examples 384] [--warmup 2] [--steps 0] [--rounds 2] [--profile]
        [--device cuda]   # GPU: bf16, a 1B-class LLaMA with random weights, MFU against the card's bf16 peak

Goal (issue 7): on CPU, ours >= 1.5x the useful tokens/s of HF Trainer with group_by_length, at <= 1/4 of its
peak RSS, with the same loss before any update.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"


def repo_relative(arg: str) -> str:
    """An argument naming a path inside the repository, relative to it: recorded commands name no machine's paths."""
    path = Path(arg)
    return str(path.relative_to(REPO)) if path.is_absolute() and path.is_relative_to(REPO) else arg


SHARED_CONFIG = REPO / "configs" / "data" / "shared_en.yaml"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LEARNING_RATE = 2e-4
# A 1B-class LLaMA (TinyLlama-1.1B shapes, the embedded tokenizer's vocabulary) for the GPU variant.
RANDOM_MODELS = {
    "random-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, max_position_embeddings=2048),
    "random-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=1024),
}  # fmt: skip
# Dense bf16 peak (TFLOP/s, without sparsity) by device name; override with --peak-tflops.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10": 125.0, "RTX 4090": 165.2}  # fmt: skip


# --- machine ----------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch

    info = {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import lightning
        import peft
        import transformers

        info.update(
            transformers=transformers.__version__, peft=peft.__version__, lightning=lightning.__version__
        )
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- data -------------------------------------------------------------------------------------------------------
def corpus_config(central: str | None = None):
    """The corpus of configs/data/shared_en.yaml; ``central`` fixes p_c (default: the model's own system prompt)."""
    import yaml

    from rega.config import DataSource
    from rega.data.corpus import CorpusConfig
    from rega.data.prompts import PromptConfig

    raw = yaml.safe_load(SHARED_CONFIG.read_text())["corpus"]

    def sources(value) -> list:
        # A source list inline, or the name of a YAML file holding it (relative to the file naming it).
        if isinstance(value, str):
            value = yaml.safe_load((SHARED_CONFIG.parent / value).read_text())
        return [DataSource(**d) for d in value]

    defaults = CorpusConfig()
    return CorpusConfig(
        strategy=raw.get("strategy", defaults.strategy),
        mix_ratio=raw.get("mix_ratio", defaults.mix_ratio),
        seed=raw.get("seed", defaults.seed),
        skip_invalid=raw.get("skip_invalid", False),
        prompts=PromptConfig(**raw.get("prompts", {}), central=central),
        domains=sources(raw["domains"]),
        general=sources(raw["general"]),
    )


def grouped_padding(lengths: list[int], batch_size: int, seeds: int = 3) -> float:
    """Padding share of HF ``group_by_length`` batches over ``lengths`` (its own sampler, averaged over seeds)."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    padded = real = 0
    for seed in range(seeds):
        order = get_length_grouped_indices(lengths, batch_size, generator=torch.Generator().manual_seed(seed))
        for start in range(0, len(order), batch_size):
            batch = [lengths[i] for i in order[start : start + batch_size]]
            padded += max(batch) * len(batch)
            real += sum(batch)
    return 1 - real / padded


def write_examples(path: Path, n: int, seed: int, model_path: str, max_length: int, batch_size: int) -> dict:
    """The real mixed corpus (strategy rega), randomly subsampled to ``n`` examples, written as JSONL.

    Also returns the padding HF ``group_by_length`` leaves on the sample and on the whole corpus: its sampler sorts
    within mega-batches of ``min(50, n // (4 * batch)) * batch`` examples, so a few hundred examples pad several
    times more than the real corpus does."""
    from collections import Counter

    from rega.config import ModelConfig
    from rega.data.chat import ChatFormat
    from rega.data.corpus import build_corpus
    from rega.model_source import load_tokenizer

    chat = ChatFormat(load_tokenizer(ModelConfig(name_or_path=model_path)))
    corpus = build_corpus(corpus_config(), model_default_prompt=chat.default_system)
    examples = random.Random(seed).sample(corpus.examples, min(n, len(corpus.examples)))
    lengths = [len(enc.input_ids) for enc in encode(chat, corpus.examples, max_length)]
    with open(path, "w", encoding="utf-8") as handle:
        for ex in examples:
            handle.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")
    sample_lengths = [len(enc.input_ids) for enc in encode(chat, examples, max_length)]
    return {
        "source": "configs/data/shared_en.yaml (strategy rega)",
        "corpus_examples": len(corpus.examples),
        "sampled": len(examples),
        "hf_grouped_padding_sample": round(grouped_padding(sample_lengths, batch_size), 4),
        "hf_grouped_padding_corpus": round(grouped_padding(lengths, batch_size), 4),
        "by_kind_domain": dict(Counter(f"{e.kind}/{e.domain}" for e in examples)),
    }


def read_examples(path: str):
    from rega.data.strategies import Example

    with open(path, encoding="utf-8") as handle:
        return [Example(**json.loads(line)) for line in handle if line.strip()]


def encode(chat, examples, max_length: int):
    encoded = chat.encode_many([(e.system, e.user_text, e.output) for e in examples], max_length)
    return [enc for enc in encoded if enc is not None]


def make_random_model(kind: str, target: Path, dtype: str) -> str:
    """A LLaMA with random weights and the embedded tokenizer, saved as safetensors (loads like any HF folder)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rega.config import ModelConfig
    from rega.model_source import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **RANDOM_MODELS[kind])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return str(target)


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


# --- ablations: settings passed to REGAModule / the Trainer, no monkeypatching -------------------------------------
# whole: the whole batch in one forward/backward (micro_batch_size None); bf16: Lightning bf16-mixed; eager: eager
# attention (transformers' block-diagonal packed mask, the old masked path); compile: torch.compile per decoder
# layer; peftlora: peft's own LoRA forward (REGAModule(fast_lora=False): a dropout mask per adapter, no fusion).
PATCHES = {"whole", "bf16", "eager", "compile", "peftlora"}


def apply_patches(variant: str) -> list[str]:
    return variant.split("+")[1:]


def module_class(patches: list[str]):
    """REGAModule, or a subclass compiling each decoder layer (one graph reused by all layers)."""
    from rega.modules.lit_module import REGAModule

    if "compile" not in patches:
        return REGAModule

    class CompiledLayers(REGAModule):
        def configure_model(self):
            first = self.model is None
            super().configure_model()
            if first:
                for layer in self.model.get_base_model().get_decoder().layers:
                    layer.compile()

    return CompiledLayers


# --- children ---------------------------------------------------------------------------------------------------
def setup_threads(cfg: dict) -> None:
    import torch

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])


def counts_from_batch(batch) -> tuple[int, int, int]:
    if "token_domain" in batch:
        real = int((batch["token_domain"] >= 0).sum())
    else:
        real = int(batch["attention_mask"].sum())
    return real, int((batch["labels"] != -100).sum()), batch["input_ids"].numel()


def model_config(cfg: dict):
    from rega.config import ModelConfig

    return ModelConfig(name_or_path=cfg["model_path"], dtype=cfg["dtype"], attn_implementation=cfg["attn"])


def run_ours(cfg: dict, variant: str) -> dict:
    import lightning as L

    from rega.data.corpus import Corpus
    from rega.datamodules.rega_datamodule import REGADataModule
    from rega.modules.model import LoraSettings

    patches = apply_patches(variant)
    examples = read_examples(cfg["examples_file"])

    class FixedExamples(REGADataModule):
        def build_corpus(self) -> Corpus:
            return Corpus(examples=examples, prompts=None, manifest={})

    work = Path(tempfile.mkdtemp(prefix="rega-bench-ours-"))
    mc = model_config(cfg)
    if "eager" in patches:
        mc.attn_implementation = "eager"
    datamodule = FixedExamples(
        corpus=corpus_config(), model=mc, max_length=cfg["max_length"], batch_size=cfg["batch_size"],
        batching=cfg["batching"], cache=str(work / "cache"), seed=cfg["seed"],
    )  # fmt: skip
    module = module_class(patches)(
        model=mc, lora=LoraSettings(**LORA), learning_rate=LEARNING_RATE, adapter_dir=str(work / "adapter"),
        micro_batch_size=None if "whole" in patches else 1, seed=cfg["seed"], fast_lora="peftlora" not in patches,
    )  # fmt: skip
    clock = StepClock(cfg["device"] == "cuda")
    profile = cfg.get("profile") and variant in cfg.get("profile_variants", [])
    report: dict = {}

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
        default_root_dir=str(work), callbacks=[Clock()],
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


def run_hf(cfg: dict, grouped: bool, sorted_batches: bool = False) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from rega.data.chat import ChatFormat
    from rega.model_source import load_tokenizer
    from rega.modules.model import LLAMA_PROJECTIONS, load_model

    mc = model_config(cfg)
    tokenizer = load_tokenizer(mc)
    chat = ChatFormat(tokenizer, mc.chat_template, mc.system_placement)
    features = [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
        for e in encode(chat, read_examples(cfg["examples_file"]), cfg["max_length"])
    ]
    model = load_model(mc)
    model.config.use_cache = False  # the usual training setting; also keeps the cache out of the timing
    model = get_peft_model(
        model,
        LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                   target_modules=list(LLAMA_PROJECTIONS), bias="none", task_type="CAUSAL_LM"),
    )  # fmt: skip
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
    cuda = cfg["device"] == "cuda"
    work = tempfile.mkdtemp(prefix="rega-bench-hf-")
    args = TrainingArguments(
        output_dir=work, per_device_train_batch_size=cfg["batch_size"],
        max_steps=cfg["warmup"] + (cfg["steps"] or math.ceil(len(features) / cfg["batch_size"])),
        learning_rate=LEARNING_RATE, weight_decay=0.0, optim="adamw_torch", lr_scheduler_type="cosine",
        train_sampling_strategy="group_by_length" if grouped else "sequential" if sorted_batches else "random",
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=not cuda, bf16=cuda, seed=cfg["seed"],
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=features, data_collator=collator, processing_class=tokenizer,
        callbacks=[Clock()],
    )  # fmt: skip
    try:
        trainer.train()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.update(summarize(clock.steps, cfg["warmup"]))
    if cuda:
        report["cuda_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return report


def run_loss_check(cfg: dict) -> dict:
    """Mean response-token loss of the untrained LoRA model over the same examples, computed both ways."""
    import torch
    import torch.nn.functional as F
    from transformers import DataCollatorForSeq2Seq

    from rega.datamodules.rega_datamodule import REGADataModule
    from rega.datamodules.tokenized import collate_rows, plan_batches
    from rega.modules.lit_module import REGAModule
    from rega.modules.model import LoraSettings

    examples = read_examples(cfg["examples_file"])[: cfg["loss_examples"]]
    mc = model_config(cfg)
    datamodule = REGADataModule(corpus=corpus_config(), model=mc, max_length=cfg["max_length"], batch_size=8)
    data = datamodule.tokenize(examples, sorted({e.domain for e in examples}))
    # Training mode (the per-sequence attention path) without dropout: the loss the first step computes.
    module = REGAModule(model=mc, lora=LoraSettings(**{**LORA, "dropout": 0.0}))
    module.configure_model()
    device = torch.device(cfg["device"])
    module.to(device).train()
    tokenizer = module.tokenizer
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    features = [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
        for e in encode(module.chat, examples, cfg["max_length"])
    ]
    result: dict = {"examples": len(features)}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.no_grad(), autocast:
        total, count = 0.0, 0
        start = time.perf_counter()
        for i in range(0, len(features), cfg["batch_size"]):
            batch = {k: v.to(device) for k, v in pad(features[i : i + cfg["batch_size"]]).items()}
            logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                reduction="sum",
            ).item()  # fmt: skip
            count += int((batch["labels"][:, 1:] != -100).sum())
        result["hf_full_logits"] = {
            "mean_loss": total / count,
            "tokens": count,
            "seconds": time.perf_counter() - start,
        }

        def ours(label: str, bf16: bool = False) -> None:
            total, count = 0.0, 0
            start = time.perf_counter()
            cast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 or device.type == "cuda")
            for rows in plan_batches(
                data.lengths.tolist(), "packed", cfg["batch_size"], cfg["max_length"], 0
            ):
                batch = {k: v.to(device) for k, v in collate_rows(data, rows, tokenizer.pad_token_id).items()}
                with cast:
                    losses, _ = module.token_losses(batch)
                total += float(losses.double().sum())
                count += losses.numel()
            result[label] = {
                "mean_loss": total / count,
                "tokens": count,
                "seconds": time.perf_counter() - start,
            }

        ours("ours_packed")
        if "bf16" in cfg.get("loss_patches", []):
            ours("ours_packed+bf16", bf16=True)
    reference = result["hf_full_logits"]["mean_loss"]
    result["max_abs_diff"] = max(
        abs(v["mean_loss"] - reference) for k, v in result.items() if k.startswith("ours") and "bf16" not in k
    )
    return result


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


def child_main(variant: str, cfg: dict) -> dict:
    setup_threads(cfg)
    load_start = load_average()
    start = time.perf_counter()
    if variant == "loss_check":
        result = run_loss_check(cfg)
    elif variant.startswith("ours"):
        result = run_ours(cfg, variant)
    elif variant in ("hf_default", "hf_grouped", "hf_sorted"):
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


# --- parent -----------------------------------------------------------------------------------------------------
def vm_hwm_mib(pid: int) -> float | None:
    """Peak RSS of a running process (Linux), so a child killed for memory still leaves a lower bound."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def run_child(variant: str, cfg: dict) -> dict:
    """Run one variant in a fresh process; a failure (e.g. the OOM killer) is recorded, not fatal."""
    env = dict(os.environ)
    threads = str(cfg["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--child", variant, "--child-config", json.dumps(cfg)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=REPO, env=env)
        seen = 0.0
        while proc.poll() is None:
            seen = max(seen, vm_hwm_mib(proc.pid) or 0.0)
            time.sleep(0.5)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode == 0:
        return json.loads(stdout.strip().splitlines()[-1])
    sys.stderr.write(stderr[-3000:])
    why = "killed (SIGKILL: the OOM killer?)" if proc.returncode == -9 else f"exit {proc.returncode}"
    print(f"variant {variant} failed: {why}; peak RSS seen >= {seen:,.0f} MiB", flush=True)
    return {
        "variant": variant,
        "failed": why,
        "peak_rss_seen_mib": round(seen, 1),
        "load_average_end": load_average(),
    }


def model_shape(model_path: str):
    """The model's transformers config (``embedded`` and GGUF sources resolved the way rega loads them)."""
    from transformers import AutoConfig

    from rega.config import ModelConfig
    from rega.model_source import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(ModelConfig(name_or_path=model_path)))


def matmul_parameters(model_path: str) -> tuple[int, int]:
    """(decoder, head): weights that take part in matmuls in the decoder layers and in the LM head."""
    c = model_shape(model_path)
    d = c.hidden_size
    kv = c.num_key_value_heads * (d // c.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * c.intermediate_size
    return c.num_hidden_layers * per_layer, d * c.vocab_size


def flops_per_token(model_path: str, context: int) -> float:
    """Training FLOPs per token of a LoRA step: forward 2N + backward to the inputs 2N (frozen weights get no
    weight gradient; the adapters' own FLOPs are negligible), N = matmul parameters (LM head included, embedding
    lookup not); plus attention over ``context`` keys: 4·d per key and layer forward, twice that backward."""
    c = model_shape(model_path)
    decoder, head = matmul_parameters(model_path)
    return 4 * (decoder + head) + 12 * c.num_hidden_layers * context * c.hidden_size


def cpu_gemm_gflops(model_path: str, threads: int, rows: int = 512, seconds: float = 3.0) -> float:
    """This machine's fp32 matmul rate at the model's MLP shape ([rows, d] x [d, intermediate]), with the
    benchmark's threads: the practical ceiling of a training step, whose time is mostly such matmuls."""
    import torch

    c = model_shape(model_path)
    torch.set_num_threads(threads)
    x, w = torch.randn(rows, c.hidden_size), torch.randn(c.intermediate_size, c.hidden_size)
    for _ in range(5):
        x @ w.T
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x @ w.T
        count += 1
    return 2 * rows * c.hidden_size * c.intermediate_size * count / (time.perf_counter() - start) / 1e9


def roofline(summary: dict, model_path: str, gemm_gflops: list[float]) -> dict:
    """Matmul GFLOP/s each variant executes, against the measured GEMM rate, and the FLOP bound on our speed-up.

    Per processed token both sides run the decoder forward and its backward to the inputs (4·decoder FLOPs).
    The LM head (4·head) runs on every processed position for HF (padding included, full logits) and on response
    positions only for us. Attention (a few per cent at this length) is left out.
    """
    decoder, head = matmul_parameters(model_path)
    out: dict = {"gemm_gflops": [round(g, 1) for g in gemm_gflops], "variants": {}}
    for variant, s in summary.items():
        if "failed" in s:
            continue
        head_tokens = s["supervised_tokens_per_s"] if variant.startswith("ours") else s["padded_tokens_per_s"]
        gflops = (4 * decoder * s["padded_tokens_per_s"] + 4 * head * head_tokens) / 1e9
        out["variants"][variant] = {
            "gflops": round(gflops, 1),
            "of_gemm": round(gflops / max(gemm_gflops), 3),
        }
    ours = summary.get("ours", {})
    if "supervised_tokens_per_s" in ours:
        share = ours["supervised_tokens_per_s"] / ours["nonpad_tokens_per_s"]
        # at equal padding, HF's FLOPs per useful token over ours: the most that computing less can buy
        out["response_share"] = round(share, 3)
        out["flop_bound_speedup_at_equal_padding"] = round((decoder + head) / (decoder + head * share), 3)
    return out


def peak_tflops(name: str) -> float | None:
    for key, value in BF16_PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if key in name:
            return value
    return None


def aggregate(
    all_runs: dict[str, list[dict]], baselines: list[str], corpus_padding: float | None = None
) -> dict:
    out: dict = {}
    runs: dict[str, list[dict]] = {}
    for variant, results in all_runs.items():
        failed = [r for r in results if "failed" in r]
        if failed:
            out[variant] = {
                "failed": failed[0]["failed"],
                "failed_rounds": len(failed),
                "peak_rss_seen_mib": max(r["peak_rss_seen_mib"] for r in failed),
            }
            continue  # a variant is compared only when every round of it completed
        runs[variant] = results
    for variant, results in runs.items():
        out[variant] = {
            "nonpad_tokens_per_s": statistics.median(r["nonpad_tokens_per_s"] for r in results),
            "padded_tokens_per_s": statistics.median(r["padded_tokens_per_s"] for r in results),
            "supervised_tokens_per_s": statistics.median(r["supervised_tokens_per_s"] for r in results),
            "padding_fraction": statistics.median(r["padding_fraction"] for r in results),
            "nonpad_tokens_per_cpu_s": statistics.median(r["nonpad_tokens_per_cpu_s"] for r in results),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
            "rounds": len(results),
        }
        if "cuda_peak_allocated_gib" in results[0]:
            out[variant]["cuda_peak_allocated_gib"] = max(r["cuda_peak_allocated_gib"] for r in results)
    if corpus_padding is not None and "hf_grouped" in runs:
        # HF group_by_length at the padding it leaves on the whole corpus: its rate of processed (padded) tokens
        # times the corpus' non-padding share. An estimate: it keeps this sample's sequence lengths.
        hf = runs["hf_grouped"]
        estimate = [r["padded_tokens_per_s"] * (1 - corpus_padding) for r in hf]
        out["hf_grouped"]["nonpad_tokens_per_s_at_corpus_padding"] = round(statistics.median(estimate), 2)
        out["hf_grouped"]["corpus_padding"] = corpus_padding
        for variant, results in runs.items():
            if variant.startswith("ours"):
                out[variant]["speedup_vs_hf_grouped_at_corpus_padding"] = round(
                    statistics.median(a["nonpad_tokens_per_s"] / e for a, e in zip(results, estimate)), 3
                )
    for variant, results in runs.items():
        for base in baselines:
            if base == variant or base not in runs:
                continue
            pairs = list(zip(results, runs[base]))  # same round
            out[variant][f"speedup_vs_{base}"] = round(
                statistics.median(a["nonpad_tokens_per_s"] / b["nonpad_tokens_per_s"] for a, b in pairs), 3
            )
            out[variant][f"supervised_speedup_vs_{base}"] = round(
                statistics.median(
                    a["supervised_tokens_per_s"] / b["supervised_tokens_per_s"] for a, b in pairs
                ),
                3,
            )
            out[variant][f"cpu_time_speedup_vs_{base}"] = round(
                statistics.median(
                    a["nonpad_tokens_per_cpu_s"] / b["nonpad_tokens_per_cpu_s"] for a, b in pairs
                ),
                3,
            )
            out[variant][f"peak_rss_ratio_vs_{base}"] = round(
                out[variant]["peak_rss_mib"] / out[base]["peak_rss_mib"], 3
            )
    return out


def markdown(report: dict) -> str:
    agg, cfg = report["summary"], report["config"]

    def ratio(s: dict, key: str, variant: str, base: str, unit: str) -> str:
        value = 1.0 if variant == base else s.get(f"{key}_vs_{base}")
        return "–" if value is None else f"{value:.2f}{unit}"

    lines = [
        "| variant | non-pad tok/s | response tok/s | padding | peak RSS MiB | vs HF default | vs HF grouped "
        "| vs HF grouped (CPU time) | vs HF grouped at corpus padding | vs HF sorted batches | RSS vs HF grouped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, s in agg.items():
        if "failed" in s:
            lines.append(
                f"| {variant} | {s['failed']} in {s['failed_rounds']} round(s) | | | ≥ {s['peak_rss_seen_mib']:,.0f} "
                "| | | | | | |"
            )
            continue
        lines.append(
            f"| {variant} | {s['nonpad_tokens_per_s']:.1f} | {s['supervised_tokens_per_s']:.1f} | "
            f"{s['padding_fraction']:.1%} | {s['peak_rss_mib']:,.0f} | "
            f"{ratio(s, 'speedup', variant, 'hf_default', 'x')} | {ratio(s, 'speedup', variant, 'hf_grouped', 'x')} | "
            f"{ratio(s, 'cpu_time_speedup', variant, 'hf_grouped', 'x')} | "
            f"{ratio(s, 'speedup', variant, 'hf_grouped_at_corpus_padding', 'x')} | "
            f"{ratio(s, 'speedup', variant, 'hf_sorted', 'x')} | "
            f"{ratio(s, 'peak_rss_ratio', variant, 'hf_grouped', '')} |"
        )
    hf = agg.get("hf_grouped", {})
    if "nonpad_tokens_per_s_at_corpus_padding" in hf:
        data = report["data"]
        lines += ["", f"HF `group_by_length` sorts within mega-batches of min(50, n/32)·8 examples: on this "
                  f"{data['sampled']}-example sample it leaves {data['hf_grouped_padding_sample']:.1%} padding, on the "
                  f"whole {data['corpus_examples']:,}-example corpus {hf['corpus_padding']:.1%}. At the corpus' padding "
                  f"its rate would be ≈ {hf['nonpad_tokens_per_s_at_corpus_padding']:.1f} non-pad tok/s (its measured "
                  "rate of processed tokens × the corpus' non-padding share); the column *at corpus padding* compares "
                  "with that estimate."]  # fmt: skip
    if "mfu" in report:
        lines.append("")
        lines.append(
            "MFU (bf16 peak {peak} TFLOP/s): ".format(peak=report["peak_tflops"])
            + ", ".join(f"{k} {v:.1%}" for k, v in report["mfu"].items())
        )
    roof = report.get("roofline")
    if roof:
        lines += ["", "Matmul GFLOP/s executed (decoder forward + backward to the inputs on every processed token; LM head "
                  "on every processed position for HF, on response positions for ours; attention not counted) "
                  f"against this machine's fp32 GEMM rate at the model's MLP shape, {' / '.join(map(str, roof['gemm_gflops']))} "
                  "GFLOP/s (start / end): " + ", ".join(f"{v} {r['gflops']} ({r['of_gemm']:.0%})"
                                                       for v, r in roof["variants"].items()) + "."]  # fmt: skip
        if "flop_bound_speedup_at_equal_padding" in roof:
            lines.append(f"Response tokens are {roof['response_share']:.0%} of the non-padding tokens, so at equal padding "
                         f"and equal GEMM efficiency computing the LM head only there can make a step at most "
                         f"{roof['flop_bound_speedup_at_equal_padding']:.2f}× faster than HF's.")  # fmt: skip
    loss = report.get("loss_check")
    if loss:
        parts = [
            f"{k} {v['mean_loss']:.5f}" for k, v in loss.items() if isinstance(v, dict) and "mean_loss" in v
        ]
        lines += ["", f"Loss before any update over the same {loss['examples']} examples: " + ", ".join(parts)
                  + f" (max |diff| of the fp32 paths {loss['max_abs_diff']:.2e})."]  # fmt: skip
    lines += ["", f"Settings: {cfg['examples']} examples, batch {cfg['batch_size']}, max length {cfg['max_length']}, "
              f"{cfg['warmup']} warm-up + {cfg['steps'] or 'one epoch of'} measured steps per run, {cfg['rounds']} rounds, "
              f"{cfg['threads']} threads, {cfg['device']}, dtype {cfg['dtype']}."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="160 examples (one epoch each), 1 warm-up step, 32 loss examples"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--model", default=None, help="embedded (CPU default), random-1b (CUDA default), random-tiny"
    )
    parser.add_argument("--variants", nargs="+", default=["hf_default", "hf_grouped", "ours"])
    parser.add_argument(
        "--examples", type=int, default=None, help="examples sampled from the corpus (384; quick 160)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batching", default="packed", help="our batching mode: packed, grouped or padded")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="measured steps; 0 = one epoch (CPU default)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--loss-examples", type=int, default=None, help="examples in the equal-loss check (0: skip)"
    )
    parser.add_argument("--loss-patches", nargs="*", default=None, help="patches also checked for equal loss")
    parser.add_argument(
        "--profile", action="store_true", help="torch.profiler table of our steps (first round)"
    )
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the GPU for MFU")
    parser.add_argument("--output", default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child_main(args.child, json.loads(args.child_config))))
        return None

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    cuda = args.device == "cuda"
    model = args.model or ("random-1b" if cuda else "embedded")
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1 if args.quick else 2)
    # 0 = one epoch after the warm-up: every variant trains on (almost) the same examples, all of them once.
    # Fixed step counts favour HF group_by_length, whose first batches are the longest ones.
    steps = args.steps if args.steps is not None else (20 if cuda else 0)
    args.examples = args.examples or (384 if cuda or not args.quick else 160)
    loss_examples = args.loss_examples if args.loss_examples is not None else (32 if args.quick else 64)
    # the loss check applies patches cumulatively: the ones that keep fp32 numerics first, bf16 last
    patches = sorted({p for v in args.variants for p in v.split("+")[1:]}, key=lambda p: (p == "bf16", p))
    unknown = [p for p in patches if p not in PATCHES]
    if unknown:
        raise SystemExit(f"unknown patch(es) {unknown}; known: {sorted(PATCHES)}")
    output = Path(args.output or RESULTS / ("training_cuda.json" if cuda else "training.json"))
    work = Path(tempfile.mkdtemp(prefix="rega-bench-training-"))

    load_start = load_average()
    start = time.perf_counter()
    dtype = "bfloat16" if cuda else "float32"
    model_path = make_random_model(model, work / model, dtype) if model in RANDOM_MODELS else model
    data_info = write_examples(
        work / "examples.jsonl", args.examples, args.seed, model_path, args.max_length, args.batch_size
    )
    cfg = {
        "examples_file": str(work / "examples.jsonl"), "model": model, "model_path": model_path, "dtype": dtype,
        "device": args.device, "attn": args.attn, "examples": args.examples, "batch_size": args.batch_size,
        "max_length": args.max_length, "batching": args.batching, "warmup": warmup, "steps": steps,
        "rounds": args.rounds, "threads": args.threads, "seed": args.seed, "loss_examples": loss_examples,
        "loss_patches": args.loss_patches if args.loss_patches is not None else patches,
        "profile": args.profile, "profile_steps": args.profile_steps,
        "profile_variants": [v for v in args.variants if v.startswith("ours")],
    }  # fmt: skip
    print(f"machine: {machine_info()['cpu_model']}, {os.cpu_count()} cpus, load {load_start}", flush=True)
    print(f"data: {data_info}", flush=True)

    gemm = [] if cuda else [cpu_gemm_gflops(model_path, args.threads)]  # again at the end: the load drifts
    loss = None
    if loss_examples:
        loss = run_child("loss_check", cfg)
        print("loss check: " + ", ".join(
            f"{k} {v['mean_loss']:.5f}" for k, v in loss.items() if isinstance(v, dict) and "mean_loss" in v
        ) + f" (max |diff| {loss['max_abs_diff']:.2e})", flush=True)  # fmt: skip

    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for k in range(args.rounds):
        order = args.variants if k % 2 == 0 else list(reversed(args.variants))
        for variant in order:
            round_cfg = dict(cfg, profile=cfg["profile"] and k == 0)
            result = run_child(variant, round_cfg)
            result["round"] = k
            runs[variant].append(result)
            if "failed" in result:
                continue
            print(
                f"round {k + 1}/{args.rounds} {variant:>14}: {result['nonpad_tokens_per_s']:7.1f} non-pad tok/s, "
                f"{result['supervised_tokens_per_s']:7.1f} response tok/s, padding {result['padding_fraction']:.1%}, "
                f"peak RSS {result['peak_rss_mib']:,.0f} MiB, load {result['load_average_end'][0]}",
                flush=True,
            )
            if "profile" in result:
                print(result["profile"], flush=True)

    report = {
        "benchmark": "training: ours (REGAModule + REGADataModule, Lightning) vs HF Trainer + peft",
        "command": " ".join([Path(sys.executable).name, *map(repo_relative, sys.argv)])
        if argv is None
        else f"bench_training {argv}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine_info(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "config": {k: v for k, v in cfg.items() if k != "examples_file"},
        "lora": LORA,
        "data": data_info,
        "loss_check": loss,
        "summary": aggregate(
            runs, ["hf_default", "hf_grouped", "hf_sorted", "ours"], data_info["hf_grouped_padding_corpus"]
        ),
        "runs": runs,
        "goal": "ours >= 1.5x HF Trainer group_by_length non-pad tokens/s, peak RSS <= 1/4 of it, equal loss",
    }
    if not cuda:
        gemm.append(cpu_gemm_gflops(model_path, args.threads))
        report["roofline"] = roofline(report["summary"], model_path, gemm)
    if cuda:
        per_token = flops_per_token(model_path, args.max_length // 2)
        peak = args.peak_tflops or peak_tflops(torch.cuda.get_device_name(0))
        report["flops_per_token"] = per_token
        if peak:
            report["peak_tflops"] = peak
            report["mfu"] = {
                v: round(s["nonpad_tokens_per_s"] * per_token / (peak * 1e12), 4)
                for v, s in report["summary"].items()
            }
    shutil.rmtree(work, ignore_errors=True)
    report["markdown"] = markdown(report)
    print(report["markdown"])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    main()
