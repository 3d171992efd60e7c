"""The report's plots: scores against the mixing ratio r, and the prompt-by-domain matrices.

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
    rega = sorted(
        (r for r in rows if r["strategy"] == "rega" and r["mix_ratio"] is not None),
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
