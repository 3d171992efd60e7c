"""Tokenization benchmark: ``REGADataModule`` rendering + tokenizing + caching a large corpus, then reloading it.

The real English ``rega`` corpus (``configs/data/shared_en.yaml``, 11K examples under the embedded model's chat
template) is repeated with fresh ids up to ``--records`` examples. Two child processes (separate peak RSS):

* ``cold``: cache key (hash of every example), ``rega.datamodules.tokenized.tokenize`` (chat template rendering,
  batched fast tokenizer, response-only labels, flat int32 arrays) and the ``.npz`` cache write;
* ``cached``: the same call path a second time, which finds the cache and loads it.

Tokenizer and model-template loading are excluded (timed separately as ``setup_s``).

    .venv/bin/python benchmarks/bench_tokenize.py [--records 200000] [--output benchmarks/results/tokenize.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import peak_rss_mib  # noqa: E402

MAX_LENGTH = 512


def run_child(phase: str, records: int, cache: str) -> dict:
    from benchmarks.training_data import corpus_config
    from rega.datamodules.rega_datamodule import REGADataModule
    from rega.datamodules.tokenized import TokenizedExamples, cache_file, domain_list, examples_key, tokenize

    t0 = time.perf_counter()
    datamodule = REGADataModule(corpus=corpus_config(), max_length=MAX_LENGTH, cache=cache)
    base = datamodule.build_corpus().examples
    examples = [
        dataclasses.replace(base[i % len(base)], id=f"{base[i % len(base)].id}~{i // len(base)}")
        for i in range(records)
    ]
    domains = domain_list(base)
    setup_s = time.perf_counter() - t0
    rss_before = peak_rss_mib()

    t1 = time.perf_counter()
    key = examples_key(datamodule.chat, examples, domains, MAX_LENGTH)
    t2 = time.perf_counter()
    path = cache_file(datamodule.cache_root, key)
    found = path.exists()
    if found:  # what the data module does: load a cached file, or tokenize and save
        data = TokenizedExamples.load(path)
    else:
        data = tokenize(datamodule.chat, examples, domains, MAX_LENGTH)
        data.save(path)
    t3 = time.perf_counter()
    tokens = int(data.lengths.sum())
    return {
        "phase": phase,
        "records": records,
        "examples_kept": len(data),
        "cache_hit": found,
        "tokens": tokens,
        "truncated": data.truncated,
        "dropped": data.dropped,
        "setup_s": round(setup_s, 2),
        "cache_key_s": round(t2 - t1, 2),
        ("load_s" if found else "tokenize_and_save_s"): round(t3 - t2, 2),
        "total_s": round(t3 - t1, 2),
        "records_per_s": round(records / (t3 - t1)),
        "tokens_per_s": round(tokens / (t3 - t1)),
        "cache_mib": round(path.stat().st_size / 2**20, 1),
        "rss_before_mib": round(rss_before, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--threads", type=int, default=2, help="RAYON/OMP threads of the child processes")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "tokenize.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.records, args.cache)))
        return None

    results = []
    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="rega-bench-tokenize-") as cache:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), RAYON_NUM_THREADS=str(args.threads))
        for phase in ("cold", "cached"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                phase,
                "--records",
                str(args.records),
                "--cache",
                cache,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
            if done.returncode != 0:
                sys.stderr.write(done.stderr[-8000:])
                raise SystemExit(f"phase {phase} failed (exit {done.returncode})")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            print(json.dumps(result), flush=True)
    report = {
        "benchmark": "tokenization + cache of the rega corpus through REGADataModule",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "records": args.records,
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
