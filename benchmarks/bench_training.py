"""Training throughput: our fit loop (REGAModule + REGADataModule, packed rows, Lightning) against a plain
Hugging Face ``transformers.Trainer`` + peft loop, with and without ``group_by_length``.

Same model, same LoRA config (r=16, alpha=32, dropout 0.05, all 7 LLaMA projections), AdamW at 2e-4, same batch
(8 rows) and maximum length (512), same examples with the same token ids and labels (both sides tokenize with
``ChatFormat.encode_many``), fp32, ``OMP_NUM_THREADS`` = ``torch.set_num_threads`` = 2.

Data: the ``rega`` corpus of ``configs/data/shared_en.yaml`` (English domain sets + general_en under the model's
own p_c), randomly subsampled to ``--examples`` examples and written as a corpus folder (what ``rega corpus``
writes): ours reads it with ``REGADataModule(corpus_dir=...)``, the HF variants and the loss check read its examples.

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
* ``ours+X[+Y]``: ours with the named settings of ``training_variants.PATCHES`` (``whole``: the whole batch in one
  forward/backward; ``peftlora``: peft's LoRA forward instead of rega.modules.fast_lora; ``bf16``, ``eager``
  (the masked attention path), ``compile``, ``mbN``: N packed rows per forward/backward): ablations,
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
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, load_average, machine_info, repo_relative, vm_hwm_mib  # noqa: E402
from benchmarks.training_data import RANDOM_MODELS, make_random_model, write_sample  # noqa: E402
from benchmarks.training_report import (  # noqa: E402
    aggregate,
    cpu_gemm_gflops,
    flops_per_token,
    loss_parts,
    markdown,
    mfu,
    peak_tflops,
    roofline,
)
from benchmarks.training_variants import LORA, PATCHES, child_main, unknown_patches  # noqa: E402

BASELINES = ["hf_default", "hf_grouped", "hf_sorted", "ours"]


# --- command line -----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
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
    return parser


def defaults(args: argparse.Namespace) -> dict:
    """The settings whose defaults depend on ``--device`` and ``--quick``."""
    cuda = args.device == "cuda"
    return {
        "model": args.model or ("random-1b" if cuda else "embedded"),
        "warmup": args.warmup if args.warmup is not None else (3 if cuda else 1 if args.quick else 2),
        # 0 = one epoch after the warm-up: every variant trains on (almost) the same examples, all of them once.
        # Fixed step counts favour HF group_by_length, whose first batches are the longest ones.
        "steps": args.steps if args.steps is not None else (20 if cuda else 0),
        "examples": args.examples or (384 if cuda or not args.quick else 160),
        "loss_examples": args.loss_examples if args.loss_examples is not None else (32 if args.quick else 64),
    }


def variant_patches(variants: list[str]) -> list[str]:
    """Every patch the variants name, checked; in the order the loss check applies them cumulatively: the ones
    that keep fp32 numerics first, bf16 last."""
    patches = sorted({p for v in variants for p in v.split("+")[1:]}, key=lambda p: (p == "bf16", p))
    unknown = unknown_patches(patches)
    if unknown:
        raise SystemExit(f"unknown patch(es) {unknown}; known: {sorted(PATCHES)} and mbN")
    return patches


def child_config(args: argparse.Namespace, chosen: dict, patches: list[str], work: Path) -> tuple[dict, dict]:
    """(what every child reads, the data's description): the model (made here when it is a random one) and the
    sampled examples, written under ``work``."""
    cuda = args.device == "cuda"
    model = chosen["model"]
    dtype = "bfloat16" if cuda else "float32"
    model_path = make_random_model(model, work / model, dtype) if model in RANDOM_MODELS else model
    data_info = write_sample(
        work / "corpus", chosen["examples"], args.seed, model_path, args.max_length, args.batch_size
    )
    cfg = {
        "corpus_dir": str(work / "corpus"), "model": model, "model_path": model_path, "dtype": dtype,
        "device": args.device, "attn": args.attn, "examples": chosen["examples"], "batch_size": args.batch_size,
        "max_length": args.max_length, "batching": args.batching, "warmup": chosen["warmup"],
        "steps": chosen["steps"], "rounds": args.rounds, "threads": args.threads, "seed": args.seed,
        "loss_examples": chosen["loss_examples"],
        "loss_patches": args.loss_patches if args.loss_patches is not None else patches,
        "profile": args.profile, "profile_steps": args.profile_steps,
        "profile_variants": [v for v in args.variants if v.startswith("ours")],
    }  # fmt: skip
    return cfg, data_info


# --- runs, each in a child process ------------------------------------------------------------------------------
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


def loss_check(cfg: dict) -> dict | None:
    if not cfg["loss_examples"]:
        return None
    loss = run_child("loss_check", cfg)
    print(f"loss check: {loss_parts(loss)} (max |diff| {loss['max_abs_diff']:.2e})", flush=True)
    return loss


def run_rounds(variants: list[str], rounds: int, cfg: dict) -> dict[str, list[dict]]:
    """Every variant once a round, in alternating order (the load drifts); profiled in the first round only."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for k in range(rounds):
        order = variants if k % 2 == 0 else list(reversed(variants))
        for variant in order:
            round_cfg = dict(cfg, profile=cfg["profile"] and k == 0)
            result = run_child(variant, round_cfg)
            result["round"] = k
            runs[variant].append(result)
            if "failed" in result:
                continue
            print(
                f"round {k + 1}/{rounds} {variant:>14}: {result['nonpad_tokens_per_s']:7.1f} non-pad tok/s, "
                f"{result['supervised_tokens_per_s']:7.1f} response tok/s, padding {result['padding_fraction']:.1%}, "
                f"peak RSS {result['peak_rss_mib']:,.0f} MiB, load {result['load_average_end'][0]}",
                flush=True,
            )
            if "profile" in result:
                print(result["profile"], flush=True)
    return runs


# --- the report -------------------------------------------------------------------------------------------------
def base_report(argv, cfg: dict, data_info: dict, loss, runs: dict, load_start: list, start: float) -> dict:
    return {
        "benchmark": "training: ours (REGAModule + REGADataModule, Lightning) vs HF Trainer + peft",
        "command": " ".join([Path(sys.executable).name, *map(repo_relative, sys.argv)])
        if argv is None
        else f"bench_training {argv}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine_info(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "config": {k: v for k, v in cfg.items() if k != "corpus_dir"},
        "lora": LORA,
        "data": data_info,
        "loss_check": loss,
        "summary": aggregate(runs, BASELINES, data_info["hf_grouped_padding_corpus"]),
        "runs": runs,
        "goal": "ours >= 1.5x HF Trainer's non-pad tokens/s at the corpus' padding, >= 60% of the GEMM rate in "
        "matmul FLOPs, peak RSS <= 1/4 of HF's, equal loss",
    }


def add_flops(report: dict, cfg: dict, gemm: list[float], peak: float | None) -> None:
    """CPU: the roofline against this machine's GEMM rate (measured again now); GPU: MFU against the bf16 peak."""
    if cfg["device"] != "cuda":
        gemm.append(cpu_gemm_gflops(cfg["model_path"], cfg["threads"]))
        report["roofline"] = roofline(report["summary"], cfg["model_path"], gemm)
        return
    import torch

    per_token = flops_per_token(cfg["model_path"], cfg["max_length"] // 2)
    peak = peak or peak_tflops(torch.cuda.get_device_name(0))
    report["flops_per_token"] = per_token
    if peak:
        report["peak_tflops"] = peak
        report["mfu"] = mfu(report["summary"], per_token, peak)


def main(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(child_main(args.child, json.loads(args.child_config))))
        return None

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    cuda = args.device == "cuda"
    chosen = defaults(args)
    patches = variant_patches(args.variants)
    output = Path(args.output or RESULTS / ("training_cuda.json" if cuda else "training.json"))
    work = Path(tempfile.mkdtemp(prefix="rega-bench-training-"))

    load_start = load_average()
    start = time.perf_counter()
    cfg, data_info = child_config(args, chosen, patches, work)
    print(f"machine: {machine_info()['cpu_model']}, {os.cpu_count()} cpus, load {load_start}", flush=True)
    print(f"data: {data_info}", flush=True)

    # the GEMM rate again at the end: the load drifts
    gemm = [] if cuda else [cpu_gemm_gflops(cfg["model_path"], args.threads)]
    loss = loss_check(cfg)
    runs = run_rounds(args.variants, args.rounds, cfg)
    report = base_report(argv, cfg, data_info, loss, runs, load_start, start)
    add_flops(report, cfg, gemm, args.peak_tflops)
    shutil.rmtree(work, ignore_errors=True)
    report["markdown"] = markdown(report)
    print(report["markdown"])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    main()
