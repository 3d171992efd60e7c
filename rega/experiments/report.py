"""Compare the runs of a grid: one table in the shape of the paper's Tables 1/2 (Markdown and CSV), trivial
baselines, statistics and plots.

Rows are runs (all seeds of a run together) under each prompt rule (REGA twice: REGA_c answers with p_c, REGA_r
with each domain's p_i); columns are each task's score (accuracy for closed tasks, unigram F1 for free-form ones),
each domain's mean, the mean over domains, and the judge-free general scores (general multiple choice, drift of
log-likelihood, the general_gen scores of greedy general answers) next to the judge's where it ran. Where the runs kept per-item results (``items`` in eval.json):

* every cell gets a 95 % bootstrap interval over items (and seeds; ± the spread over seeds with several);
* two tables give each row's paired difference to FT and to zero-shot on the same items (interval and p-value:
  exact McNemar for one seed of a closed task, a paired permutation test for other one-seed comparisons, the
  bootstrap's own p-value where a side has several seeds, whose interval resamples them too), see
  :mod:`rega.experiments.stats`;
* a table gives the distribution of predicted labels of every closed task (position bias shows at once).

Trivial baselines (majority class and uniform chance of every closed task) come from eval.json's ``baselines``,
else are computed from the data the run evaluated; a closed-task score not above its majority rate is marked †.
Plots: scores against r, the prompt-by-domain matrix that shows inter-domain confusion, and each run's general
measures as paired differences to zero-shot (forgetting at a glance).

The output folder may hold other files (a README, run records), so it is not replaced as a whole: each file is
written atomically, and ``report.json`` is removed first and written last. So a ``report.json`` vouches that every
file it lists comes from the same run; without one, the report was interrupted (:func:`check_report`) and the
next run rewrites it whole.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from rega.errors import ConfigError
from rega.experiments.report_baselines import (
    baseline_markdown,
    mark_below_majority,
    report_baselines,
    skipped_markdown,
)
from rega.experiments.report_format import difference, domain_columns, fmt, mean, with_interval
from rega.experiments.report_heldout import heldout_report, split_heldout
from rega.experiments.report_plots import plot_matrices, plot_mix_ratio, plot_vs_reference
from rega.experiments.report_runs import group_runs, load_runs
from rega.experiments.report_stats import (
    GEN_COLUMNS,
    check_drift_references,
    column_units,
    intervals,
    paired,
    row_units,
)
from rega.io import atomic_write, write_json

log = logging.getLogger(__name__)
NAMES = {
    "zero_shot": "zero-shot", "ft": "FT", "ftsd": "FTSD", "ftrp": "FTRP", "ft_replay": "FT+replay",
    "sdft": "SDFT", "rega": "REGA",
}  # fmt: skip
META = ("label", "run", "strategy", "rule", "mix_ratio", "seeds")


def row_label(
    strategy: str,
    rule: str,
    mix_ratio: float | None,
    several_r: bool,
    label: str | None = None,
    only_domains: list[str] | None = None,
) -> str:
    name = label or NAMES.get(strategy, strategy)
    if strategy == "rega":
        name += "_c" if rule == "central" else "_r"
    elif label and rule != "central":
        name += f" ({rule})"
    if several_r and mix_ratio is not None:
        name += f" (r={mix_ratio:g})"
    if only_domains and not label:  # a single-domain variant beside the multi-domain run of its strategy
        name += f" ({', '.join(only_domains)} only)"
    return name


def general_columns(result: dict) -> dict[str, float | None]:
    cols: dict[str, float | None] = {}
    mc = result.get("general_mc") or {}
    for name, value in sorted(mc.items()):
        cols[f"mc:{name}"] = value.get("score")
    scores = [v.get("score") for v in mc.values() if v.get("score") is not None]
    cols["general MC mean"] = sum(scores) / len(scores) if scores else None
    for name, value in sorted((result.get("drift") or {}).items()):
        cols[f"logprob:{name}"] = value.get("logprob_per_token")
    for name, value in sorted((result.get("general_gen") or {}).items()):
        for label, metric in GEN_COLUMNS.items():
            cols[f"{label}:{name}"] = value.get("length_ratio" if metric == "length" else metric)
    for name, value in sorted((result.get("judge") or {}).items()):
        overall = value.get("overall") if isinstance(value, dict) else None
        cols[f"judge:{name}"] = overall.get("mean") if isinstance(overall, dict) else overall
    return cols


def rule_columns(summary: dict, result: dict) -> dict[str, float | None]:
    cols: dict[str, float | None] = {}
    for domain, dsum in sorted(summary["domains"].items()):
        cols.update(domain_columns(domain, dsum))
    cols["domain mean"] = summary.get("overall")
    return {**cols, **general_columns(result)}


def table_rows(runs: list[dict]) -> list[dict]:
    groups = group_runs(runs)
    several_r = len({g.get("mix_ratio") for g in groups if g["strategy"] == "rega"}) > 1
    order = {s: i for i, s in enumerate(NAMES)}
    key = lambda g: (order.get(g["strategy"], 99), g.get("mix_ratio") or 0, bool(g.get("label")), g["name"])  # noqa: E731
    rows = []
    for group in sorted(groups, key=key):
        first = group["evals"][0]
        for rule, summary in first.get("rules", {}).items():
            per_seed = [
                rule_columns(e["rules"][rule], e) for e in group["evals"] if rule in e.get("rules", {})
            ]
            row = {
                "label": row_label(
                    group["strategy"],
                    rule,
                    group.get("mix_ratio"),
                    several_r,
                    group.get("label"),
                    group.get("only_domains"),
                ),
                "run": group["name"],
                "strategy": group["strategy"],
                "rule": rule,
                "mix_ratio": group.get("mix_ratio"),
                "seeds": " ".join(str(s) for s in group["seeds"] if s is not None),
            }
            row.update({c: mean([p.get(c) for p in per_seed]) for c in per_seed[0]})
            row["_group"], row["_cols"] = group, column_units(summary, first)
            row["_domains"] = set(summary["domains"])
            rows.append(row)
    return _partial_domain_means(rows)


def _partial_domain_means(rows: list[dict]) -> list[dict]:
    """No "domain mean" for a row evaluated on fewer domains than the others (a single-domain run on its own
    domain): a mean over its domains alone would read as comparable with the others'."""
    every = set().union(*(row["_domains"] for row in rows))
    for row in rows:
        if row["_domains"] != every and "domain mean" in row:
            row["domain mean"] = None
            row["_cols"].pop("domain mean", None)
    return rows


