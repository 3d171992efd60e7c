"""The report's section on unseen domains: runs of a grid that held domains out of training (``heldout_domains``),
each held-out domain's tasks answered under p_c, under the prompts config's hand-written role prompt p_i (both in
the run's ``eval/``) and under the automatic p_i that ``rega prompts`` wrote (``eval_auto/``).

One row per (run, prompt source) with the domain's task scores and mean (seed means; 95 % bootstrap intervals
where the runs kept per-item results) and the paired difference, per column, to two references under p_c on the
same items: zero-shot (a zero_shot run holding the domain out, else the grid's plain zero_shot run) and FT trained
without the domain. The statistics are those of the main table (:mod:`rega.experiments.report_stats`).

Held-out runs are evaluated on their unseen domains alone, so they are kept out of the main table: a mean over
one domain beside the others' three would read as comparable, and neither may become its FT or zero-shot reference.
"""

from __future__ import annotations

import json
from pathlib import Path

from rega.experiments.report_format import difference, domain_columns, mean, with_interval
from rega.experiments.report_stats import column_units, intervals, paired, row_units

# (prompt source, the run's evaluation holding it, its rule)
SOURCES = (
    ("p_c", "eval", "central"),
    ("hand-written p_i", "eval", "role"),
    ("automatic p_i", "auto", "role"),
)
ORDER = ("zero_shot", "ft", "ftsd", "ftrp", "ft_replay", "sdft", "rega")  # as the main table's rows
PROMPT_CHARS = 200  # of each p_i quoted in results.md (report.json keeps it whole)


