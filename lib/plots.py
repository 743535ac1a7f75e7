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
    """Write ``fig`` to ``<path_stem>.pdf`` and ``.png`` (each atomically, or staged with the rest of the result:
    :func:`lib.results.atomic_write_bytes`), close it, return the paths."""
    from .results import atomic_write_bytes

    paths = [Path(f"{path_stem}.pdf"), Path(f"{path_stem}.png")]
    try:
        for p in paths:
            atomic_write_bytes(p, lambda tmp, p=p: fig.savefig(tmp, dpi=150, format=p.suffix[1:]))
    finally:
        _pyplot().close(fig)
    return paths


def slice_label(param_name: str) -> str:
    """Short label of a parameter slice: ``model.decoder.layers.3.self_attn.q_proj.weight`` -> ``b3 q_proj``."""
    parts = [p for p in param_name.split(".") if p not in ("weight", "bias")]
    blocks = [i for i, p in enumerate(parts) if p.isdigit()]
    if not blocks:
        return parts[-1] if parts else param_name
    i = blocks[-1]
    return f"b{parts[i]} {parts[-1]}" if i < len(parts) - 1 else f"b{parts[i]}"


def _colour_text(value: str, vmax: float, clip_percentile: float) -> str:
    return f"{value}, linear scale, 0 to {vmax:.3g} (clipped at the {clip_percentile:g}th percentile)"


def _label_slices(ax, boundaries: Sequence[int], n: int, labels: Sequence[str]) -> None:
    """Slice labels at the slice centres on the top and right axes (entry indices stay on the bottom and left)."""
    edges = [0, *boundaries, n]
    centres = [(a + b) / 2 - 0.5 for a, b in zip(edges[:-1], edges[1:])]
    size = max(3.5, min(7.0, 160 / max(1, len(labels))))
    top = ax.secondary_xaxis("top")
    top.set_xticks(centres, labels=list(labels), rotation=90, fontsize=size)
    right = ax.secondary_yaxis("right")
    right.set_yticks(centres, labels=list(labels), fontsize=size)
    for axis in (top, right):
        axis.tick_params(length=0)


