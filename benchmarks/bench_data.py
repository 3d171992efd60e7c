"""Data pipeline benchmark: load + validate + build + write of the training corpus, time and peak memory.

Scenarios (each runs in a fresh child process, so its peak RSS is its own):

* ``shared_en``: ``configs/data/shared_en.yaml`` as is (English pubmedqa, medmcqa, overruling, fiqa + general_en,
  strategy rega, r = 0.1), with a fixed central prompt so no tokenizer is loaded.
* ``synthetic``: ``--records`` rows (default 200K) made by repeating the real English records with fresh unique
  ids, domains mixed in one JSONL (rows carry their domain) plus a general JSONL in the real proportion.

    .venv/bin/python benchmarks/bench_data.py [--records 200000] [--output benchmarks/results/data.json] [--profile]

Goal (the foundation issue): the English corpus in a few seconds, 200K records in under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import os
import platform
import pstats
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import peak_rss_mib  # noqa: E402

ENGLISH_DOMAIN_SETS = ("pubmedqa", "medmcqa", "overruling", "fiqa")
CENTRAL = "A fixed central prompt for the benchmark (no tokenizer is loaded)."


def shared_config():
    # p_c fixed to a placeholder: the build is measured without loading a model for its system prompt
    from benchmarks.training_data import corpus_config

    return corpus_config(central=CENTRAL)


def synthesize(work: Path, n_records: int) -> tuple[Path, Path, int, int]:
    """Repeat the real English records with fresh ids up to ``n_records`` rows: (domains file, general file)."""
    from rega.paths import shared_data_dir

    base = shared_data_dir()
    domain_rows = []
    for name in ENGLISH_DOMAIN_SETS:
        with open(base / name / "train.jsonl", encoding="utf-8") as handle:
            domain_rows.extend(json.loads(line) for line in handle if line.strip())
    with open(base / "general_en" / "train.jsonl", encoding="utf-8") as handle:
        general_rows = [json.loads(line) for line in handle if line.strip()]
    # interleave the domain sets so that the one file mixes domains row by row
    random.Random(0).shuffle(domain_rows)
    n_domain = round(n_records * len(domain_rows) / (len(domain_rows) + len(general_rows)))
    n_general = n_records - n_domain

    def write(path: Path, rows: list[dict], n: int) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            for i in range(n):
                row = dict(rows[i % len(rows)])
                row["id"] = f"{row['id']}~{i // len(rows)}"
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    domains_path, general_path = work / "domains.jsonl", work / "general.jsonl"
    write(domains_path, domain_rows, n_domain)
    write(general_path, general_rows, n_general)
    return domains_path, general_path, n_domain, n_general


def synthetic_config(domains_path: Path, general_path: Path):
    from rega.config import DataSource

    return dataclasses.replace(
        shared_config(),
        domains=[DataSource(str(domains_path))],  # no declared domain: each row names its own
        general=[DataSource(str(general_path), domain="general")],
    )


def timed_build(config, work: Path, profile: bool) -> tuple[dict, Path, dict, dict]:
    """Build and write the corpus of ``config``: (manifest, written file, times, extra info).

    The stages inside build_corpus are timed by wrapping the functions it looks up in its module."""
    import rega.data.corpus as corpus_module

    stages: dict[str, float] = {}

    def timed(name, func):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    corpus_module.load_inputs = timed("load_validate_s", corpus_module.load_inputs)
    corpus_module.build_examples = timed("strategy_s", corpus_module.build_examples)

    info: dict = {}
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    t0 = time.perf_counter()
    corpus = corpus_module.build_corpus(config)
    t1 = time.perf_counter()
    path = corpus_module.write_corpus(corpus, work / "out")
    t2 = time.perf_counter()
    if profiler:
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        info["profile_top"] = text.getvalue()
    return corpus.manifest, path, {**stages, "build": t1 - t0, "write": t2 - t1, "total": t2 - t0}, info


def run_child(scenario: str, work: Path, records: int, profile: bool) -> dict:
    """Measure one scenario in this (fresh) process."""
    rss_start = peak_rss_mib()
    info: dict = {"scenario": scenario}
    if scenario == "shared_en":
        config = shared_config()
    else:
        t = time.perf_counter()
        domains_path, general_path, n_domain, n_general = synthesize(work, records)
        info["synthesize_s"] = round(time.perf_counter() - t, 3)
        config = synthetic_config(domains_path, general_path)
    rss_before = peak_rss_mib()
    manifest, path, times, extra = timed_build(config, work, profile)
    info.update(extra)
    rows_in = sum(manifest["source_sizes"]["domain"].values()) + manifest["source_sizes"]["general"]
    rows_in += len(manifest["skipped_rows"])
    info.update(
        {
            "rows_in": rows_in,
            "skipped_rows": len(manifest["skipped_rows"]),
            "examples_out": manifest["num_examples"],
            "by_kind": manifest["counts"]["by_kind"],
            "load_validate_s": round(times["load_validate_s"], 3),
            "strategy_s": round(times["strategy_s"], 3),
            "other_build_s": round(times["build"] - times["load_validate_s"] - times["strategy_s"], 3),
            "build_corpus_s": round(times["build"], 3),
            "write_s": round(times["write"], 3),
            "total_s": round(times["total"], 3),
            "rows_per_s": round(rows_in / times["total"]),
            "corpus_mib": round(path.stat().st_size / 2**20, 1),
            "rss_at_start_mib": round(rss_start, 1),
            "rss_before_build_mib": round(rss_before, 1),
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "profiled": profile,
        }
    )
    return info


def run_scenario(scenario: str, records: int, profile: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"rega-bench-{scenario}-") as work:
        cmd = [sys.executable, __file__, "--child", scenario, "--work", work, "--records", str(records)]
        if profile:
            cmd.append("--profile")
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if result.returncode != 0:
            sys.stderr.write(result.stderr)
            raise SystemExit(f"scenario {scenario} failed (exit {result.returncode})")
        return json.loads(result.stdout.strip().splitlines()[-1])


COLUMNS = [
    ("scenario", "scenario", "{}"),
    ("rows_in", "rows in", "{:,}"),
    ("examples_out", "examples", "{:,}"),
    ("load_validate_s", "load+valid s", "{:.2f}"),
    ("strategy_s", "strategy s", "{:.2f}"),
    ("other_build_s", "manifest s", "{:.2f}"),
    ("write_s", "write s", "{:.2f}"),
    ("total_s", "total s", "{:.2f}"),
    ("rows_per_s", "rows/s", "{:,}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
]


def table(results: list[dict]) -> str:
    cells = [[title for _, title, _ in COLUMNS]]
    cells += [[fmt.format(r[key]) for key, _, fmt in COLUMNS] for r in results]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000, help="rows of the synthetic scenario")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "data.json"))
    parser.add_argument("--scenarios", nargs="+", default=["shared_en", "synthetic"])
    parser.add_argument(
        "--profile", action="store_true", help="also run the synthetic scenario under cProfile"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(run_child(args.child, Path(args.work), args.records, args.profile)))
        return

    from rega.paths import shared_data_dir

    if not shared_data_dir().is_dir():
        raise SystemExit(f"shared data folder {shared_data_dir()} not found (set REGA_SHARED_DATA)")
    results = [run_scenario(s, args.records, profile=False) for s in args.scenarios]
    print(table(results))
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
        "records": args.records,
        "results": results,
    }
    if args.profile:
        profiled = run_scenario("synthetic", args.records, profile=True)
        print(f"\ncProfile of the synthetic scenario (total {profiled['total_s']:.2f}s under the profiler):")
        print(profiled["profile_top"])
        report["profile"] = {
            "total_s_under_profiler": profiled["total_s"],
            "top_by_tottime": profiled["profile_top"],
        }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