def split_heldout(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the main table's runs, the runs that held domains out); done.json files written before ``heldout_domains``
    existed go to the main table."""
    held = [run for run in runs if run.get("heldout_domains")]
    return [run for run in runs if not run.get("heldout_domains")], held


def _auto_eval(run: dict) -> dict | None:
    path = Path(run["_eval_path"]).parent.parent / "eval_auto" / "eval.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _groups(runs: list[dict]) -> list[dict]:
    """One group per run name: its seeds' evaluations (``eval``) and automatic-prompt evaluations (``auto``)."""
    groups: dict[str, dict] = {}
    for run in runs:
        group = groups.setdefault(run["name"], {**run, "seeds": [], "eval": [], "auto": []})
        group["seeds"].append(run.get("seed"))
        group["eval"].append(run["eval"])
        if (auto := _auto_eval(run)) is not None:
            group["auto"].append(auto)
    rank = {s: k for k, s in enumerate(ORDER)}
    return sorted(
        groups.values(), key=lambda g: (rank.get(g["strategy"], 99), g.get("mix_ratio") or 0, g["name"])
    )


def _evals(group: dict, kind: str, rule: str, domain: str) -> list[dict]:
    """The group's evaluations of ``domain`` under ``rule``; none unless every seed has one (seeds pair up)."""
    evals = group[kind]
    whole = len(evals) == len(group["seeds"]) and all(
        domain in (e.get("rules") or {}).get(rule, {}).get("domains", {}) for e in evals
    )
    return evals if whole else []


def _row(group: dict, source: str, kind: str, rule: str, domain: str) -> dict | None:
    evals = _evals(group, kind, rule, domain)
    if not evals:
        return None
    per_seed = [domain_columns(domain, e["rules"][rule]["domains"][domain]) for e in evals]
    cols = column_units({"domains": {domain: evals[0]["rules"][rule]["domains"][domain]}}, {})
    cols.pop("domain mean", None)  # one domain: its own mean
    units = row_units(evals, rule)
    prompt = ((evals[0].get("meta") or {}).get("prompts") or {}).get("roles", {}).get(domain)
    return {
        "run": group["name"],
        "strategy": group["strategy"],
        "prompt": source,
        "seeds": " ".join(str(s) for s in group["seeds"] if s is not None),
        "scores": {c: mean([p.get(c) for p in per_seed]) for c in per_seed[0]},
        "ci": intervals(units, cols),
        "_group": group,
        "_units": units,
        "_cols": cols,
        "_prompt": prompt if rule == "role" else None,
    }


def _usable(groups: list[dict], domain: str) -> dict | None:
    return next((g for g in groups if _evals(g, "eval", "central", domain)), None)


def references(domain: str, held: list[dict], main: list[dict]) -> tuple[dict | None, dict | None]:
    """(zero-shot group, FT-without-``domain`` group) answering the domain under p_c."""
    zero = [g for g in held if g["strategy"] == "zero_shot" and domain in g["heldout_domains"]]
    zero += [g for g in main if g["strategy"] == "zero_shot" and not g.get("label")]
    ft = [g for g in held if g["strategy"] == "ft" and not g.get("label") and domain in g["heldout_domains"]]
    ft.sort(key=lambda g: len(g["heldout_domains"]))  # the run holding out this domain alone first
    return _usable(zero, domain), _usable(ft, domain)


def domain_section(domain: str, held: list[dict], main: list[dict]) -> dict:
    """The rows of one held-out domain, each with its paired differences (``vs``) to the references under p_c."""
    zero, ft = references(domain, held, main)
    shown = [zero] if zero else []
    shown += [g for g in held if domain in g["heldout_domains"] and g is not zero]
    rows = [row for g in shown for source in SOURCES if (row := _row(g, *source, domain))]
    refs = {
        name: next(r for r in rows if r["_group"] is group and r["prompt"] == "p_c")
        for name, group in (("zero-shot", zero), ("FT", ft))
        if group is not None
    }
    for row in rows:
        row["vs"] = {
            name: paired(row["_units"], ref["_units"], row["_cols"], list(row["_cols"]))
            for name, ref in refs.items()
            if ref is not row
        }
    prompts = {
        source: next((r["_prompt"] for r in rows if r["prompt"] == source and r["_prompt"]), None)
        for source, _, rule in SOURCES
        if rule == "role"
    }
    names = {name: ref["run"] for name, ref in refs.items()}
    return {"domain": domain, "references": names, "prompts": prompts, "rows": rows}


def section_markdown(section: dict) -> list[str]:
    domain, refs, rows = section["domain"], section["references"], section["rows"]
    columns = list(dict.fromkeys(c for row in rows for c in row["scores"]))
    mean_column = f"{domain} mean"
    said = ", ".join(f"{name}: {run}" for name, run in refs.items()) or "no zero-shot or FT reference"
    lines = ["", f"**{domain}** (references under p_c: {said})"]
    texts = {source: " ".join(text.split()) for source, text in section["prompts"].items() if text}
    if texts:
        cut = lambda t: t if len(t) <= PROMPT_CHARS else t[: PROMPT_CHARS - 1] + "…"  # noqa: E731
        lines += ["", *(f"* {source}: “{cut(text)}”" for source, text in texts.items())]
    if len(texts) == 2 and len(set(texts.values())) == 1:
        lines.append("* the automatic p_i is the hand-written one: did its file hold a role for this domain?")
    heads = [f"Δ {mean_column} vs {name}" for name in refs]
    lines += ["", "| run | prompt | " + " | ".join([*columns, *heads]) + " |"]
    lines.append("|" + "---|" * (len(columns) + len(heads) + 2))
    for row in rows:
        cells = [with_interval(row["scores"].get(c), row["ci"].get(c), c) for c in columns]
        cells += [difference(row["vs"].get(name, {}).get(mean_column), mean_column) for name in refs]
        lines.append(f"| {row['run']} | {row['prompt']} | " + " | ".join(cells) + " |")
    return lines


def heldout_report(held_runs: list[dict], main_runs: list[dict]) -> tuple[str, dict]:
    """(the results.md section, ``{"heldout": [...]}`` for report.json) — both empty without held-out runs."""
    if not held_runs:
        return "", {}
    held, main = _groups(held_runs), _groups(main_runs)
    domains = sorted({d for g in held for d in g["heldout_domains"]})
    sections = [domain_section(d, held, main) for d in domains]
    markdown = [
        "",
        "## Held-out domains",
        "",
        "Runs trained without a domain (`heldout_domains`), on its tasks: under p_c, under the prompts config's "
        "hand-written role prompt p_i and under the automatic p_i of `rega prompts` (`auto_prompts`). Scores in %, "
        "[lo, hi]: 95 % bootstrap interval; Δ: paired difference of the domain mean to each reference under p_c on "
        "the same items (95 % paired-bootstrap interval; p: exact McNemar for one seed of a closed task, paired "
        "permutation for other one-seed comparisons, else the bootstrap's; every column in report.json).",
    ]
    for section in sections:
        markdown += section_markdown(section)
    public = [
        {**s, "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in s["rows"]]}
        for s in sections
    ]
    return "\n".join(markdown) + "\n", {"heldout": public}