def heatmap(matrix: torch.Tensor, path_stem: str | Path, title: str, boundaries: Sequence[int] = (), clip_percentile: float = 98.0, slice_labels: Sequence[str] = (), axis_labels: tuple[str, str] = ("entry index j", "entry index i"), value: str = "|H_ij|") -> list[Path]:
    """Save ``|matrix|`` with viridis on a linear scale from 0, clipped at ``clip_percentile`` of ``|matrix|``.

    Axes: ``axis_labels`` (x, y; default the Hessian's entry indices); the colour bar names ``value``. ``boundaries``: flat offsets where a new parameter slice starts
    (thin lines); ``slice_labels`` (one per slice): drawn at the slice centres on the top and right axes.
    Writes ``<path_stem>.pdf`` and ``<path_stem>.png``; returns their paths.
    """
    plt = _pyplot()
    a = matrix.detach().abs().to(torch.float64).cpu()
    vmax = _clipped_max(a, clip_percentile)
    square = a.ndim == 2 and a.shape[0] == a.shape[-1]
    labelled = square and len(slice_labels) == len(boundaries) + 1 and len(slice_labels) > 1
    fig, ax = plt.subplots(figsize=(7.0, 6.2) if labelled else (6.4, 5.6) if square else (8, 4))
    im = ax.imshow(a.numpy(), cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest", aspect="equal" if square else "auto")
    for b in boundaries:
        ax.axhline(b - 0.5, color="white", lw=0.4, alpha=0.6)
        ax.axvline(b - 0.5, color="white", lw=0.4, alpha=0.6)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    if labelled:
        _label_slices(ax, boundaries, a.shape[0], slice_labels)
    cb = fig.colorbar(im, ax=ax, pad=0.12 if labelled else 0.04, shrink=0.9)
    cb.set_label(_colour_text(value, vmax, clip_percentile), fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path_stem)


def slice_mass(mass: torch.Tensor, labels: Sequence[str], path_stem: str | Path, title: str) -> list[Path]:
    """The ``(P, P)`` matrix of shares of ``||H||_F^2`` per slice pair (:func:`lib.diagonality.slice_mass`), log colour scale, values written in small cells."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    m = mass.detach().to(torch.float64).cpu()
    p = m.shape[0]
    positive = m[m > 0]
    lo = float(positive.min()) if positive.numel() else 1e-12
    fig, ax = plt.subplots(figsize=(min(9.0, 2.5 + 0.3 * p), min(8.0, 2.0 + 0.28 * p)))
    im = ax.imshow(m.clamp_min(lo).numpy(), cmap="magma", norm=LogNorm(vmin=max(lo, float(m.max()) * 1e-8), vmax=float(m.max())), interpolation="nearest")
    size = max(3.5, min(8.0, 160 / p))
    ax.set_xticks(range(p), labels=list(labels), rotation=90, fontsize=size)
    ax.set_yticks(range(p), labels=list(labels), fontsize=size)
    if p <= 12:
        for i in range(p):
            for j in range(p):
                ax.text(j, i, f"{float(m[i, j]):.2g}", ha="center", va="center", fontsize=6, color="white" if m[i, j] < m.max() / 10 else "black")
    fig.colorbar(im, ax=ax, label="share of ||H||_F^2 (log scale)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path_stem)


def batch_study_figure(block: dict, kept: dict[int, torch.Tensor], path_stem: str | Path, title: str, clip_percentile: float = 98.0) -> list[Path]:
    """The batch-size study (report Fig. 2): both relative errors against ``b`` (log-log), then ``|H^b|`` at the kept ``b``, each panel on its own linear colour scale."""
    plt = _pyplot()
    n = 1 + len(kept)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.0), squeeze=False)
    ax = axes[0][0]
    b = block["b"]
    for key, label in (("rel_to_full", "||H^b - H^B|| / ||H^B||"), ("rel_consecutive", "||H^b_i - H^b_(i-1)|| / ||H^b_i||")):
        pts = [(x, v) for x, v in zip(b, block[key]) if v is not None and v == v and v > 0]
        if pts:
            ax.loglog(*zip(*pts), marker=".", ms=3, label=label)
    ax.set_xlabel("b (samples)")
    ax.set_ylabel("relative Frobenius norm")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    for ax, (bk, h) in zip(axes[0][1:], kept.items()):
        _panel(fig, ax, h, f"|H^b|, b = {bk}" + (" (full batch)" if bk == b[-1] else ""), ("entry index j", "entry index i"), clip_percentile)
    fig.suptitle(f"{title}\n(heatmaps: linear scale from 0, each clipped at its {clip_percentile:g}th percentile)", fontsize=9)
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


def _panel(fig, ax, matrix: torch.Tensor, title: str, axis_labels: tuple[str, str], clip_percentile: float) -> None:
    """One small ``|matrix|`` heatmap (viridis, linear from 0, clipped at its ``clip_percentile``) with its own colour bar."""
    a = matrix.detach().abs().to(torch.float64).cpu()
    a = a if a.ndim == 2 else a.reshape(1, -1)
    im = ax.imshow(a.numpy(), cmap="viridis", vmin=0, vmax=_clipped_max(a, clip_percentile), interpolation="nearest", aspect="auto")
    ax.set_title(title, fontsize=7)
    ax.set_xlabel(axis_labels[0], fontsize=6)
    ax.set_ylabel(axis_labels[1], fontsize=6)
    ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)


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
        _panel(fig, ax, matrix, label, ("column", "row"), clip_percentile)
    fig.suptitle(f"{title}\n(|value|, linear scale from 0, each panel clipped at its {clip_percentile:g}th percentile)", fontsize=9)
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
