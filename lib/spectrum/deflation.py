"""Growing a Krylov basis for a deflated trace estimate, while each step pays for itself.

The deflated Hutchinson estimate of ``tr(H)`` (``H`` symmetric ``(n, n)``) with an orthonormal basis ``Q`` ``(n, k)``
and its products ``H Q``::

    tr(H) = tr(Q^T H Q) + E[z'^T H z'],   z' = (I - Q Q^T) z,  z Rademacher

has, per probe, the variance of Hutchinson on ``R = (I - P) H (I - P)`` (``P = Q Q^T``): ``2 (||R||_F^2 -
sum_i R_ii^2)``, dominated by ``2 ||R||_F^2``. Every product ``H q`` of a new basis vector ``q`` (orthonormal to
``Q``) lowers ``||R||_F^2`` by an amount known exactly from the products alone (:func:`frobenius_drop`); for a Lanczos
step it is ``2 beta^2 + alpha^2``. With ``m`` probes the variance of the mean is ``var / m``: one more probe removes
about ``var / m^2`` of it, one more basis vector ``drop / m``. So a step pays while ``drop > var / m``
(:func:`step_pays`): in the regime where the probes needed ``var / t^2`` for a target variance ``t^2`` are within
budget this is ``drop > t^2``, and when the budget caps ``m`` it maximizes the accuracy that budget buys. The idea of
spending part of the products on a low-rank part is Hutch++ (Meyer, Musco, Musco and Woodruff, SOSA 2021); adapting the
split to the measured decay is in the spirit of A-Hutch++ (Persson, Cortinovis and Kressner, SIMAX 2022).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

F64 = torch.float64
MatMat = Callable[[torch.Tensor], torch.Tensor]


def frobenius_drop(q: torch.Tensor, new: torch.Tensor, hnew: torch.Tensor) -> float:
    """``||R_old||_F^2 - ||R_new||_F^2`` when the unit vector ``new`` ``(n,)`` (orthonormal to ``q`` ``(n, k)``) joins
    the basis, ``R = (I - P) H (I - P)``, from the products only (``hnew = H new``)::

        2 ||H new||^2 - 2 ||Q^T H new||^2 - (new . H new)^2  =  2 ||(I - P') H new||^2 + (new . H new)^2  >= 0

    (``P'`` the projector on ``[Q, new]``), since ``||R||_F^2 = ||H||_F^2 - 2 ||H Q||_F^2 + ||Q^T H Q||_F^2``.

    Args:
        q: ``(n, k)`` orthonormal columns (float64; ``k`` may be 0).
        new: ``(n,)`` a unit vector orthogonal to ``q``.
        hnew: ``(n,)`` its product ``H new``.

    Returns:
        The drop of ``||R||_F^2`` (a float, non-negative up to rounding).
    """
    hn, nw = hnew.to(F64), new.to(F64)
    inner = q.to(F64).T @ hn if q.shape[1] else torch.zeros(0, dtype=F64)
    alpha = float(nw @ hn)
    return 2 * float(hn @ hn) - 2 * float(inner @ inner) - alpha * alpha


def step_pays(drop: float, var: float, have: int, target_var: float, max_total: int) -> bool:
    """Whether one more basis vector (one product) lowers the variance of the trace's mean more than one more probe.

    With per-probe variance ``var`` the estimate ends with ``m = min(var / target_var, max_total)`` probes (at least
    ``have``, those already taken and re-deflated for free); a step lowers the mean's variance by ``drop / m``, a probe
    by about ``var / m^2``: the step pays when ``drop > var / m``. No step when ``var <= 0``, when the probes in hand
    already reach ``target_var`` (``var / have <= target_var``) or when no budget is left (``max_total <= have``).

    Args:
        drop: the per-probe variance the step is expected to remove (``2 x`` the last :func:`frobenius_drop`).
        var: the current per-probe variance.
        have: probes already taken.
        target_var: the target variance of the mean, ``(rel x |trace|)^2`` (0: no target, the budget decides).
        max_total: the most probes the estimate may take, after the steps taken so far.

    Returns:
        True when the step pays.
    """
    if not var > 0 or max_total <= have or max_total < 1:
        return False
    needed = var / target_var if target_var > 0 else float("inf")
    if needed <= have:
        return False
    m = min(needed, max_total)
    return drop > var / m


def extend_basis(
    matmat: MatMat, q: torch.Tensor, hq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """One Krylov step beyond ``q`` (``(n, k)``, orthonormal, its last column the newest Krylov vector) with ``H q``:
    the next vector ``(I - P) H q_k`` normalized (twice orthogonalized), its product, and the drop of ``||R||_F^2``
    (:func:`frobenius_drop`). ``None`` on breakdown (``span(q)`` invariant under ``H``: nothing left to deflate).

    Args:
        matmat: ``V`` ``(n, p)`` -> ``H V``.
        q: ``(n, k)`` orthonormal basis, ``k >= 1``.
        hq: ``(n, k)`` ``H q``.

    Returns:
        ``(q', hq', drop)`` with ``q'`` ``(n, k + 1)``, or ``None``.
    """
    r = hq[:, -1].to(F64)
    for _ in range(2):
        r = r - q @ (q.T @ r)
    beta = float(r.norm())
    if not beta > 1e-12 * max(float(hq[:, -1].norm()), 1e-300):
        return None
    new = (r / beta).to(q.dtype)
    hnew = matmat(new[:, None])[:, 0].to(hq.dtype)
    drop = frobenius_drop(q, new, hnew)
    return torch.cat([q, new[:, None]], 1), torch.cat([hq, hnew[:, None]], 1), drop


def last_step_drop(q: torch.Tensor, hq: torch.Tensor) -> float:
    """The drop of ``||R||_F^2`` the last column of ``q`` brought (:func:`frobenius_drop` of it against the others).

    Args:
        q: ``(n, k)`` orthonormal basis, ``k >= 1``.
        hq: ``(n, k)`` ``H q``.

    Returns:
        The drop (a float).
    """
    return frobenius_drop(q[:, :-1], q[:, -1], hq[:, -1])


def grow_for_trace(
    matmat: MatMat,
    q: torch.Tensor,
    hq: torch.Tensor,
    var: float,
    have: int,
    target_var: float,
    max_total: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Extend ``q`` by Krylov steps while each pays (:func:`step_pays`), for a deflated trace estimate.

    Each step's expected variance drop is the last step's ``2 x drop`` (the drops of a Krylov sequence decay
    slowly), and ``var`` falls by each step's measured ``2 x drop``; every step is one product and comes out of
    ``max_total``.

    Args:
        matmat: ``V`` ``(n, p)`` -> ``H V``.
        q: ``(n, k)`` orthonormal Krylov basis (``k >= 1``), e.g. a Lanczos run's.
        hq: ``(n, k)`` ``H q``.
        var: the per-probe variance of the deflated samples with ``q`` (e.g. the sample variance of probes in hand).
        have: probes in hand (re-deflated with the grown basis without a product).
        target_var: the target variance of the trace's mean (0: none).
        max_total: the most products for the probes and the steps together.

    Returns:
        ``(q', hq', steps)``: the grown basis, its products and the number of steps taken.
    """
    steps = 0
    drop = 2 * last_step_drop(q, hq)
    n = q.shape[0]
    while q.shape[1] < n and step_pays(drop, var, have, target_var, max_total - steps - 1):
        grown = extend_basis(matmat, q, hq)
        if grown is None:
            break
        q, hq, d = grown
        steps += 1
        drop = 2 * d
        var -= drop
    return q, hq, steps
