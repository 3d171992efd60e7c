"""bench_training's report: the per-variant medians and ratios over rounds, the FLOP accounting (roofline on CPU,
MFU on a GPU) and the markdown table that benchmarks/README.md shows."""

from __future__ import annotations

import statistics

from benchmarks.common import matmul_gflops

# Dense bf16 peak (TFLOP/s, without sparsity) by device name; override with --peak-tflops.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10": 125.0, "RTX 4090": 165.2}  # fmt: skip
# HF baselines estimated at the corpus' padding, the headline's preferred one last.
EQUAL_PADDING_BASES = ("hf_grouped", "hf_sorted")


# --- FLOPs ------------------------------------------------------------------------------------------------------
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
    return matmul_gflops(rows, c.hidden_size, c.intermediate_size, seconds)


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


def mfu(summary: dict, per_token: float, peak: float) -> dict:
    """Model FLOPs utilisation of each variant that completed (a failed one has no rate)."""
    return {
        v: round(s["nonpad_tokens_per_s"] * per_token / (peak * 1e12), 4)
        for v, s in summary.items()
        if "failed" not in s
    }


# --- medians and ratios over rounds -----------------------------------------------------------------------------
def medians(results: list[dict]) -> dict:
    out = {
        "nonpad_tokens_per_s": statistics.median(r["nonpad_tokens_per_s"] for r in results),
        "padded_tokens_per_s": statistics.median(r["padded_tokens_per_s"] for r in results),
        "supervised_tokens_per_s": statistics.median(r["supervised_tokens_per_s"] for r in results),
        "padding_fraction": statistics.median(r["padding_fraction"] for r in results),
        "nonpad_tokens_per_cpu_s": statistics.median(r["nonpad_tokens_per_cpu_s"] for r in results),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
        "rounds": len(results),
    }
    if "cuda_peak_allocated_gib" in results[0]:
        out["cuda_peak_allocated_gib"] = max(r["cuda_peak_allocated_gib"] for r in results)
    return out


def add_corpus_padding_estimate(out: dict, runs: dict[str, list[dict]], corpus_padding: float) -> None:
    """Each HF baseline that ran (``group_by_length``, length-sorted batches) at the padding group_by_length leaves
    on the whole corpus: its rate of processed (padded) tokens times the corpus' non-padding share. An estimate:
    it keeps this sample's sequence lengths."""
    for base in EQUAL_PADDING_BASES:
        if base not in runs:
            continue
        estimate = [r["padded_tokens_per_s"] * (1 - corpus_padding) for r in runs[base]]
        out[base]["nonpad_tokens_per_s_at_corpus_padding"] = round(statistics.median(estimate), 2)
        out[base]["corpus_padding"] = corpus_padding
        for variant, results in runs.items():
            if variant.startswith("ours"):
                out[variant][f"speedup_vs_{base}_at_corpus_padding"] = round(
                    statistics.median(a["nonpad_tokens_per_s"] / e for a, e in zip(results, estimate)), 3
                )


def equal_padding_base(summary: dict) -> str | None:
    """The HF baseline the headline compares with at the corpus' padding: length-sorted batches when they ran
    (they pad on a sample about as little as group_by_length on the corpus, so the estimate extrapolates least),
    else group_by_length."""
    for base in reversed(EQUAL_PADDING_BASES):
        if "nonpad_tokens_per_s_at_corpus_padding" in summary.get(base, {}):
            return base
    return None


def add_ratios(out: dict, variant: str, results: list[dict], base: str, base_results: list[dict]) -> None:
    """``variant`` against ``base``: medians of the per-round ratios (rounds pair up), and the peak-RSS ratio."""
    pairs = list(zip(results, base_results))  # same round

    def median_ratio(key: str) -> float:
        return round(statistics.median(a[key] / b[key] for a, b in pairs), 3)

    out[variant][f"speedup_vs_{base}"] = median_ratio("nonpad_tokens_per_s")
    out[variant][f"supervised_speedup_vs_{base}"] = median_ratio("supervised_tokens_per_s")
    out[variant][f"cpu_time_speedup_vs_{base}"] = median_ratio("nonpad_tokens_per_cpu_s")
    out[variant][f"peak_rss_ratio_vs_{base}"] = round(
        out[variant]["peak_rss_mib"] / out[base]["peak_rss_mib"], 3
    )


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
        out[variant] = medians(results)
    if corpus_padding is not None:
        add_corpus_padding_estimate(out, runs, corpus_padding)
    for variant, results in runs.items():
        for base in baselines:
            if base != variant and base in runs:
                add_ratios(out, variant, results, base, runs[base])
    return out


