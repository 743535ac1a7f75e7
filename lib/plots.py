"""Figures: heatmaps of |H| (paper Figs. 1 and 3b) and convergence curves (paper Fig. 3a)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _clipped_max(a: torch.Tensor, clip_percentile: float) -> float:
    """The colour-scale maximum: the ``clip_percentile`` percentile of ``a`` (its max if that is 0)."""
    vmax = float(torch.quantile(a.flatten()[: 2**24], clip_percentile / 100)) if a.numel() else 1.0
    return vmax if vmax > 0 else float(a.max()) or 1.0


def _save(fig, path_stem: str | Path) -> list[Path]:
    """Write ``fig`` to ``<path_stem>.pdf`` and ``.png``, close it, return the paths."""
    paths = [Path(f"{path_stem}.pdf"), Path(f"{path_stem}.png")]
    for p in paths:
        fig.savefig(p, dpi=150)
    _pyplot().close(fig)
    return paths


def heatmap(matrix: torch.Tensor, path_stem: str | Path, title: str, boundaries: Sequence[int] = (), clip_percentile: float = 98.0) -> list[Path]:
    """Save ``|matrix|`` with viridis, the colour scale clipped at ``clip_percentile`` of ``|matrix|``.

    ``boundaries``: flat offsets where a new parameter slice starts (drawn as thin lines).
    Writes ``<path_stem>.pdf`` and ``<path_stem>.png``; returns their paths.
    """
    plt = _pyplot()
    a = matrix.detach().abs().to(torch.float64).cpu()
    vmax = _clipped_max(a, clip_percentile)
    fig, ax = plt.subplots(figsize=(6.4, 5.4) if a.ndim == 2 and a.shape[0] == a.shape[-1] else (8, 4))
    im = ax.imshow(a.numpy(), cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest", aspect="auto" if a.shape[0] != a.shape[-1] else "equal")
    for b in boundaries:
        ax.axhline(b - 0.5, color="white", lw=0.4, alpha=0.6)
        ax.axvline(b - 0.5, color="white", lw=0.4, alpha=0.6)
    fig.colorbar(im, ax=ax, label=f"|value| (clipped at {clip_percentile:g}th percentile)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path_stem)


def convergence(curves: dict[str, dict[str, Sequence[float]]], path_stem: str | Path, title: str, references: dict[str, dict[str, float]] | None = None) -> list[Path]:
    """Log-log curves against the probe count ``k``: ``curves[estimator][metric] = values``.

    The values are for ``k = 1..K`` unless ``curves[estimator]["k"]`` gives the ``k`` of each value.
    ``references[label][metric]``: a ``k``-independent value drawn as a dashed horizontal line. NaN or
    non-positive values are left out (log axes).
    """
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    metrics = list(dict.fromkeys([m for c in curves.values() for m in c if m != "k"] + [m for r in (references or {}).values() for m in r]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for est, c in curves.items():
            values = list(c.get(metric, []))
            ks = list(c["k"]) if "k" in c else list(range(1, len(values) + 1))
            pts = [(k, v) for k, v in zip(ks, values) if v == v and v > 0]
            if pts:
                ax.loglog(*zip(*pts), label=est)
        for j, (label, ref) in enumerate((references or {}).items()):
            if metric in ref and ref[metric] == ref[metric] and ref[metric] > 0:
                ax.axhline(ref[metric], ls="--", lw=1, color=f"C{len(curves) + j}", label=f"{label} (no probes)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # less than a decade would label every minor tick
        ax.set_xlabel("k (Hessian-vector products per sample)")
        ax.set_ylabel(metric)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path_stem)


def heatmap_grid(panels: Sequence[tuple[str, torch.Tensor]], path_stem: str | Path, title: str, ncols: int = 6, clip_percentile: float = 98.0) -> list[Path]:
    """Several ``|matrix|`` heatmaps (viridis, each clipped at its own ``clip_percentile``) in one figure.

    ``panels``: ``(title, matrix)`` pairs, laid out row-major in ``ncols`` columns. Writes
    ``<path_stem>.pdf`` and ``<path_stem>.png``; returns their paths.
    """
    plt = _pyplot()
    ncols = max(1, min(ncols, len(panels)))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.0 * nrows + 0.6), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (label, matrix) in zip(axes.flat, panels):
        a = matrix.detach().abs().to(torch.float64).cpu()
        a = a if a.ndim == 2 else a.reshape(1, -1)
        vmax = _clipped_max(a, clip_percentile)
        im = ax.imshow(a.numpy(), cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest", aspect="auto")
        ax.set_title(label, fontsize=7)
        ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    fig.suptitle(f"{title}\n(each panel clipped at its {clip_percentile:g}th percentile)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path_stem)


def comparison_figure(matrices: dict[str, torch.Tensor], metrics: dict[str, dict[str, float]], path_stem: str | Path, title: str, clip_percentile: float = 98.0) -> list[Path]:
    """Exact Hessian and its approximations side by side, and a bar chart of the comparison metrics.

    ``matrices``: ``{"exact": H, approx: A}``; each ``A`` is shown as ``|best_scale * A|`` (the proxies are defined
    up to a scale) on the exact Hessian's colour scale (clipped at ``clip_percentile`` of ``|H|``).
    ``metrics[approx]``: :func:`lib.curvature.compare_matrices`. Writes ``<path_stem>.pdf`` / ``.png``.
    """
    plt = _pyplot()
    import numpy as np

    names = list(matrices)
    h = matrices["exact"].detach().abs().to(torch.float64).cpu()
    vmax = _clipped_max(h, clip_percentile)
    fig = plt.figure(figsize=(3.0 * len(names) + 1.0, 6.6))
    grid = fig.add_gridspec(2, len(names), height_ratios=[1.1, 1.0])
    im = None
    for j, name in enumerate(names):
        ax = fig.add_subplot(grid[0, j])
        scale = 1.0 if name == "exact" else metrics[name]["best_scale"]
        a = (scale * matrices[name].detach().to(torch.float64).cpu()).abs()
        im = ax.imshow(a.numpy(), cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(name if name == "exact" else f"{name} x {scale:.3g}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=fig.axes, fraction=0.015, pad=0.01).ax.tick_params(labelsize=6)
    keys = [("rel_frobenius_scaled", "rel. Frobenius error\n(best scale)"), ("cosine", "cosine"), ("top_k_overlap", "top-k eigvec overlap"), ("pred_vs_exact_corr", "corr(dAd, dHd)"), ("pred_vs_measured_even_corr", "corr(dAd, measured\nsecond-order part)")]
    keys = [(k, label) for k, label in keys if any(k in m for m in metrics.values())]
    bars = [n for n in metrics]
    ax = fig.add_subplot(grid[1, :])
    width = 0.8 / max(1, len(bars))
    x = np.arange(len(keys))
    for i, name in enumerate(bars):
        vals = [metrics[name].get(k, float("nan")) for k, _ in keys]
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, vals, width, label=name, color=f"C{i}")
    ax.set_xticks(x, [label for _, label in keys], fontsize=8)
    ax.axhline(0, color="black", lw=0.5)
    ax.legend(fontsize=7, ncol=min(len(bars), 7))
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{title}\n|H| and |best_scale * A| on one colour scale (clipped at the {clip_percentile:g}th percentile of |H|)", fontsize=9)
    return _save(fig, path_stem)
