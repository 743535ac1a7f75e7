"""Figures: signed heatmaps of H (paper Figs. 1 and 3b), convergence curves (Fig. 3a), the batch-size study
(Fig. 2), slice-pair mass, the curvature comparison and the spectral density.

Heatmaps show the *signed* matrix by default: a diverging colour map (``RdBu_r``, white at 0) on symmetric
limits ``[-c, c]``, ``c`` the ``clip_percentile`` percentile of ``|H|`` (stated on the colour bar), so an
indefinite Hessian shows its negative entries; ``signed=False`` draws ``|H|`` with viridis from 0 (the
report's view, ``--abs``). Every figure is laid out so that no text leaves the canvas and titles take at
most two lines (:func:`fit_title`; :func:`layout_problems` checks both).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

DIVERGING = "RdBu_r"
"""Colour map of signed heatmaps: blue negative, white zero, red positive."""
MAX_TITLE_LINES = 2


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _clipped_max(a: torch.Tensor, clip_percentile: float) -> float:
    """The colour-scale maximum: the ``clip_percentile`` percentile of ``a`` (its max if that is 0)."""
    vmax = float(torch.quantile(a.flatten()[: 2**24], clip_percentile / 100)) if a.numel() else 1.0
    return vmax if vmax > 0 else float(a.max()) or 1.0


def colour_scale(
    matrix: torch.Tensor, signed: bool, clip_percentile: float
) -> tuple[torch.Tensor, dict[str, Any], float]:
    """``(values drawn, imshow keywords, c)``: signed: the matrix on ``[-c, c]`` with :data:`DIVERGING`; else
    ``|matrix|`` on ``[0, c]`` with viridis; ``c`` = the ``clip_percentile`` percentile of ``|matrix|``."""
    a = matrix.detach().to(torch.float64).cpu()
    c = _clipped_max(a.abs(), clip_percentile)
    if signed:
        return a, {"cmap": DIVERGING, "vmin": -c, "vmax": c}, c
    return a.abs(), {"cmap": "viridis", "vmin": 0.0, "vmax": c}, c


def colour_text(value: str, c: float, clip_percentile: float, signed: bool) -> str:
    """The colour bar's label, e.g. ``H_ij, linear, -0.2 to 0.2 (clipped at the 98th pct of |H_ij|)``."""
    rng = f"-{c:.2g} to {c:.2g}" if signed else f"0 to {c:.2g}"
    shown = value if signed else f"|{value}|"
    return f"{shown}, linear, {rng}\n(clipped at the {clip_percentile:g}th percentile of |{value}|)"


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    out: list[str] = []
    for para in text.split("\n"):
        out += textwrap.wrap(para, width, break_on_hyphens=False) or [""]
    return out


def fit_title(
    fig,
    text: str,
    ax=None,
    fontsize: float = 9.0,
    max_lines: int = MAX_TITLE_LINES,
    min_fontsize: float = 5.0,
):
    """Set ``text`` as ``ax``'s title (``ax=None``: the figure's suptitle), wrapped at word boundaries into at
    most ``max_lines`` lines no wider than the axes (or the figure), shrinking the font as needed (measured)."""
    renderer = fig.canvas.get_renderer()
    width_px = (ax.get_window_extent(renderer).width if ax is not None else fig.bbox.width) * 0.97
    setter = ax.set_title if ax is not None else fig.suptitle
    size = fontsize
    while True:
        chars = max(12, int(width_px / (0.5 * size * fig.dpi / 72)))
        while True:
            lines = _wrap(text, chars)
            title = setter("\n".join(lines), fontsize=size)
            fits = title.get_window_extent(renderer).width <= width_px
            if fits or chars <= 12:
                break
            chars = int(chars * 0.92)
        if fits and len(lines) <= max_lines:
            return title
        if size <= min_fontsize:
            if "\n" not in text:
                return title
            text, size = (
                "; ".join(p.strip() for p in text.split("\n")),
                fontsize,
            )  # paragraphs run on
            continue
        size -= 0.5


