"""PNG figures for `eval --plot` and `inspect --out` (matplotlib, Agg backend: no display needed).

Every figure is written to a temporary file beside its destination and renamed into place, so a
reader never sees half a PNG and an error leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import StarElasticError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise StarElasticError("plots need matplotlib: pip install 'star-elastic[plot]'") from None
    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> Path:
    """fig as a PNG at `path`, atomically; the figure is closed."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def _millions(x, _pos=None) -> str:
    return f"{x / 1e6:.3g}M" if x >= 1e5 else f"{x / 1e3:.3g}k"


def quality_plot(budgets: dict, compare: dict, path, title: str = "", metric: str = "perplexity") -> Path:
    """Perplexity vs parameters and vs active parameters: the elastic budgets as one line (each point
    named), every `compare` model (name -> result with the same keys) as a separate point."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "params", "parameters"), (axes[1], "active_params", "active parameters")):
        pts = sorted(budgets.items(), key=lambda kv: kv[1][key])
        xs, ys = [r[key] for _, r in pts], [r[metric] for _, r in pts]
        ax.plot(xs, ys, "o-", color="tab:blue", label="elastic budgets (one checkpoint)")
        for (name, _), x, y in zip(pts, xs, ys):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8, color="tab:blue")
        markers = "s^vD<>p*"
        for i, (name, r) in enumerate(compare.items()):
            ax.plot([r[key]], [r[metric]], markers[i % len(markers)], color=f"C{(i + 1) % 10}", label=name)
            ax.annotate(name, (r[key], r[metric]), textcoords="offset points", xytext=(4, -12), fontsize=8,
                        color=f"C{(i + 1) % 10}")
        ax.set_xlabel(label)
        ax.xaxis.set_major_formatter(FuncFormatter(_millions))
        ax.grid(alpha=0.3)
    values = [r[metric] for r in list(budgets.values()) + list(compare.values())]
    if min(values) > 0 and max(values) / min(values) > 20:  # perplexities spanning decades
        axes[0].set_yscale("log")
    axes[0].set_ylabel(f"held-out {metric}" if metric == "perplexity" else metric)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def architecture_map(rows: list[str], columns: list[str], axes: dict[str, np.ndarray], path, title: str = "") -> Path:
    """One heatmap per axis: budgets (rows) x layers (columns), the fraction of the parent's units
    each budget keeps; NaN (grey) where a layer has no such axis, 0 where the layer is dropped."""
    plt = _pyplot()
    n = len(axes)
    fig, subplots = plt.subplots(n, 1, figsize=(max(6.0, 0.28 * len(columns) + 2.5), 0.45 * len(rows) * n + 1.1 * n),
                                 squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    for ax, (name, grid) in zip(subplots[:, 0], axes.items()):
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9, loc="left")
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_xticks(range(len(columns)), columns, fontsize=7)
        for r in range(grid.shape[0]):  # the fraction written in the cell when there is room
            for c in range(grid.shape[1]):
                if np.isfinite(grid[r, c]) and len(columns) <= 40:
                    ax.text(c, r, f"{grid[r, c]:.2f}".lstrip("0") if grid[r, c] < 1 else "1", ha="center",
                            va="center", fontsize=6, color="white" if grid[r, c] < 0.6 else "black")
        fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01)
    subplots[-1, 0].set_xlabel("layer (type)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def importance_map(panels: dict[str, tuple[list[str], np.ndarray, dict]], path, title: str = "") -> Path:
    """Per axis, the importance scores in the checkpoint's sorted unit order (rows: layers; each row
    divided by its maximum), with a tick where each budget's kept units end.

    panels: axis -> (row labels, scores (rows, units) padded with NaN, {budget: kept mask (rows, units)})."""
    plt = _pyplot()
    from matplotlib.colors import PowerNorm

    n = len(panels)
    cols = 2 if n > 1 else 1
    nrows = (n + cols - 1) // cols
    fig, subplots = plt.subplots(nrows, cols, figsize=(6.5 * cols, 3.0 * nrows), squeeze=False)
    cmap = plt.get_cmap("magma").with_extremes(bad="#ffffff")
    budget_colors = {}
    for ax, (name, (labels, scores, kept)) in zip(subplots.flat, panels.items()):
        top = np.nanmax(np.abs(scores), axis=1, keepdims=True)
        norm = scores / np.where(top > 0, top, 1)
        # a power norm: a few dominant units (massive activations) would leave the rest black
        ax.imshow(np.ma.masked_invalid(norm), aspect="auto", cmap=cmap, interpolation="nearest",
                  norm=PowerNorm(0.4, vmin=0, vmax=1))
        for b, mask in kept.items():
            if mask.all():
                continue  # keeps every unit: nothing to mark
            color = budget_colors.setdefault(b, f"C{len(budget_colors) % 10}")
            for r in range(mask.shape[0]):
                # the last kept unit of every run of kept units: prefix ends (within groups, if grouped)
                ends = np.flatnonzero(mask[r] & ~np.append(mask[r][1:], False))
                if mask[r].all():
                    continue
                ax.plot(ends + 0.5, np.full(len(ends), r), "|", color=color, markersize=9, mew=2,
                        label=b if r == 0 else None)
        ax.set_title(f"{name} ({scores.shape[1]} units, most important first)", fontsize=9, loc="left")
        step = max(1, len(labels) // 16)
        ax.set_yticks(range(0, len(labels), step), labels[::step], fontsize=7)
        ax.set_xlabel("unit (sorted)", fontsize=8)
    for ax in subplots.flat[n:]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, marker="|", linestyle="", markersize=9, mew=2) for c in budget_colors.values()]
    if handles:
        fig.legend(handles, [f"budget {b}: kept units end" for b in budget_colors], loc="lower center",
                   ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_figure(fig, path)
