"""benchmarks/bench_training.py without running it: its command line, the medians and ratios of its report and
the markdown table (a synthetic run set; nothing is timed, no model loads)."""

from __future__ import annotations

import pytest

from benchmarks.bench_training import build_parser, defaults, variant_patches
from benchmarks.common import REPO, repo_relative
from benchmarks.run_all import training_goal
from benchmarks.training_report import aggregate, equal_padding_base, markdown, mfu, table
from benchmarks.training_variants import apply_patches, micro_batch_size, summarize

BASELINES = ["hf_default", "hf_grouped", "hf_sorted", "ours"]


def run(variant: str, rnd: int, tokens_per_s: float, rss: float = 1000.0) -> dict:
    return {"variant": variant, "round": rnd, "nonpad_tokens_per_s": tokens_per_s,
            "padded_tokens_per_s": tokens_per_s * 1.25, "supervised_tokens_per_s": tokens_per_s / 2,
            "padding_fraction": 0.2, "nonpad_tokens_per_cpu_s": tokens_per_s / 2, "peak_rss_mib": rss}  # fmt: skip


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], {"model": "embedded", "warmup": 2, "steps": 0, "examples": 384, "loss_examples": 64}),
        (["--quick"], {"model": "embedded", "warmup": 1, "steps": 0, "examples": 160, "loss_examples": 32}),
        (["--device", "cuda"], {"model": "random-1b", "warmup": 3, "steps": 20, "examples": 384, "loss_examples": 64}),
        (["--quick", "--warmup", "0", "--steps", "5", "--examples", "24", "--loss-examples", "0", "--model", "x"],
         {"model": "x", "warmup": 0, "steps": 5, "examples": 24, "loss_examples": 0}),
    ],
)  # fmt: skip
def test_defaults_follow_device_and_quick(argv, expected):
    assert defaults(build_parser().parse_args(argv)) == expected


def test_patches_are_checked_and_bf16_comes_last():
    assert variant_patches(["hf_default", "ours+bf16+whole", "ours+eager"]) == ["eager", "whole", "bf16"]
    with pytest.raises(SystemExit, match="unknown patch"):
        variant_patches(["ours+maskedattn"])
    with pytest.raises(SystemExit, match="unknown patch"):
        variant_patches(["ours+mb0"])


@pytest.mark.parametrize(
    "variant, rows",
    [("ours", 1), ("ours+mb2", 2), ("ours+bf16+mb4", 4), ("ours+whole", None), ("ours+mb2+whole", None)],
)
def test_micro_batch_patch_sets_rows_per_forward(variant, rows):
    variant_patches([variant])  # accepted
    assert micro_batch_size(apply_patches(variant)) == rows


def test_recorded_paths_are_relative_to_the_repository():
    assert repo_relative(str(REPO / "benchmarks" / "results" / "x.json")) == "benchmarks/results/x.json"
    assert repo_relative("--quick") == "--quick"


def test_summarize_leaves_out_the_warm_up():
    steps = [{"seconds": 9.0, "cpu_seconds": 9.0, "real": 1, "supervised": 1, "total": 1}] + [
        {"seconds": 2.0, "cpu_seconds": 4.0, "real": 80, "supervised": 40, "total": 100}
    ] * 2
    s = summarize(steps, warmup=1)
    assert (s["measured_steps"], s["nonpad_tokens_per_s"], s["padding_fraction"]) == (2, 40.0, 0.2)
    assert s["nonpad_tokens_per_cpu_s"] == 20.0 and s["step_seconds"] == [9.0, 2.0, 2.0]


def test_aggregate_takes_per_round_ratios_and_sets_failed_variants_apart():
    runs = {
        "hf_grouped": [run("hf_grouped", 0, 100.0, 4000.0), run("hf_grouped", 1, 50.0, 4000.0)],
        "ours": [run("ours", 0, 200.0), run("ours", 1, 150.0)],
        "ours+bf16": [{"variant": "ours+bf16", "failed": "exit 1", "peak_rss_seen_mib": 777.0}, run("ours+bf16", 1, 9)],
    }  # fmt: skip
    summary = aggregate(runs, BASELINES, corpus_padding=0.1)
    ours = summary["ours"]
    assert ours["nonpad_tokens_per_s"] == 175.0 and ours["rounds"] == 2
    assert ours["speedup_vs_hf_grouped"] == 2.5  # median of 2.0 and 3.0, not 175 / 75
    assert ours["peak_rss_ratio_vs_hf_grouped"] == 0.25
    # HF at the corpus' padding: its processed-token rate times the corpus' non-padding share, round by round
    assert summary["hf_grouped"]["nonpad_tokens_per_s_at_corpus_padding"] == round((125 + 62.5) / 2 * 0.9, 2)
    assert ours["speedup_vs_hf_grouped_at_corpus_padding"] == round((200 / 112.5 + 150 / 56.25) / 2, 3)
    assert summary["ours+bf16"] == {"failed": "exit 1", "failed_rounds": 1, "peak_rss_seen_mib": 777.0}
    assert summary["hf_grouped"]["speedup_vs_ours"] == 0.417  # every pair of compared variants, both ways