def layout_problems(fig, tolerance_in: float = 0.01) -> list[str]:
    """What is wrong with a figure's layout: its tight bounding box (everything drawn) leaves the canvas, a
    title has more than :data:`MAX_TITLE_LINES` lines, a legend inside an axes covers a bar. Empty when fine."""
    from matplotlib.legend import Legend
    from matplotlib.patches import Rectangle

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    problems = []
    tight, (w, h) = fig.get_tightbbox(renderer), fig.get_size_inches()
    if (
        tight.x0 < -tolerance_in
        or tight.y0 < -tolerance_in
        or tight.x1 > w + tolerance_in
        or tight.y1 > h + tolerance_in
    ):
        problems.append(
            f"drawn text or artists leave the canvas: tight box {tuple(round(v, 2) for v in tight.extents)}, canvas {w:.2f} x {h:.2f} in"
        )
    titles = [fig._suptitle] if getattr(fig, "_suptitle", None) is not None else []
    titles += [ax.title for ax in fig.axes]
    for t in titles:
        if t.get_text().count("\n") + 1 > MAX_TITLE_LINES:
            problems.append(
                f"title {t.get_text()[:40]!r} has {t.get_text().count(chr(10)) + 1} lines"
            )
    for ax in fig.axes:
        legend = ax.get_legend()
        if not isinstance(legend, Legend):
            continue
        lb = legend.get_window_extent(renderer)
        for p in ax.patches:
            if (
                isinstance(p, Rectangle)
                and p.get_height() != 0
                and p.get_width() != 0
                and p.get_window_extent(renderer).overlaps(lb)
            ):
                problems.append(f"the legend of axes {ax.get_title()[:30]!r} covers a bar")
                break
    return problems


def _save(fig, path_stem: str | Path) -> list[Path]:
    """Write ``fig`` to ``<path_stem>.pdf`` and ``.png`` (each atomically, or staged with the rest of the result:
    :func:`lib.app.results.atomic_write_bytes`), close it, return the paths."""
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