# --- markdown ---------------------------------------------------------------------------------------------------
def table(agg: dict) -> list[str]:
    equal = equal_padding_base(agg) or "hf_grouped"

    def ratio(s: dict, key: str, variant: str, base: str, unit: str) -> str:
        value = 1.0 if variant == base else s.get(f"{key}_vs_{base}")
        return "–" if value is None else f"{value:.2f}{unit}"

    lines = [
        "| variant | non-pad tok/s | response tok/s | padding | peak RSS MiB | vs HF default | vs HF grouped "
        f"| vs HF grouped (CPU time) | vs HF sorted batches | **vs {equal.replace('hf_', 'HF ')} at corpus padding** "
        f"| RSS vs {equal.replace('hf_', 'HF ')} |",
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
            f"{ratio(s, 'speedup', variant, 'hf_sorted', 'x')} | "
            f"{ratio(s, 'speedup', variant, f'{equal}_at_corpus_padding', 'x')} | "
            f"{ratio(s, 'peak_rss_ratio', variant, equal, '')} |"
        )
    return lines


def corpus_padding_note(report: dict) -> list[str]:
    base = equal_padding_base(report["summary"])
    if base is None:
        return []
    hf, data = report["summary"][base], report["data"]
    how = {"hf_grouped": "`group_by_length`", "hf_sorted": "length-sorted batches"}[base]
    return ["", f"HF `group_by_length` sorts within mega-batches of min(50, n/32)·8 examples: on the whole "
            f"{data['corpus_examples']:,}-example corpus it leaves {hf['corpus_padding']:.1%} padding, on this "
            f"{data['sampled']}-example sample {data['hf_grouped_padding_sample']:.1%}. HF on {how} measured "
            f"{hf['padding_fraction']:.1%} padding here; at the corpus' padding it would process "
            f"≈ {hf['nonpad_tokens_per_s_at_corpus_padding']:.1f} non-pad tok/s (its measured rate of processed "
            "tokens × the corpus' non-padding share), which the column *at corpus padding* (the headline: what a "
            "user training on the whole corpus gets) compares with."]  # fmt: skip


def roofline_note(roof: dict | None) -> list[str]:
    if not roof:
        return []
    lines = ["", "Matmul GFLOP/s executed (decoder forward + backward to the inputs on every processed token; LM head "
             "on every processed position for HF, on response positions for ours; attention not counted) "
             f"against this machine's fp32 GEMM rate at the model's MLP shape, {' / '.join(map(str, roof['gemm_gflops']))} "
             "GFLOP/s (start / end): " + ", ".join(f"{v} {r['gflops']} ({r['of_gemm']:.0%})"
                                                  for v, r in roof["variants"].items()) + "."]  # fmt: skip
    if "flop_bound_speedup_at_equal_padding" in roof:
        lines.append(f"Response tokens are {roof['response_share']:.0%} of the non-padding tokens, so at equal padding "
                     f"and equal GEMM efficiency computing the LM head only there can make a step at most "
                     f"{roof['flop_bound_speedup_at_equal_padding']:.2f}× faster than HF's.")  # fmt: skip
    return lines


def loss_parts(loss: dict) -> str:
    """``name mean-loss`` of every path of the equal-loss check."""
    return ", ".join(
        f"{k} {v['mean_loss']:.5f}" for k, v in loss.items() if isinstance(v, dict) and "mean_loss" in v
    )


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = table(report["summary"]) + corpus_padding_note(report)
    if "mfu" in report:
        lines.append("")
        lines.append(
            "MFU (bf16 peak {peak} TFLOP/s): ".format(peak=report["peak_tflops"])
            + ", ".join(f"{k} {v:.1%}" for k, v in report["mfu"].items())
        )
    lines += roofline_note(report.get("roofline"))
    loss = report.get("loss_check")
    if loss:
        lines += ["", f"Loss before any update over the same {loss['examples']} examples: " + loss_parts(loss)
                  + f" (max |diff| of the fp32 paths {loss['max_abs_diff']:.2e})."]  # fmt: skip
    lines += ["", f"Settings: {cfg['examples']} examples, batch {cfg['batch_size']}, max length {cfg['max_length']}, "
              f"{cfg['warmup']} warm-up + {cfg['steps'] or 'one epoch of'} measured steps per run, {cfg['rounds']} rounds, "
              f"{cfg['threads']} threads, {cfg['device']}, dtype {cfg['dtype']}."]  # fmt: skip
    return "\n".join(lines)
