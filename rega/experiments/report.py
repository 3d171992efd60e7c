"""Compare the runs of a grid: one table in the shape of the paper's Tables 1/2 (Markdown and CSV) and plots.

Rows are strategies (REGA twice: REGA_c answers with p_c, REGA_r with each domain's p_i); columns are each task's
score (accuracy for closed tasks, unigram F1 for free-form ones), each domain's mean, the mean over domains, and the
judge-free general scores (general multiple choice, drift of log-likelihood) next to the judge's where it ran.
Plots: domain and general scores against r, and the prompt-by-domain matrix that shows inter-domain confusion.

The output folder may hold other files (a README, run records), so it is not replaced as a whole: each file is
written atomically, and ``report.json`` is removed first and written last. So a ``report.json`` vouches that every
file it lists comes from the same run; without one, the report was interrupted (:func:`check_report`) and the
next run rewrites it whole.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from rega.io import atomic_write, write_json

NAMES = {"zero_shot": "zero-shot", "ft": "FT", "ftsd": "FTSD", "ftrp": "FTRP", "rega": "REGA"}


def row_label(strategy: str, rule: str, mix_ratio: float | None, several_r: bool) -> str:
    name = NAMES.get(strategy, strategy)
    if strategy == "rega":
        name += "_c" if rule == "central" else "_r"
    if several_r and mix_ratio is not None:
        name += f" (r={mix_ratio:g})"
    return name


def load_runs(runs_dir: Path) -> list[dict]:
    runs = []
    for done in sorted(runs_dir.glob("*/done.json")):
        run_dir = done.parent
        eval_path = run_dir / "eval" / "eval.json"
        if not eval_path.exists():
            continue
        run = json.loads(done.read_text(encoding="utf-8"))
        run["eval"] = json.loads(eval_path.read_text(encoding="utf-8"))
        matrix = run_dir / "eval_matrix" / "eval.json"
        run["matrix"] = json.loads(matrix.read_text(encoding="utf-8")) if matrix.exists() else None
        runs.append(run)
    return runs


def general_columns(result: dict) -> dict[str, float | None]:
    cols: dict[str, float | None] = {}
    mc = result.get("general_mc") or {}
    for name, value in sorted(mc.items()):
        cols[f"mc:{name}"] = value.get("score")
    scores = [v.get("score") for v in mc.values() if v.get("score") is not None]
    cols["general MC mean"] = sum(scores) / len(scores) if scores else None
    for name, value in sorted((result.get("drift") or {}).items()):
        cols[f"logprob:{name}"] = value.get("logprob_per_token")
    for name, value in sorted((result.get("judge") or {}).items()):
        overall = value.get("overall") if isinstance(value, dict) else None
        cols[f"judge:{name}"] = overall.get("mean") if isinstance(overall, dict) else overall
    return cols


def table_rows(runs: list[dict]) -> list[dict]:
    several_r = len({r.get("mix_ratio") for r in runs if r["strategy"] == "rega"}) > 1
    order = {s: i for i, s in enumerate(NAMES)}
    rows = []
    for run in sorted(runs, key=lambda r: (order.get(r["strategy"], 99), r.get("mix_ratio") or 0)):
        result = run["eval"]
        general = general_columns(result)
        for rule, summary in result.get("rules", {}).items():
            row = {
                "run": run["name"],
                "strategy": run["strategy"],
                "rule": rule,
                "mix_ratio": run.get("mix_ratio"),
            }
            row["label"] = row_label(run["strategy"], rule, run.get("mix_ratio"), several_r)
            for domain, dsum in sorted(summary["domains"].items()):
                for task, tsum in sorted(dsum["tasks"].items()):
                    row[f"{task} ({tsum['metric']})"] = tsum["score"]
                row[f"{domain} mean"] = dsum["score"]
            row["domain mean"] = summary.get("overall")
            row.update(general)
            rows.append(row)
    return rows


def _fmt(value, column: str) -> str:
    """Scores (0-1) as percentages; log-likelihoods and judge ratings (1-10) as they are."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if column.startswith("logprob:"):
            return f"{value:.3f}"
        return f"{value:.2f}" if column.startswith("judge:") else f"{100 * value:.1f}"
    return str(value)