def _integer_ticks(ax) -> None:
    """Entry indices: integer ticks only (a 4 x 4 matrix gets 0..3, not 0.5 steps)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def heatmap(
    matrix: torch.Tensor,
    path_stem: str | Path,
    title: str,
    boundaries: Sequence[int] = (),
    clip_percentile: float = 98.0,
    slice_labels: Sequence[str] = (),
    axis_labels: tuple[str, str] = ("entry index j", "entry index i"),
    value: str = "H_ij",
    signed: bool = True,
) -> list[Path]:
    """Save ``matrix`` as a heatmap (:func:`colour_scale`: signed on ``[-c, c]`` by default, ``|matrix|`` with
    ``signed=False``), ``c`` its ``clip_percentile`` percentile of absolute values, stated on the colour bar.

    Axes: ``axis_labels`` (x, y); the colour bar names ``value``. ``boundaries``: flat offsets where a new
    parameter slice starts (thin grey lines); ``slice_labels`` (one per slice): at the slice centres on the top
    and right axes. Writes ``<path_stem>.pdf`` and ``<path_stem>.png``; returns their paths.
    """
    plt = _pyplot()
    a, scale, c = colour_scale(matrix, signed, clip_percentile)
    square = a.ndim == 2 and a.shape[0] == a.shape[-1]
    labelled = square and len(slice_labels) == len(boundaries) + 1 and len(slice_labels) > 1
    fig, ax = plt.subplots(
        figsize=(7.0, 6.6) if labelled else (6.4, 5.8) if square else (8, 4.4), layout="constrained"
    )
    im = ax.imshow(
        a.numpy(), interpolation="nearest", aspect="equal" if square else "auto", **scale
    )
    for b in boundaries:
        ax.axhline(b - 0.5, color="0.4", lw=0.4, alpha=0.7)
        ax.axvline(b - 0.5, color="0.4", lw=0.4, alpha=0.7)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    _integer_ticks(ax)
    if labelled:
        _label_slices(ax, boundaries, a.shape[0], slice_labels)
    cb = fig.colorbar(im, ax=ax, pad=0.02, shrink=0.9)
    cb.set_label(colour_text(value, c, clip_percentile, signed), fontsize=8)
    fit_title(fig, title)
    return _save(fig, path_stem)


def slice_mass(
    mass: torch.Tensor, labels: Sequence[str], path_stem: str | Path, title: str
) -> list[Path]:
    """The ``(P, P)`` matrix of shares of ``||H||_F^2`` per slice pair (:func:`lib.hessian.diagonality.slice_mass`), log
    colour scale, values written in the cells when ``P <= 12``."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    m = mass.detach().to(torch.float64).cpu()
    p = m.shape[0]
    positive = m[m > 0]
    lo = float(positive.min()) if positive.numel() else 1e-12
    fig, ax = plt.subplots(
        figsize=(min(10.0, 4.2 + 0.3 * p), min(9.0, 3.2 + 0.28 * p)), layout="constrained"
    )
    im = ax.imshow(
        m.clamp_min(lo).numpy(),
        cmap="magma",
        norm=LogNorm(vmin=max(lo, float(m.max()) * 1e-8), vmax=float(m.max())),
        interpolation="nearest",
    )
    size = max(3.5, min(8.0, 160 / p))
    ax.set_xticks(range(p), labels=list(labels), rotation=90, fontsize=size)
    ax.set_yticks(range(p), labels=list(labels), fontsize=size)
    if p <= 12:
        for i in range(p):
            for j in range(p):
                ax.text(
                    j,
                    i,
                    f"{float(m[i, j]):.2g}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if m[i, j] < m.max() / 10 else "black",
                )
    fig.colorbar(im, ax=ax, label=r"share of $\|H\|_F^2$ (log scale)")
    fit_title(fig, title)
    return _save(fig, path_stem)


REL_TO_FULL = r"$\|H^{b} - H^{B}\|_F \,/\, \|H^{B}\|_F$"
REL_CONSECUTIVE = r"$\|H^{b_i} - H^{b_{i-1}}\|_F \,/\, \|H^{b_i}\|_F$"


