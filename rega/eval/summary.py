"""Readable and loggable views of an evaluation result: flat scalars for loggers, the sample answers as a
Markdown table, and the printed summary of ``rega evaluate``."""

from __future__ import annotations

import math

GEN_SCALARS = ("f1_ref", "rougeL_ref", "f1_base", "rougeL_base", "length", "length_ratio", "degenerate")


def scalars(result: dict, prefix: str = "eval") -> dict[str, float]:
    """Flat ``name -> value`` for loggers:

    ``eval/<rule>/overall``, ``eval/<rule>/task_mean``, ``eval/<rule>/<domain>/score``,
    ``eval/<rule>/<domain>/<task>/{acc,f1,ll_acc}``, ``eval/general_mc/<name>`` (headline metric),
    ``eval/general_mc/<name>/{acc,acc_norm,delta}``, ``eval/drift/<name>/{logprob_per_token,delta}``,
    ``eval/general_gen/<name>/{f1_ref,rougeL_ref,f1_base,rougeL_base,length,length_ratio,degenerate}``, and the
    mean judge score of each judged benchmark, ``eval/<benchmark>/score`` (``eval/mt_bench/score``).
    """
    out: dict[str, float] = {}

    def put(name: str, value) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}/{name}"] = float(value)

    for rule, summary in result.get("rules", {}).items():
        put(f"{rule}/overall", summary.get("overall"))
        put(f"{rule}/task_mean", summary.get("task_mean"))
        for domain, dsum in summary.get("domains", {}).items():
            put(f"{rule}/{domain}/score", dsum.get("score"))
            for task, tsum in dsum.get("tasks", {}).items():
                for metric in ("acc", "f1", "ll_acc"):
                    put(f"{rule}/{domain}/{task}/{metric}", tsum.get(metric))
    for name, value in result.get("general_mc", {}).items():
        put(f"general_mc/{name}", value.get("score"))
        for metric in ("acc", "acc_norm", "delta"):
            put(f"general_mc/{name}/{metric}", value.get(metric))
    for name, value in result.get("drift", {}).items():
        put(f"drift/{name}/logprob_per_token", value.get("logprob_per_token"))
        put(f"drift/{name}/delta", value.get("delta"))
    for name, value in result.get("general_gen", {}).items():
        for metric in GEN_SCALARS:
            put(f"general_gen/{name}/{metric}", value.get(metric))
    for name, value in result.get("judge", {}).items():
        put(f"{name}/score", (value.get("overall") or {}).get("mean"))
    return out


def _cell(value, width: int = 160) -> str:
    text = "" if value is None else str(value)
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def samples_markdown(result: dict) -> str:
    """The sample answers as a markdown table (TensorBoard text)."""
    lines = ["| rule | task | id | gold | extracted | score | response |", "|---|---|---|---|---|---|---|"]
    for row in result.get("samples", []):
        score = row.get("score")
        lines.append(
            "| "
            + " | ".join(
                _cell(v)
                for v in (
                    row["rule"],
                    row["task"],
                    row["id"],
                    row["gold"],
                    row.get("pred"),
                    f"{score:.2f}" if isinstance(score, int | float) else score,
                    row["response"],
                )
            )
            + " |"
        )
    return "\n".join(lines)


def _fmt(value, pct: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:6.1f}" if pct else f"{value:8.4f}"


def _mc_line(name: str, value: dict) -> str:
    delta = f"  Δ {100 * value['delta']:+.1f}" if value.get("delta") is not None else ""
    return (
        f"  {name:<16} {value['metric']:<8} {_fmt(value['score'])}  acc {_fmt(value['acc'])}"
        f"  acc_norm {_fmt(value['acc_norm'])}  n={value['n']}  [{value['backend']}]{delta}"
    )


def _drift_line(name: str, value: dict) -> str:
    delta = f"  Δ {value['delta']:+.4f}" if value.get("delta") is not None else ""
    return (
        f"  {name:<16} {_fmt(value['logprob_per_token'], pct=False)}  ppl {value['ppl']:.2f}"
        f"  records={value['n_records']} tokens={value['n_tokens']}{delta}"
    )


def _gen_line(name: str, value: dict) -> str:
    ratio = f"{value['length_ratio']:.2f}" if value.get("length_ratio") is not None else "-"
    return (
        f"  {name:<16} F1 {_fmt(value['f1_ref'])}  ROUGE-L {_fmt(value['rougeL_ref'])}"
        f"  vs base: F1 {_fmt(value['f1_base'])}  ROUGE-L {_fmt(value['rougeL_base'])}  length ratio {ratio}"
        f"  degenerate {_fmt(value['degenerate'])}  n={value['n']} (reference {value['n_reference']})"
    )


def _section(result: dict, key: str, title: str, line) -> list[str]:
    values = result.get(key) or {}
    return [title, *(line(name, value) for name, value in values.items())] if values else []


def judge_text(result: dict) -> str:
    """One line per judged benchmark: its mean score and counts, or why it failed."""
    lines = []
    for name, value in result.get("judge", {}).items():
        overall = value.get("overall") or {}
        counts = f"n={overall.get('n', 0)}, missing {overall.get('missing', 0)}"
        lines.append(
            f"{name}: failed: {value['error']}"
            if value.get("error")
            else f"{name}: mean {overall.get('mean')} ({counts})"
        )
    return "\n".join(lines)


def summary_text(result: dict) -> str:
    """A readable summary: domain scores per rule, general MC, drift, general generation."""
    lines = []
    for rule, summary in result.get("rules", {}).items():
        lines.append(
            f"prompt rule {rule}: overall {_fmt(summary['overall'])}  (task mean {_fmt(summary['task_mean'])})"
        )
        for domain, dsum in summary["domains"].items():
            lines.append(f"  {domain:<12} {_fmt(dsum['score'])}")
            for task, tsum in dsum["tasks"].items():
                extra = f"  ll_acc {_fmt(tsum['ll_acc'])}" if "ll_acc" in tsum else ""
                no_answer = f"  no answer {tsum['no_answer']}/{tsum['n']}" if "no_answer" in tsum else ""
                lines.append(
                    f"    {task:<20} {tsum['metric']:<4} {_fmt(tsum['score'])}  n={tsum['n']}{no_answer}{extra}"
                )
    lines += _section(result, "general_mc", "general multiple choice (log-likelihood, under p_c):", _mc_line)
    lines += _section(result, "drift", "drift (mean log-prob per response token, under p_c):", _drift_line)
    lines += _section(result, "general_gen", "general generation (greedy answers under p_c, %):", _gen_line)
    skipped = result.get("meta", {}).get("skipped_invalid") or {}
    if skipped.get("n"):
        lines.append(f"skipped {skipped['n']} invalid rows (skip_invalid), first: {skipped['first'][0]}")
    timings = result.get("meta", {}).get("timings", {})
    if timings:
        lines.append("time: " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return "\n".join(lines)
