"""The exact scripts' extra outputs (application layer): the files and figures of the curvature comparison
(:func:`lib.hessian.curvature.compare`), the batch-size study (:func:`lib.hessian.batch_study.batch_study`) and the diagonality
summary (:func:`lib.hessian.diagonality.summary`). The compute modules return results; this module writes them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..hessian import batch_study, curvature, diagonality
from ..hessian.exact import HessianResult
from .plots import batch_study_figure, comparison_figure, slice_label
from .plots import slice_mass as plot_mass
from .results import atomic_write_bytes


def write_comparison(
    out_dir: Path,
    name: str,
    job: curvature.CurvatureJob,
    sums: dict[str, torch.Tensor],
    result: HessianResult,
    title: str,
    top_k: int = 8,
) -> dict[str, Any]:
    """Write ``<name>_compare.pt`` (``{"exact": H, approx: matrix}`` in the Hessian's dtype) and its figure.

    Returns the JSON additions: ``{"comparison": {approx: metrics}, "comparison_details": {...}}``.
    """
    c = curvature.compare(job, sums, result, top_k)
    out_dir.mkdir(parents=True, exist_ok=True)
    pt = out_dir / f"{name}_compare.pt"
    atomic_write_bytes(
        pt,
        lambda p: torch.save({k: v.to(result.hessian.dtype) for k, v in c.matrices.items()}, p),
    )
    figures = comparison_figure(c.matrices, c.metrics, out_dir / f"{name}_compare", title)
    first = ("fisher_samples", "perturbations", "perturbation_step")
    details = {
        **{k: c.details[k] for k in first},
        "file": pt.name,
        "figures": [p.name for p in figures],
        **{k: v for k, v in c.details.items() if k not in first},
    }
    return {"comparison": c.metrics, "comparison_details": details}


def write_batch_study(
    snapshots: dict[int, dict[str, torch.Tensor]],
    model_input_bs: int,
    seqlen: int,
    out: Path,
    name: str,
    title: str,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """``<name>_batch_study.pt`` (``{"b": [...], "hessian": {b: H^b}}`` at :func:`lib.hessian.batch_study.kept_sizes`) and
    the figures. Returns ``{"batch_study": {...}, "files": [...]}`` for the run's JSON."""
    s = batch_study.batch_study(snapshots, model_input_bs, seqlen, dtype)
    pt = out / f"{name}_batch_study.pt"
    atomic_write_bytes(
        pt,
        lambda p: torch.save(
            {
                "b": list(s.kept),
                "hessian": s.kept,
                "normalization": "H^b: Hessian of the mean next-token NLL over the first b samples",
            },
            p,
        ),
    )
    block = {"b": s.b, "rel_to_full": s.rel_to_full, "rel_consecutive": s.rel_consecutive}
    figures = batch_study_figure(block, s.kept, out / f"{name}_batch_study", title)
    return {"batch_study": s.as_json(), "files": [pt.name, *(p.name for p in figures)]}


def diagonality_report(
    h: torch.Tensor, slices: Sequence[Any], path_stem: Any, title: str
) -> tuple[dict[str, Any], list]:
    """:func:`lib.hessian.diagonality.summary` of ``H`` over the subset's ``slices`` (each with ``len`` and ``param_name``),
    plus, for several slices, the slice-mass figure ``<path_stem>_slice_mass.pdf/.png``. Returns
    ``(summary, figure paths)``."""
    labels = [slice_label(s.param_name) for s in slices]
    d = diagonality.summary(h, [len(s) for s in slices], labels, [s.param_name for s in slices])
    if len(slices) < 2:
        return d, []
    figs = plot_mass(
        torch.tensor(d["slice_mass"]),
        labels,
        f"{path_stem}_slice_mass",
        diagonality.slice_mass_title(d, title),
    )
    return d, figs