def cell(row: dict, column: str) -> str:
    text = with_interval(row.get(column), row.get("_ci", {}).get(column), column)
    return text + ("†" if column in row.get("_below", ()) else "")


def to_markdown(rows: list[dict], columns: list[str], first: str = "strategy", render=None) -> str:
    render = render or (lambda row, c: fmt(row.get(c), c))
    lines = ["| " + " | ".join([first, *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        lines.append("| " + " | ".join([row["label"], *(render(row, c) for c in columns)]) + " |")
    return "\n".join(lines)


def score_columns(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in META and not c.startswith("_") and c not in columns]
    return columns


def prompt_matrix(group: dict) -> tuple[list[str], list[str], list[list[float | None]]] | None:
    """(prompts, test domains, scores[prompt][domain]) from a run's ``role:<domain>`` evaluations (seed mean)."""
    if not group.get("matrices"):
        return None
    rules = group["matrices"][0]["rules"]
    prompts = sorted(r.split(":", 1)[1] for r in rules if r.startswith("role:"))
    domains = sorted({d for r in rules.values() for d in r["domains"]})

    def score(prompt, domain):
        values = [
            m["rules"][f"role:{prompt}"]["domains"].get(domain, {}).get("score") for m in group["matrices"]
        ]
        return mean(values)

    return prompts, domains, [[score(p, d) for d in domains] for p in prompts]


def add_statistics(rows: list[dict], versus: tuple[str, ...] = ()) -> bool:
    """Intervals and paired differences into each row (``_ci``, ``_vs``: to FT, zero-shot and the plain run of each
    strategy in ``versus``); True when any row had per-item results."""
    reference = {"FT": _reference(rows, "ft"), "zero-shot": _reference(rows, "zero_shot")}
    for strategy in versus:
        reference[NAMES.get(strategy, strategy)] = plain = _reference(rows, strategy)
        if plain is None:
            raise ConfigError(f"--versus {strategy}: no plain {strategy} run among the reported runs")
    any_items = False
    for row in rows:
        row["_units"] = row_units(row["_group"]["evals"], row["rule"])
        any_items |= row["_units"] is not None
        row["_ci"] = intervals(row["_units"], row["_cols"])
    headline = [c for c in row_headline(rows)]
    for row in rows:
        row["_vs"] = {
            name: paired(row["_units"], ref["_units"], row["_cols"], headline)
            for name, ref in reference.items()
            if ref is not None and ref is not row
        }
    return any_items


def _reference(rows: list[dict], strategy: str) -> dict | None:
    """The plain run of a strategy: not a variant such as FT with a loss term (a label) or on one domain."""
    variant = lambda r: r["_group"].get("label") or r["_group"].get("only_domains")  # noqa: E731
    return next((r for r in rows if r["strategy"] == strategy and not variant(r)), None)


def row_headline(rows: list[dict]) -> list[str]:
    """Columns compared in the paired tables: each task, the domain mean, the general MC mean, drift, general_gen."""
    columns = score_columns(rows)
    keep = [c for c in columns if c.endswith(")") and "(" in c and not c.startswith(("mc:", "judge:"))]
    keep += [c for c in ("domain mean", "general MC mean") if c in columns]
    return keep + [c for c in columns if c.startswith(("logprob:", "gen_"))]


def paired_markdown(rows: list[dict], name: str) -> list[str]:
    body = [r for r in rows if r["_vs"].get(name)]
    if not body:
        return []
    columns = [c for c in row_headline(rows) if any(c in r["_vs"][name] for r in body)]

    def render(row, column):
        return difference(row["_vs"][name].get(column), column)

    return ["", f"Paired difference to {name} on the same items (points; 95 % paired-bootstrap interval, over seeds "
            "too where a side has several; p: exact McNemar for one seed of a closed task, paired permutation for "
            "other one-seed comparisons, else the bootstrap's):", "",
            to_markdown(body, columns, render=render)]  # fmt: skip


def markdown_report(groups: list[dict], rows: list[dict], columns: list[str], baselines, stats: bool) -> str:
    markdown = [
        "Scores in % (accuracy for closed tasks, unigram F1 for free-form ones, general multiple-choice accuracy);",
        "logprob = mean log-likelihood per token of reference responses under the model (higher = closer to them).",
    ]
    if any(c.startswith("gen_") for c in columns):
        markdown.append(
            "gen_* = greedy answers to general instructions: unigram F1 and ROUGE-L against the human reference"
            " (gen_f1, gen_rougeL) and the base model's answer (…_vs_base), answer length over the base answer's"
            " (gen_len_ratio) and the share of degenerate answers (gen_degenerate: empty, bare label, too short,"
            " looping)."
        )
    if stats:
        markdown.append(
            "[lo, hi]: 95 % bootstrap interval over items (and seeds); ±: standard deviation over seeds."
        )
    else:
        markdown.append("These run records hold no per-item results: no intervals or paired tests.")
    if baselines:
        markdown.append(
            "†: a closed task's score not above its majority-class rate (trivial baselines below)."
        )
    markdown += ["", to_markdown(rows, columns, render=cell)]
    markdown += skipped_markdown(groups)
    markdown += baseline_markdown(rows, baselines)
    for name in dict.fromkeys(name for row in rows for name in row.get("_vs", {})):  # FT, zero-shot, --versus
        markdown += paired_markdown(rows, name)
    for group in groups:
        if m := prompt_matrix(group):
            prompts, domains, grid = m
            markdown += ["", f"Prompt × test domain, {group['name']} (domain score, %):", ""]
            markdown.append(to_markdown(
                [{"label": f"p_{p}", **dict(zip(domains, row))} for p, row in zip(prompts, grid)], domains, "prompt"
            ))  # fmt: skip
    return "\n".join(markdown) + "\n"


def csv_text(rows: list[dict], columns: list[str]) -> str:
    """One line per row: every column, then its interval, seed spread and paired differences where present."""
    extra: dict[str, None] = {}
    for row in rows:
        for column, s in row.get("_ci", {}).items():
            extra.update(dict.fromkeys([f"{column} ci_lo", f"{column} ci_hi"]))
            if s.get("sd") is not None:
                extra[f"{column} sd"] = None
        for name, diffs in row.get("_vs", {}).items():
            for column in diffs:
                extra.update(dict.fromkeys(f"{column} vs {name} {k}" for k in ("diff", "lo", "hi", "p")))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*META, *columns, *extra], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        out = {k: row.get(k) for k in (*META, *columns)}
        for column, s in row.get("_ci", {}).items():
            out.update({f"{column} ci_lo": s["lo"], f"{column} ci_hi": s["hi"], f"{column} sd": s.get("sd")})
        for name, diffs in row.get("_vs", {}).items():
            for column, d in diffs.items():
                out.update({f"{column} vs {name} {k}": d[k] for k in ("diff", "lo", "hi", "p")})
        writer.writerow({k: v for k, v in out.items() if k in writer.fieldnames})
    return buffer.getvalue()


def write_report(
    runs_dir: str | Path, output: str | Path, seeds: list[int] | None = None, versus: tuple[str, ...] = ()
) -> dict:
    runs = load_runs(Path(runs_dir), seeds)
    if not runs:
        of = f" of seeds {seeds}" if seeds is not None else ""
        raise FileNotFoundError(f"no finished runs{of} (done.json + eval/eval.json) under {runs_dir}")
    check_drift_references([(run["_eval_path"], run["eval"]) for run in runs])
    runs, held = split_heldout(runs)  # evaluated on their unseen domains alone: a section of their own
    rows = table_rows(runs)
    groups = list({id(row["_group"]): row["_group"] for row in rows}.values())
    columns = score_columns(rows)
    stats = add_statistics(rows, versus)
    baselines = report_baselines(groups)
    mark_below_majority(rows, baselines)
    held_md, held_json = heldout_report(held, runs)
    out = Path(output)
    (out / "report.json").unlink(missing_ok=True)  # until the last write, the report is visibly incomplete
    with atomic_write(out / "results.md") as handle:
        handle.write((markdown_report(groups, rows, columns, baselines, stats) if rows else "") + held_md)
    with atomic_write(out / "results.csv") as handle:
        handle.write(csv_text(rows, columns))
    cis = {(r["label"], c): s for r in rows for c, s in r["_ci"].items()}
    matrices = [(g["name"], m) for g in groups if (m := prompt_matrix(g))]
    plots = {
        "mix_ratio": plot_mix_ratio(rows, out / "mix_ratio.png", cis),
        "prompt_matrix": plot_matrices(matrices, out / "prompt_matrix.png", fmt),
        "general_vs_zero_shot": plot_vs_reference(rows, out / "general_vs_zero_shot.png"),
    }
    for name, made in plots.items():
        if not made:  # a plot of an earlier report must not stay beside this one's tables
            (out / f"{name}.png").unlink(missing_ok=True)
    summary = {"runs": [g["name"] for g in groups], "columns": columns, "plots": plots, "statistics": stats}
    write_json(out / "report.json", {**summary, "baselines": baselines, **held_json})
    report = {"rows": rows, "columns": columns, "plots": plots, "statistics": stats, "baselines": baselines}
    return {**report, **held_json}


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


def report_command(
    runs: str, output: str = "docs/results", seeds: list[int] | None = None, versus: list[str] | None = None
) -> None:
    """Compare the finished runs of a grid: results.md, results.csv and PNG plots, with trivial baselines and,
    where the runs kept per-item results, confidence intervals and paired tests against FT and zero-shot.

    Args:
        runs: the grid's output folder (one sub-folder per run, or per run and seed, with done.json and
            eval/eval.json).
        output: folder for results.md, results.csv and the plots (mix_ratio.png, prompt_matrix.png,
            general_vs_zero_shot.png).
        seeds: report these seeds' runs only (and the runs without seeds, such as zero-shot), e.g. one seed's
            table while a grid is between sittings; default every seed.
        versus: strategies whose plain run every row is also paired with, beside FT and zero-shot (e.g. [ftsd]
            for REGA − FTSD on the same items).
    """
    report = write_report(runs, output, seeds, tuple(versus or ()))
    print(to_markdown(report["rows"], report["columns"], render=cell))
    print(f"wrote {Path(output) / 'results.md'}, results.csv and plots {report['plots']}")
