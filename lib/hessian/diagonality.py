"""How close a Hessian is to diagonal (the report's "approximately diagonal"), as numbers.

All functions are pure, over a dense symmetric ``H`` of shape ``(n, n)``:

* ``offdiag_ratio(H) = ||H - diag(H)||_F / ||H||_F``;
* ``diag_share(H) = sum_i H_ii^2 / ||H||_F^2`` (so ``diag_share + offdiag_ratio^2 = 1``);
* ``slice_mass(H, sizes)[p, q] = ||H[S_p, S_q]||_F^2 / ||H||_F^2`` for consecutive slices ``S_p`` of the
  given sizes (e.g. one per layer x block): a ``(P, P)`` matrix summing to 1 whose diagonal is the share
  of the block-diagonal part;
* ``group_share(M, keys)``: the share of ``||H||_F^2`` in slice pairs ``(p, q)`` with ``keys[p] == keys[q]``, e.g. the
  same transformer block (``same_block_share``) or the same layer type (``same_layer_share``);
* ``pair_shares(M, keys)``: the share of each unordered pair of keys, ``M[p, q] + M[q, p]`` summed over slices,
  e.g. ``{"k_proj x q_proj": 0.66, ...}`` for the attention cross terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
        raise ValueError(
            f"slice sizes {list(sizes)} do not tile a square matrix of shape {tuple(h.shape)}"
        )
    sq = h.detach().to(torch.float64).cpu().pow(2)
    edges = torch.tensor([0, *sizes]).cumsum(0).tolist()
    m = torch.tensor(
        [
            [float(sq[a:b, c:d].sum()) for c, d in zip(edges[:-1], edges[1:])]
            for a, b in zip(edges[:-1], edges[1:])
        ],
        dtype=torch.float64,
    )
    total = float(m.sum())
    return m / total if total > 0 else m


def slice_keys(param_name: str) -> tuple[str | None, str]:
    """``(block, layer)`` of a parameter slice: ``model.decoder.layers.3.self_attn.q_proj.weight`` -> ``("3", "q_proj")``;
    ``block`` is ``None`` for a parameter outside the numbered blocks (e.g. ``lm_head.weight`` -> ``(None, "lm_head")``)."""
    parts = [p for p in param_name.split(".") if p not in ("weight", "bias")]
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    block = parts[digits[-1]] if digits else None
    layer = parts[-1] if parts and (not digits or digits[-1] < len(parts) - 1) else param_name
    return block, layer


def group_share(mass: torch.Tensor, keys: Sequence[Any]) -> float:
    """Share of ``||H||_F^2`` in the slice pairs ``(p, q)`` with ``keys[p] == keys[q]`` (``mass``: :func:`slice_mass`)."""
    same = torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.bool)
    return float(mass[same].sum())


def pair_shares(mass: torch.Tensor, keys: Sequence[str]) -> dict[str, float]:
    """``{"a x b": share}`` over unordered key pairs (``a <= b``), largest first; ``a x a`` is the same-key share."""
    out: dict[str, float] = {}
    for p, a in enumerate(keys):
        for q, b in enumerate(keys):
            name = " x ".join(sorted((a, b)))
            out[name] = out.get(name, 0.0) + float(mass[p, q])
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def summary(
    h: torch.Tensor,
    sizes: Sequence[int] = (),
    labels: Sequence[str] = (),
    names: Sequence[str] = (),
) -> dict[str, Any]:
    """The JSON block ``diagonality``: the two diagonal metrics and, for several slices, the slice-pair mass matrix
    with its per-slice share (``block_diag_share_fro2``: the slice-diagonal squares); given the slices' parameter
    ``names``, also the same-block and same-layer-type shares and the share of each layer-type pair."""
    out: dict[str, Any] = {"offdiag_fro_ratio": offdiag_ratio(h), "diag_share_fro2": diag_share(h)}
    if len(sizes) > 1:
        m = slice_mass(h, sizes)
        out["slice_labels"] = list(labels)
        out["slice_mass"] = m.tolist()
        out["block_diag_share_fro2"] = float(m.diagonal().sum())
        if names:
            blocks, layers = zip(*(slice_keys(n) for n in names))
            if len(set(blocks)) > 1:
                out["same_block_share_fro2"] = group_share(m, blocks)
            if len(set(layers)) > 1:
                out["same_layer_type_share_fro2"] = group_share(m, layers)
                out["layer_type_pair_share_fro2"] = pair_shares(m, layers)
    return out


def one_line(d: dict[str, Any]) -> str:
    """The printed summary of :func:`summary`."""
    text = f"diagonality: ||offdiag||_F/||H||_F = {d['offdiag_fro_ratio']:.3f}, diagonal share of ||H||_F^2 = {d['diag_share_fro2']:.3f}"
    if "block_diag_share_fro2" in d:
        text += f"; share in same-slice squares {d['block_diag_share_fro2']:.3f}"
    if "same_block_share_fro2" in d:
        text += f", same-block squares {d['same_block_share_fro2']:.3f}"
    if "same_layer_type_share_fro2" in d:
        text += f", same-layer-type squares {d['same_layer_type_share_fro2']:.3f}"
        cross = [
            (k, v)
            for k, v in d["layer_type_pair_share_fro2"].items()
            if len(set(k.split(" x "))) == 2
        ][:2]
        if cross:
            text += "; largest cross-layer pairs " + ", ".join(f"{k} {v:.3f}" for k, v in cross)
    return text


def slice_mass_title(d: dict[str, Any], title: str) -> str:
    """The slice-mass figure's title: the shares of :func:`summary`, then ``title``."""
    shares = f"{d['block_diag_share_fro2']:.3f} in same-slice squares"
    if "same_block_share_fro2" in d:
        shares += f", {d['same_block_share_fro2']:.3f} in same-block squares"
    return rf"share of $\|H\|_F^2$ per slice pair: {shares}" + f"\n{title}"
