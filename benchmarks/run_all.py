"""Run the benchmark suite and write the latest numbers into benchmarks/README.md.

    .venv/bin/python benchmarks/run_all.py --quick        # about 30-60 min on 2 busy cores
    .venv/bin/python benchmarks/run_all.py                # more steps and rounds
    .venv/bin/python benchmarks/run_all.py --only training --training-args "--variants hf_grouped ours"
    .venv/bin/python benchmarks/run_all.py --render       # only rewrite the README from benchmarks/results/*.json

Each benchmark runs as its own process (with OMP_NUM_THREADS=2) and writes benchmarks/results/<name>.json
(git-ignored); the README's section between the ``results`` markers is regenerated from those files.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.training_report import equal_padding_base  # noqa: E402

RESULTS = HERE / "results"
README = HERE / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
THREADS = "2"


def benchmarks(quick: bool, training_args: list[str]) -> dict[str, list[str]]:
    return {
        "data": ["bench_data.py", "--records", "200000", "--output", str(RESULTS / "data.json")],
        "tokenize": ["bench_tokenize.py", "--records", "200000",
                     "--output", str(RESULTS / "tokenize.json")],
        "generation": ["bench_generation.py", "--greedy", "--n", "16", "--max-new-tokens", "64", "--batch-size", "16",
                       "--threads", THREADS, "--repeats", "1" if quick else "3",
                       "--output", str(RESULTS / "generation.json")],
        "training": ["bench_training.py", *(["--quick"] if quick else []),
                     "--variants", "hf_default", "hf_grouped", "hf_sorted", "ours", "ours+peftlora", "ours+whole+eager", "ours+bf16",
                     *training_args, "--output", str(RESULTS / "training.json")],
    }  # fmt: skip


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def read(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def fmt_load(values) -> str:
    return " ".join(f"{x:.2f}" for x in values) if values else "n/a"


def render_training(report: dict) -> list[str]:
    lines = [
        "### Training (LoRA r16/α32, 7 projections, AdamW, fp32, batch 8, max length 512)",
        "",
        f"`{report['command']}` — {report['date']}, load average {fmt_load(report['load_average_start'])} → "
        f"{fmt_load(report['load_average_end'])}, {report['wall_seconds'] / 60:.0f} min.",
        "",
        report["markdown"],
    ]
    return lines + training_goal(report)


def training_goal(report: dict) -> list[str]:
    """The goal line, headed by the ratio at equal padding (what a user training on the whole corpus gets)."""
    s = report["summary"]
    base = equal_padding_base(s)
    fp32 = [v for v in s if v.startswith("ours") and "bf16" not in v and "failed" not in s[v]]
    if base is None or not fp32:
        return []
    key = f"speedup_vs_{base}_at_corpus_padding"
    top = max(fp32, key=lambda v: s[v].get(key, 0))
    equal, rss = s[top][key], s[top].get(f"peak_rss_ratio_vs_{base}", float("nan"))
    sample = s[top].get(f"speedup_vs_{base}", float("nan"))
    gemm = report.get("roofline", {}).get("variants", {}).get(top, {}).get("of_gemm")
    met = lambda ok: "met" if ok else "not met"  # noqa: E731
    line = (
        f"Goal (fp32, ≥ 1.5× HF at the corpus' padding, ≥ 60 % of the GEMM rate, ≤ ¼ of HF's peak RSS, same "
        f"loss): best fp32 variant `{top}` **{equal:.2f}× HF ({base}) at the corpus' padding** "
        f"({met(equal >= 1.5)}; {sample:.2f}× on this sample at its own padding)"
    )
    if gemm is not None:
        line += f", {gemm:.0%} of the GEMM rate ({met(gemm >= 0.6)})"
    return ["", line + f", RSS ratio {rss:.2f} ({met(rss <= 0.25)})."]


def render_generation(report: dict) -> list[str]:
    med = report["median_tokens_per_s"]
    load = report.get("load_average", {}).get("end") or report.get("load_average_at_end")
    mode = "sampled" if report.get("sampling", {}).get("do_sample") else "greedy"
    lines = [
        f"### Generation ({mode}, {report['instructions']} general_en instructions, max "
        f"{report['sampling']['max_new_tokens']} new tokens)",
        "",
        f"Batched runner (batch {report['batch_size']}) {med['runner']:.1f} tok/s vs per-sample `model.generate` "
        f"{med['baseline']:.1f} tok/s: **{report['median_ratio']:.2f}×** (median of {len(report['rounds'])} "
        f"round(s), {report['torch_threads']} threads, load at end {fmt_load(load)}"
        + (f", {report['machine']['cpu_model']}" if "cpu_model" in report.get("machine", {}) else "")
        + f"). Goal {report.get('goal', '')}.",
    ]
    if "batched_generate" in med:
        lines[-1] += (
            f" `model.generate` on the runner's own batches: {med['batched_generate']:.1f} tok/s; the runner's "
            f"decoding loop (finished rows leave the batch) is "
            f"**{report['median_ratio_vs_batched_generate']:.2f}×** that."
        )
    roof = report.get("decode_roofline")
    if roof:
        lines += [
            "",
            f"Decode roofline: a step reads {roof['weight_bytes'] / 2**20:.0f} MiB of weights (+ the KV cache); "
            f"measured read bandwidth {roof['read_bandwidth_gbs']} GB/s.",
            "",
            "| rows per step | step ms | tok/s | memory bound ms | compute bound ms (GEMM GFLOP/s) | share of roofline |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for rows, b in roof["batches"].items():
            lines.append(
                f"| {rows} | {b['step_ms']} | {b['tokens_per_s']} | {b['memory_bound_ms']} | "
                f"{b['compute_bound_ms']} ({b['gemm_gflops']}) | {b['share_of_roofline']:.0%} |"
            )
        room = roof.get("cache_room")
        if room:
            lines += [
                "",
                f"KV cache with room for the answer (the runner's) against transformers' concatenating cache, "
                f"{room['rows']} rows, 48 steps: {room['step_ms_with_room']} against "
                f"{room['step_ms_concatenating']} ms a step (**{room['speedup']:.2f}×**).",
            ]
    return lines


def render_data(report: dict) -> list[str]:
    lines = [
        "### Data: corpus build (load + validate + strategy + write)",
        "",
        "| scenario | rows in | examples | total s | rows/s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['scenario']} | {r['rows_in']:,} | {r['examples_out']:,} | {r['total_s']:.1f} | "
            f"{r['rows_per_s']:,} | {r['peak_rss_mib']:,.0f} |"
        )
    return lines


def render_tokenize(report: dict) -> list[str]:
    lines = [
        f"### Data: tokenization + cache through `REGADataModule` ({report['records']:,} examples, max length 512)",
        "",
        "| run | seconds | examples/s | tokens/s | cache MiB | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        label = "cached (load)" if r["cache_hit"] else "cold (hash + tokenize + save)"
        lines.append(
            f"| {label} | {r['total_s']:.1f} | {r['records_per_s']:,} | {r['tokens_per_s']:,} | {r['cache_mib']:.1f} | "
            f"{r['peak_rss_mib']:,.0f} |"
        )
    return lines


def render(command: str | None) -> None:
    meta = read("suite") or {}
    runs = meta.get("runs", {})
    lines = [
        BEGIN,
        "",
        f"Machine: {meta.get('nproc', os.cpu_count())} × {meta.get('cpu_model', cpu_model())}, "
        f"{meta.get('mem_gib', '?')} GiB, shared with other work: absolute numbers drift 20-40 % between repeats "
        "(several times under load), so compare the ratios, measured side by side in one invocation.",
        "",
    ]
    for name, fn in (("training", render_training), ("generation", render_generation), ("data", render_data),
                     ("tokenize", render_tokenize)):  # fmt: skip
        report = read(name)
        if report:
            run = runs.get(name, {})
            lines += fn(report)
            if run.get("command"):
                lines += ["", f"<sub>`{run['command']}` — {run['date']}, {run['minutes']} min, load average "
                          f"{run['load_start']} → {run['load_end']}.</sub>"]  # fmt: skip
            lines.append("")
    lines.append(END)
    block = "\n".join(lines)
    text = README.read_text() if README.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    README.write_text(text)
    print(f"updated {README}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=["data", "tokenize", "generation", "training"])
    parser.add_argument(
        "--training-args", default="", help="extra arguments for bench_training.py (one string)"
    )
    parser.add_argument(
        "--render", action="store_true", help="only regenerate the README from existing results"
    )
    args = parser.parse_args()
    if args.render:
        render(None)
        return

    RESULTS.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python", "benchmarks/run_all.py", *sys.argv[1:]])
    previous = read("suite") or {}
    meta = {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "runs": {k: v for k, v in previous.get("runs", {}).items() if "command" in v},  # earlier invocations
    }
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS, TOKENIZERS_PARALLELISM="false")
    failed = []
    for name, cmd in benchmarks(args.quick, shlex.split(args.training_args)).items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}: {' '.join(cmd)} (load {load()})", flush=True)
        start, load_start = time.perf_counter(), load()
        done = subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:]], cwd=REPO, env=env)
        meta["runs"][name] = {
            "command": command,
            "date": time.strftime("%Y-%m-%d %H:%M %z"),
            "exit": done.returncode,
            "minutes": round((time.perf_counter() - start) / 60, 1),
            "load_start": load_start,
            "load_end": load(),
        }
        if done.returncode != 0:
            failed.append(name)
        (RESULTS / "suite.json").write_text(json.dumps(meta, indent=2) + "\n")
    render(command)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