def test_markdown_has_a_row_per_variant_and_the_settings():
    runs = {"hf_grouped": [run("hf_grouped", 0, 100.0)], "ours": [run("ours", 0, 200.0)],
            "ours+bf16": [{"failed": "killed", "peak_rss_seen_mib": 5000.0}]}  # fmt: skip
    report = {
        "summary": aggregate(runs, BASELINES),
        "config": {"examples": 24, "batch_size": 8, "max_length": 512, "warmup": 1, "steps": 0, "rounds": 1,
                   "threads": 2, "device": "cpu", "dtype": "float32"},
        "loss_check": {"examples": 4, "hf_full_logits": {"mean_loss": 1.5}, "ours_packed": {"mean_loss": 1.5},
                       "max_abs_diff": 1e-7},
    }  # fmt: skip
    lines = markdown(report).splitlines()
    assert lines[0].startswith("| variant | non-pad tok/s |") and lines[1].startswith("|---|")
    assert lines[2].startswith("| ours+bf16 | killed in 1 round(s) | | | ≥ 5,000")  # failed variants first
    assert lines[3] == "| hf_grouped | 100.0 | 50.0 | 20.0% | 1,000 | – | 1.00x | 1.00x | – | – | 1.00 |"
    assert lines[4].startswith("| ours | 200.0 | 100.0 | 20.0% | 1,000 | – | 2.00x | 2.00x |")
    assert "hf_full_logits 1.50000, ours_packed 1.50000 (max |diff| of the fp32 paths 1.00e-07)" in lines[6]
    assert lines[-1] == ("Settings: 24 examples, batch 8, max length 512, 1 warm-up + one epoch of measured steps "
                         "per run, 1 rounds, 2 threads, cpu, dtype float32.")  # fmt: skip


def test_equal_padding_headline_prefers_hf_on_sorted_batches():
    runs = {
        "hf_grouped": [run("hf_grouped", 0, 100.0, 4000.0)],
        "hf_sorted": [run("hf_sorted", 0, 120.0, 5000.0)],
        "ours": [run("ours", 0, 180.0)],
    }  # fmt: skip
    summary = aggregate(runs, BASELINES, corpus_padding=0.1)
    # each HF baseline at the corpus' padding: its processed-token rate (1.25 × non-pad here) × 0.9
    assert summary["hf_sorted"]["nonpad_tokens_per_s_at_corpus_padding"] == 135.0
    assert summary["ours"]["speedup_vs_hf_sorted_at_corpus_padding"] == round(180 / 135, 3)
    assert summary["ours"]["speedup_vs_hf_grouped_at_corpus_padding"] == round(180 / 112.5, 3)
    assert equal_padding_base(summary) == "hf_sorted"
    assert (
        equal_padding_base(aggregate({k: runs[k] for k in ("hf_grouped", "ours")}, BASELINES, 0.1))
        == "hf_grouped"
    )
    assert equal_padding_base(aggregate(runs, BASELINES)) is None  # no corpus figure, no estimate

    report = {"summary": summary, "roofline": {"variants": {"ours": {"of_gemm": 0.41}}}}
    goal = training_goal(report)[-1]
    assert "`ours` **1.33× HF (hf_sorted) at the corpus' padding** (not met; 1.50× on this sample" in goal
    assert "41% of the GEMM rate (not met), RSS ratio 0.20 (met)." in goal  # against the same baseline
    header = table(summary)[0]
    assert "**vs HF sorted at corpus padding** | RSS vs HF sorted |" in header
    # vs sorted batches, at corpus padding, RSS
    assert table(summary)[-1].endswith("| 1.50x | 1.33x | 0.20 |")


def test_mfu_leaves_out_failed_variants():
    summary = {"ours": {"nonpad_tokens_per_s": 1000.0}, "ours+bf16": {"failed": "killed", "failed_rounds": 1}}
    assert mfu(summary, per_token=1e9, peak=2.0) == {"ours": 0.5}