def batch_study_figure(
    block: dict,
    kept: dict[int, torch.Tensor],
    path_stem: str | Path,
    title: str,
    clip_percentile: float = 98.0,
    signed: bool = True,
) -> list[Path]:
    """The batch-size study (report Fig. 2): both relative errors against ``b`` (log-log), then ``H^b`` at the kept
    ``b``, each panel on its own colour scale (:func:`colour_scale`)."""
    plt = _pyplot()
    n = 1 + len(kept)
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 4.4), squeeze=False, layout="constrained")
    ax = axes[0][0]
    b = block["b"]
    for key, label in (("rel_to_full", REL_TO_FULL), ("rel_consecutive", REL_CONSECUTIVE)):
        pts = [(x, v) for x, v in zip(b, block[key]) if v is not None and v == v and v > 0]
        if pts:
            ax.loglog(*zip(*pts), marker=".", ms=3, label=label)
    ax.set_xlabel("b (samples)", fontsize=10)
    ax.set_ylabel("relative Frobenius norm", fontsize=10)
    ax.tick_params(labelsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    what = "H^b" if signed else "|H^b|"
    for ax, (bk, h) in zip(axes[0][1:], kept.items()):
        _panel(
            fig,
            ax,
            h,
            f"{what}, b = {bk}" + (" (full batch)" if bk == b[-1] else ""),
            ("entry index j", "entry index i"),
            clip_percentile,
            signed,
        )
    scale = "signed, symmetric limits" if signed else "|value|, linear from 0"
    fit_title(
        fig, f"{title}\n(heatmaps: {scale}, each clipped at its {clip_percentile:g}th percentile)"
    )
    return _save(fig, path_stem)


def convergence(
    curves: dict[str, dict[str, Sequence[float]]],
    path_stem: str | Path,
    title: str,
    references: dict[str, dict[str, float]] | None = None,
) -> list[Path]:
    """Log-log curves against the probe count ``k``: ``curves[estimator][metric] = values``.

    The values are for ``k = 1..K`` unless ``curves[estimator]["k"]`` gives the ``k`` of each value.
    ``references[label][metric]``: a ``k``-independent value drawn as a dashed horizontal line. NaN or
    non-positive values are left out (log axes).
    """
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    metrics = list(
        dict.fromkeys(
            [m for c in curves.values() for m in c if m != "k"]
            + [m for r in (references or {}).values() for m in r]
        )
    )
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(5.2 * len(metrics), 4.4), squeeze=False, layout="constrained"
    )
    for ax, metric in zip(axes[0], metrics):
        for est, c in curves.items():
            values = list(c.get(metric, []))
            ks = list(c["k"]) if "k" in c else list(range(1, len(values) + 1))
            pts = [(k, v) for k, v in zip(ks, values) if v == v and v > 0]
            if pts:
                ax.loglog(*zip(*pts), label=est)
        for j, (label, ref) in enumerate((references or {}).items()):
            if metric in ref and ref[metric] == ref[metric] and ref[metric] > 0:
                ax.axhline(
                    ref[metric],
                    ls="--",
                    lw=1,
                    color=f"C{len(curves) + j}",
                    label=f"{label} (no probes)",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(
            NullFormatter()
        )  # less than a decade would label every minor tick
        ax.set_xlabel("k (Hessian-vector products per sample)")
        ax.set_ylabel(metric)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fit_title(fig, title, fontsize=10)
    return _save(fig, path_stem)


def _panel(
    fig,
    ax,
    matrix: torch.Tensor,
    title: str,
    axis_labels: tuple[str, str],
    clip_percentile: float,
    signed: bool = True,
) -> None:
    """One small heatmap (:func:`colour_scale`, clipped at its own ``clip_percentile``) with its own colour bar."""
    a, scale, _ = colour_scale(matrix, signed, clip_percentile)
    a = a if a.ndim == 2 else a.reshape(1, -1)
    im = ax.imshow(a.numpy(), interpolation="nearest", aspect="auto", **scale)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(axis_labels[0], fontsize=8)
    ax.set_ylabel(axis_labels[1], fontsize=8)
    ax.tick_params(labelsize=7)
    _integer_ticks(ax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)


def heatmap_grid(
    panels: Sequence[tuple[str, torch.Tensor]],
    path_stem: str | Path,
    title: str,
    ncols: int = 6,
    clip_percentile: float = 98.0,
    signed: bool = True,
) -> list[Path]:
    """Several heatmaps (:func:`colour_scale`, each clipped at its own ``clip_percentile``) in one figure.

    ``panels``: ``(title, matrix)`` pairs, laid out row-major in ``ncols`` columns. Writes
    ``<path_stem>.pdf`` and ``<path_stem>.png``; returns their paths.
    """
    plt = _pyplot()
    ncols = max(1, min(ncols, len(panels)))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.4 * ncols, 3.2 * nrows + 0.8), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (label, matrix) in zip(axes.flat, panels):
        _panel(fig, ax, matrix, label, ("column", "row"), clip_percentile, signed)
    scale = "signed, symmetric limits" if signed else "|value|, linear from 0"
    fit_title(
        fig, f"{title}\n({scale}, each panel clipped at its {clip_percentile:g}th percentile)"
    )
    return _save(fig, path_stem)


COMPARISON_METRICS = (
    ("rel_frobenius_scaled", "rel. Frobenius error\n(best scale)"),
    ("cosine", "cosine"),
    ("top_k_overlap", "top-k eigvec overlap"),
    ("pred_vs_exact_corr", "corr(dAd, dHd)"),
    ("pred_vs_measured_even_corr", "corr(dAd, measured\nsecond-order part)"),
)


