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


def heatmap(matrix: torch.Tensor, path_stem: str | Path, title: str, boundaries: Sequence[int] = (), clip_percentile: float = 98.0) -> list[Path]:
    """Save ``|matrix|`` with viridis, the colour scale clipped at ``clip_percentile`` of ``|matrix|``.

    ``boundaries``: flat offsets where a new parameter slice starts (drawn as thin lines).
    Writes ``<path_stem>.pdf`` and ``<path_stem>.png``; returns their paths.
    """
    plt = _pyplot()
    a = matrix.detach().abs().to(torch.float64).cpu()
    vmax = float(torch.quantile(a.flatten()[: 2**24], clip_percentile / 100)) if a.numel() else 1.0
    vmax = vmax if vmax > 0 else float(a.max()) or 1.0
    fig, ax = plt.subplots(figsize=(6.4, 5.4) if a.ndim == 2 and a.shape[0] == a.shape[-1] else (8, 4))
    im = ax.imshow(a.numpy(), cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest", aspect="auto" if a.shape[0] != a.shape[-1] else "equal")
    for b in boundaries:
        ax.axhline(b - 0.5, color="white", lw=0.4, alpha=0.6)
        ax.axvline(b - 0.5, color="white", lw=0.4, alpha=0.6)
    fig.colorbar(im, ax=ax, label=f"|value| (clipped at {clip_percentile:g}th percentile)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    paths = [Path(f"{path_stem}.pdf"), Path(f"{path_stem}.png")]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths


def convergence(curves: dict[str, dict[str, Sequence[float]]], path_stem: str | Path, title: str) -> list[Path]:
    """Log-log curves against the probe count ``k``: ``curves[estimator][metric] = values for k = 1..K``."""
    plt = _pyplot()
    metrics = sorted({m for c in curves.values() for m in c})
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for est, c in curves.items():
            if metric in c and len(c[metric]):
                ks = range(1, len(c[metric]) + 1)
                ax.loglog(ks, [max(v, 1e-300) for v in c[metric]], label=est)
        ax.set_xlabel("k (Hessian-vector products)")
        ax.set_ylabel(metric)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    paths = [Path(f"{path_stem}.pdf"), Path(f"{path_stem}.png")]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths
