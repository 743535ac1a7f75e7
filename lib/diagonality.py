"""How close a Hessian is to diagonal (the report's "approximately diagonal"), as numbers.

All functions are pure, over a dense symmetric ``H`` of shape ``(n, n)``:

* ``offdiag_ratio(H) = ||H - diag(H)||_F / ||H||_F``;
* ``diag_share(H) = sum_i H_ii^2 / ||H||_F^2`` (so ``diag_share + offdiag_ratio^2 = 1``);
* ``slice_mass(H, sizes)[p, q] = ||H[S_p, S_q]||_F^2 / ||H||_F^2`` for consecutive slices ``S_p`` of the
  given sizes (e.g. one per layer x block): a ``(P, P)`` matrix summing to 1 whose diagonal is the share
  of the block-diagonal part.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def _fro2(h: torch.Tensor) -> float:
    return float(h.to(torch.float64).pow(2).sum())


def offdiag_ratio(h: torch.Tensor) -> float:
    """``||H - diag(H)||_F / ||H||_F`` (0 for a zero matrix)."""
    total = _fro2(h)
    off = total - _fro2(torch.diagonal(h))
    return (max(off, 0.0) / total) ** 0.5 if total > 0 else 0.0


def diag_share(h: torch.Tensor) -> float:
    """Share of ``||H||_F^2`` on the diagonal, ``sum_i H_ii^2 / ||H||_F^2`` (1 for a zero matrix)."""
    total = _fro2(h)
    return _fro2(torch.diagonal(h)) / total if total > 0 else 1.0


def slice_mass(h: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """``(P, P)`` float64 matrix of ``||H[S_p, S_q]||_F^2 / ||H||_F^2`` for consecutive slices of ``sizes``."""
    if sum(sizes) != h.shape[0] or h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"slice sizes {list(sizes)} do not tile a square matrix of shape {tuple(h.shape)}")
    sq = h.detach().to(torch.float64).cpu().pow(2)
    edges = torch.tensor([0, *sizes]).cumsum(0).tolist()
    m = torch.tensor([[float(sq[a:b, c:d].sum()) for c, d in zip(edges[:-1], edges[1:])] for a, b in zip(edges[:-1], edges[1:])], dtype=torch.float64)
    total = float(m.sum())
    return m / total if total > 0 else m


def summary(h: torch.Tensor, sizes: Sequence[int] = (), labels: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON block ``diagonality``: the two diagonal metrics and, for several slices, the slice-pair mass matrix."""
    out: dict[str, Any] = {"offdiag_fro_ratio": offdiag_ratio(h), "diag_share_fro2": diag_share(h)}
    if len(sizes) > 1:
        m = slice_mass(h, sizes)
        out["slice_labels"] = list(labels)
        out["slice_mass"] = m.tolist()
        out["block_diag_share_fro2"] = float(m.diagonal().sum())
    return out


def one_line(d: dict[str, Any]) -> str:
    """The printed summary of :func:`summary`."""
    text = f"diagonality: ||offdiag||_F/||H||_F = {d['offdiag_fro_ratio']:.3f}, diagonal share of ||H||_F^2 = {d['diag_share_fro2']:.3f}"
    if "block_diag_share_fro2" in d:
        text += f", slice-diagonal blocks' share = {d['block_diag_share_fro2']:.3f}"
    return text



def report(h: torch.Tensor, slices: Sequence[Any], path_stem: Any, title: str) -> tuple[dict[str, Any], list]:
    """:func:`summary` of ``H`` over the subset's ``slices`` (each with ``len`` and ``param_name``), plus, for
    several slices, the slice-mass figure ``<path_stem>_slice_mass.pdf/.png``. Returns ``(summary, figure paths)``."""
    from .plots import slice_label
    from .plots import slice_mass as plot_mass

    labels = [slice_label(s.param_name) for s in slices]
    d = summary(h, [len(s) for s in slices], labels)
    if len(slices) < 2:
        return d, []
    figs = plot_mass(torch.tensor(d["slice_mass"]), labels, f"{path_stem}_slice_mass", f"share of ||H||_F^2 per slice pair; {d['block_diag_share_fro2']:.3f} on the diagonal blocks\n{title}")
    return d, figs