def comparison_figure(
    matrices: dict[str, torch.Tensor],
    metrics: dict[str, dict[str, float]],
    path_stem: str | Path,
    title: str,
    clip_percentile: float = 98.0,
    signed: bool = True,
) -> list[Path]:
    """Exact Hessian and its approximations side by side, and a bar chart of the comparison metrics.

    ``matrices``: ``{"exact": H, approx: A}``; each ``A`` is shown as ``best_scale * A`` (the proxies are defined
    up to a scale) on the exact Hessian's colour scale (:func:`colour_scale` of ``H``).
    ``metrics[approx]``: :func:`lib.hessian.curvature.compare_matrices`. The legend sits right of the bars.
    Writes ``<path_stem>.pdf`` / ``.png``.
    """
    plt = _pyplot()
    import numpy as np

    names = list(matrices)
    _, scale, c = colour_scale(matrices["exact"], signed, clip_percentile)
    fig = plt.figure(figsize=(2.5 * len(names) + 1.6, 6.4), layout="constrained")
    grid = fig.add_gridspec(2, len(names), height_ratios=[1.0, 1.0])
    im = None
    heat_axes = []
    for j, name in enumerate(names):
        ax = fig.add_subplot(grid[0, j])
        factor = 1.0 if name == "exact" else metrics[name]["best_scale"]
        a = factor * matrices[name].detach().to(torch.float64).cpu()
        im = ax.imshow((a if signed else a.abs()).numpy(), interpolation="nearest", **scale)
        ax.set_title(name if name == "exact" else f"{name} x {factor:.3g}", fontsize=8)
        ax.tick_params(labelsize=6)
        heat_axes.append(ax)
    value = "H_ij and best_scale * A_ij" if signed else "|H_ij| and |best_scale * A_ij|"
    cb = fig.colorbar(im, ax=heat_axes, fraction=0.02, pad=0.01)
    cb.ax.tick_params(labelsize=6)
    cb.set_label(f"{'signed' if signed else 'abs'}, clipped at {c:.2g}", fontsize=7)
    keys = [(k, label) for k, label in COMPARISON_METRICS if any(k in m for m in metrics.values())]
    bars = list(metrics)
    ax = fig.add_subplot(grid[1, :])
    width = 0.8 / max(1, len(bars))
    x = np.arange(len(keys))
    for i, name in enumerate(bars):
        vals = [metrics[name].get(k, float("nan")) for k, _ in keys]
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, vals, width, label=name, color=f"C{i}")
    ax.set_xticks(x, [label for _, label in keys], fontsize=8)
    ax.axhline(0, color="black", lw=0.5)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0.0)
    ax.grid(True, axis="y", alpha=0.3)
    fit_title(
        fig,
        f"{title}\n{value} on the exact Hessian's colour scale ({clip_percentile:g}th percentile of |H|)",
    )
    return _save(fig, path_stem)


def density_figure(
    grid: torch.Tensor,
    values: torch.Tensor,
    marks: Sequence[float],
    path_stem: str | Path,
    title: str,
    label: str = "SLQ density",
    marks_label: str = "extreme eigenvalues",
) -> list[Path]:
    """A spectral density (``values`` on ``grid``) on a log axis, with the eigenvalues ``marks`` as dashed lines
    (``<path_stem>.pdf/.png``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.4), layout="constrained")
    ax.semilogy(
        grid.numpy(), values.to(torch.float64).clamp_min(1e-300).numpy(), lw=1.2, label=label
    )
    for j, lam in enumerate(marks):
        ax.axvline(lam, color="C3", ls="--", lw=0.8, label=marks_label if j == 0 else None)
    floor = float(values.max()) * 1e-8
    ax.set_ylim(bottom=max(floor, 1e-300))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.legend(fontsize=8)
    fit_title(fig, title)
    return _save(fig, path_stem)