def to_markdown(rows: list[dict], columns: list[str], first: str = "strategy") -> str:
    lines = ["| " + " | ".join([first, *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        lines.append("| " + " | ".join([row["label"], *(_fmt(row.get(c), c) for c in columns)]) + " |")
    return "\n".join(lines)


def score_columns(rows: list[dict]) -> list[str]:
    skip = {"run", "strategy", "rule", "mix_ratio", "label"}
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in skip and c not in columns]
    return columns


def prompt_matrix(run: dict) -> tuple[list[str], list[str], list[list[float | None]]] | None:
    """(prompts, test domains, scores[prompt][domain]) from a run's ``role:<domain>`` evaluation."""
    if not run.get("matrix"):
        return None
    rules = run["matrix"]["rules"]
    prompts = sorted(r.split(":", 1)[1] for r in rules if r.startswith("role:"))
    domains = sorted({d for r in rules.values() for d in r["domains"]})
    grid = [[rules[f"role:{p}"]["domains"].get(d, {}).get("score") for d in domains] for p in prompts]
    return prompts, domains, grid


def plot_mix_ratio(rows: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rega = sorted(
        (r for r in rows if r["strategy"] == "rega" and r["mix_ratio"] is not None),
        key=lambda r: r["mix_ratio"],
    )
    if len({r["mix_ratio"] for r in rega}) < 2:
        return False
    panels = [("domain mean", "domain score"), ("general MC mean", "general MC accuracy")]
    # drift: the first log-likelihood column (the base model's own held-out answers, where configured)
    drift = sorted(c for c in rows[0] if c.startswith("logprob:"))
    drift = [c for c in drift if "self_distilled" in c] or drift
    if drift:
        panels.append((drift[0], f"{drift[0].split(':', 1)[1]} (log-prob/token)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        for rule, style in (("central", "o-"), ("role", "s--")):
            points = [
                (r["mix_ratio"], r.get(key)) for r in rega if r["rule"] == rule and r.get(key) is not None
            ]
            if points:
                ax.plot(*zip(*points), style, label=f"REGA_{'c' if rule == 'central' else 'r'}")
        baselines: dict[float, list[str]] = {}  # one line and one label per value: baselines often tie
        for r in rows:
            if r["strategy"] in ("zero_shot", "ft", "ftsd", "ftrp") and r.get(key) is not None:
                baselines.setdefault(r[key], []).append(r["label"])
        for value, labels in baselines.items():
            ax.axhline(value, linestyle=":", color="gray")
            ax.annotate(", ".join(labels), (ax.get_xlim()[0], value), fontsize=7, color="gray")
        ax.set_xlabel("mixing ratio r")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return True


def plot_matrices(runs: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mats = [(run, m) for run in runs if (m := prompt_matrix(run))]
    if not mats:
        return False
    fig, axes = plt.subplots(1, len(mats), figsize=(4 * len(mats), 3.6), squeeze=False)
    for ax, (run, (prompts, domains, grid)) in zip(axes[0], mats):
        values = [[v if v is not None else float("nan") for v in row] for row in grid]
        ax.imshow(values, cmap="viridis")
        ax.set_xticks(range(len(domains)), domains, rotation=30)
        ax.set_yticks(range(len(prompts)), [f"p_{p}" for p in prompts])
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, _fmt(v, "score"), ha="center", va="center", color="white", fontsize=8)
        ax.set_title(f"{run['name']}: prompt × test domain", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return True


def _save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(
        buffer, format="png", dpi=120, metadata={"Software": None}
    )  # no timestamps: reproducible bytes
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())


def markdown_report(runs: list[dict], rows: list[dict], columns: list[str]) -> str:
    markdown = [
        "Scores in % (accuracy for closed tasks, unigram F1 for free-form ones, general multiple-choice accuracy);",
        "logprob = mean log-likelihood per token of reference responses under the model (higher = closer to them).",
        "",
        to_markdown(rows, columns),
    ]
    for run in runs:
        if m := prompt_matrix(run):
            prompts, domains, grid = m
            markdown += ["", f"Prompt × test domain, {run['name']} (domain score, %):", ""]
            markdown.append(to_markdown(
                [{"label": f"p_{p}", **dict(zip(domains, row))} for p, row in zip(prompts, grid)], domains, "prompt"
            ))  # fmt: skip
    return "\n".join(markdown) + "\n"


def write_report(runs_dir: str | Path, output: str | Path) -> dict:
    runs = load_runs(Path(runs_dir))
    if not runs:
        raise FileNotFoundError(f"no finished runs (done.json + eval/eval.json) under {runs_dir}")
    rows = table_rows(runs)
    columns = score_columns(rows)
    out = Path(output)
    (out / "report.json").unlink(missing_ok=True)  # until the last write, the report is visibly incomplete
    with atomic_write(out / "results.md") as handle:
        handle.write(markdown_report(runs, rows, columns))
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=["label", "run", "strategy", "rule", "mix_ratio", *columns], lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(out / "results.csv") as handle:
        handle.write(buffer.getvalue())
    plots = {
        "mix_ratio": plot_mix_ratio(rows, out / "mix_ratio.png"),
        "prompt_matrix": plot_matrices(runs, out / "prompt_matrix.png"),
    }
    for name, made in plots.items():
        if not made:  # a plot of an earlier report must not stay beside this one's tables
            (out / f"{name}.png").unlink(missing_ok=True)
    write_json(out / "report.json", {"runs": [r["name"] for r in runs], "columns": columns, "plots": plots})
    return {"rows": rows, "columns": columns, "plots": plots}


def check_report(output: str | Path) -> list[str]:
    """What is wrong with a written report: no ``report.json`` (an interrupted run) or a file it vouches for."""
    out = Path(output)
    try:
        plots = json.loads((out / "report.json").read_text(encoding="utf-8"))["plots"]
    except (FileNotFoundError, KeyError, TypeError, json.JSONDecodeError):
        return [f"{out}: no complete report.json (an interrupted report? run report again)"]
    names = ["results.md", "results.csv", *(f"{name}.png" for name, made in plots.items() if made)]
    return [
        f"{out / name}: missing although report.json lists it" for name in names if not (out / name).is_file()
    ]


def report_command(runs: str, output: str = "docs/results") -> None:
    """Compare the finished runs of a grid: results.md, results.csv and PNG plots.

    Args:
        runs: the grid's output folder (one sub-folder per run with done.json and eval/eval.json).
        output: folder for results.md, results.csv, mix_ratio.png and prompt_matrix.png.
    """
    report = write_report(runs, output)
    print(to_markdown(report["rows"], report["columns"]))
    print(f"wrote {Path(output) / 'results.md'}, results.csv and plots {report['plots']}")
