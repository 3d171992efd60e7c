"""The report's plots: scores against the mixing ratio r, the prompt-by-domain matrices, and each run's general
ability as a paired difference to zero-shot.

PNG bytes are reproducible (no timestamps), so a regenerated report equals the committed one on the same machine.
"""

from __future__ import annotations

import io
from pathlib import Path

from rega.io import atomic_write

BASELINE_STYLES = ["--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def drift_column(rows: list[dict]) -> str | None:
    """The drift column to plot: the base model's own held-out answers where configured, else the first."""
    columns = sorted({c for row in rows for c in row if c.startswith("logprob:")})
    preferred = [c for c in columns if "self_distilled" in c]
    return (preferred or columns or [None])[0]


def _baselines(rows: list[dict], key: str, strategies: set[str]) -> dict[float, list[str]]:
    """value -> labels of the non-REGA rows: one line per value (to 0.1 point), since baselines often tie."""
    out: dict[float, list[str]] = {}
    for row in rows:
        if row["strategy"] in strategies and row.get(key) is not None:
            out.setdefault(round(row[key], 3), []).append(row["label"])  # equal as the table prints them
    return out


def plot_mix_ratio(rows: list[dict], path: Path, cis: dict | None = None) -> bool:
    """Domain score, general MC and drift against r: REGA_c and REGA_r at each r of the grid (with 95 %
    intervals where the runs kept per-item results), every other strategy as a labelled horizontal line."""
    plt = _pyplot()
    rows = [r for r in rows if not r["_group"].get("only_domains")]  # the sweep compares multi-domain runs
    # a labelled REGA run is a variant (e.g. other role prompts): not a point of the r curve
    rega = sorted(
        (
            r
            for r in rows
            if r["strategy"] == "rega" and r["mix_ratio"] is not None and not r["_group"].get("label")
        ),
        key=lambda r: r["mix_ratio"],
    )
    ratios = sorted({r["mix_ratio"] for r in rega})
    if len(ratios) < 2:
        return False
    panels = [("domain mean", "domain score (%)"), ("general MC mean", "general MC accuracy (%)")]
    if drift := drift_column(rows):
        panels.append((drift, f"{drift.split(':', 1)[1]} (log-prob/token)"))
    others = {r["strategy"] for r in rows} - {"rega"}
    # one colour and line style per strategy in every panel (the first of tied labels gives its own)
    index = {
        label: k for k, label in enumerate(dict.fromkeys(r["label"] for r in rows if r["strategy"] in others))
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4))
    for ax, (key, title) in zip(axes, panels):
        scale = 1.0 if key.startswith("logprob:") else 100.0
        for rule, style in (("central", "o-"), ("role", "s--")):
            points = [r for r in rega if r["rule"] == rule and r.get(key) is not None]
            if not points:
                continue
            xs, ys = [p["mix_ratio"] for p in points], [scale * p[key] for p in points]
            errors = [(cis or {}).get((p["label"], key)) for p in points]
            if all(errors):
                low = [y - scale * e["lo"] for y, e in zip(ys, errors)]
                high = [scale * e["hi"] - y for y, e in zip(ys, errors)]
                ax.errorbar(xs, ys, yerr=[low, high], fmt=style, capsize=3, label=f"REGA_{rule[0]}")
            else:
                ax.plot(xs, ys, style, label=f"REGA_{'c' if rule == 'central' else 'r'}")
        for value, labels in sorted(_baselines(rows, key, others).items(), reverse=True):
            k = index[labels[0]]
            style = BASELINE_STYLES[k % len(BASELINE_STYLES)]
            ax.axhline(
                scale * value, linestyle=style, color=f"C{k + 2}", linewidth=1, label=", ".join(labels)
            )
        if ratios[-1] / ratios[0] >= 10:
            ax.set_xscale("log")
        ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
        ax.minorticks_off()
        ax.set_xlabel("mixing ratio r")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


# The general measures, one panel each: a column family (every general_gen source of it in one panel).
GENERAL_PANELS = (
    ("general MC mean", "general MC accuracy (points)"),
    ("logprob:", "drift (log-prob/token)"),
    ("gen_f1:", "general answers: F1 vs reference (points)"),
    ("gen_f1_vs_base:", "general answers: F1 vs base answer (points)"),
    ("gen_len_ratio:", "general answers: length / base length"),
    ("gen_degenerate:", "degenerate general answers (points)"),
)


def general_panels(body: list[dict], name: str) -> list[tuple[list[str], str]]:
    """(columns, title) of each general measure that some row of ``body`` compares with ``name``."""
    panels = []
    for prefix, title in GENERAL_PANELS:
        columns = sorted({c for r in body for c in r["_vs"][name] if c == prefix or c.startswith(prefix)})
        if columns:
            panels.append((columns, title))
    return panels


def plot_vs_reference(rows: list[dict], path: Path, name: str = "zero-shot") -> bool:
    """Forgetting at a glance: each row's paired difference to ``name`` (95 % interval) on every general measure,
    rows top to bottom in table order; an interval left of zero (right of it for degenerate answers) is a loss."""
    body = [r for r in rows if r.get("_vs", {}).get(name)]
    panels = general_panels(body, name)
    if len(body) < 2 or not panels:
        return False
    plt = _pyplot()
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    height = 1.2 + 0.35 * len(body)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, height * rows_n), squeeze=False)
    ys = list(range(len(body)))[::-1]
    for ax, (columns, title) in zip(axes.flat, panels):
        for k, column in enumerate(columns):
            scale = 1.0 if column.startswith(("logprob:", "gen_len_ratio:")) else 100.0
            points = [(y, r["_vs"][name].get(column)) for y, r in zip(ys, body)]
            points = [(y + 0.15 * (k - (len(columns) - 1) / 2), d) for y, d in points if d]
            xs = [scale * d["diff"] for _, d in points]
            low = [scale * (d["diff"] - d["lo"]) for _, d in points]
            high = [scale * (d["hi"] - d["diff"]) for _, d in points]
            label = column.split(":", 1)[1] if ":" in column else None
            ax.errorbar(xs, [y for y, _ in points], xerr=[low, high], fmt="o", capsize=2, label=label)
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_yticks(ys, [r["label"] for r in body], fontsize=7)
        ax.set_title(title, fontsize=9)
        if len(columns) > 1:
            ax.legend(fontsize=6, frameon=False)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"paired difference to {name} on the same items (95 % interval)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def plot_matrices(matrices: list[tuple[str, tuple]], path: Path, fmt) -> bool:
    """One heat map per run: rows = role prompt, columns = test domain, cells = domain score."""
    if not matrices:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(matrices), figsize=(4 * len(matrices), 3.6), squeeze=False)
    for ax, (name, (prompts, domains, grid)) in zip(axes[0], matrices):
        values = [[v if v is not None else float("nan") for v in row] for row in grid]
        ax.imshow(values, cmap="viridis")
        ax.set_xticks(range(len(domains)), domains, rotation=30)
        ax.set_yticks(range(len(prompts)), [f"p_{p}" for p in prompts])
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, fmt(v, "score"), ha="center", va="center", color="white", fontsize=8)
        ax.set_title(f"{name}: prompt × test domain", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(
        buffer, format="png", dpi=120, metadata={"Software": None}
    )  # no timestamps: reproducible bytes
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
