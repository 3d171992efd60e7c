"""How the report writes its numbers, shared by the main table (:mod:`rega.experiments.report`) and the held-out
section (:mod:`rega.experiments.report_heldout`): seed means, a domain's columns, and scores, intervals and paired
differences as text."""

from __future__ import annotations


def mean(values: list) -> float | None:
    """The mean over seeds; ``None`` unless every seed has the value."""
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def domain_columns(domain: str, dsum: dict) -> dict[str, float | None]:
    """One domain's columns of one evaluation: each task's score (and ``ll_acc``), then the domain's mean."""
    cols: dict[str, float | None] = {}
    for task, tsum in sorted(dsum["tasks"].items()):
        cols[f"{task} ({tsum['metric']})"] = tsum["score"]
        if "ll_acc" in tsum and tsum["metric"] != "ll_acc":
            cols[f"{task} (ll_acc)"] = tsum["ll_acc"]
    cols[f"{domain} mean"] = dsum["score"]
    return cols


def pct(value: float, column: str, signed: bool = False) -> str:
    """Scores (0-1) as percentages; log-likelihoods, length ratios and judge ratings (1-10) as they are."""
    sign = "+" if signed else ""
    if column.startswith("logprob:"):
        return f"{value:{sign}.3f}"
    if column.startswith("gen_len_ratio:"):
        return f"{value:{sign}.2f}"
    return f"{value:{sign}.2f}" if column.startswith("judge:") else f"{100 * value:{sign}.1f}"


def fmt(value, column: str) -> str:
    if value is None:
        return "–"
    return pct(value, column) if isinstance(value, float) else str(value)


def with_interval(value, stats: dict | None, column: str) -> str:
    """``value ±sd [lo, hi]``: the score, the spread over seeds where there are several, the 95 % interval."""
    text = fmt(value, column)
    if stats and value is not None:
        sd = f" ±{pct(stats['sd'], column)}" if stats.get("sd") is not None else ""
        text += f"{sd} [{pct(stats['lo'], column)}, {pct(stats['hi'], column)}]"
    return text


def difference(d: dict | None, column: str) -> str:
    """A paired difference: ``diff [lo, hi] p=...``."""
    if not d:
        return "–"
    signed = [pct(d[key], column, True) for key in ("diff", "lo", "hi")]
    return f"{signed[0]} [{signed[1]}, {signed[2]}] p={d['p']:.2g}"
