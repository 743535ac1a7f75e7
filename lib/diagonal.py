"""Diagonal of the Hessian of the mean next-token NLL for whole weights: estimators and the additive job.

For a weight ``W`` with ``n`` entries (``x = W.reshape(-1)``), ``b`` samples ``X_s`` and the summed NLL
``f(x; X_s)`` of :mod:`lib.loss`, the target is

    diag(H) / (b * (seqlen - 1)),        H = sum_s H_s,  H_s = d^2 f(x; X_s) / dx^2  at x0,

the diagonal of the Hessian of the *mean* next-token NLL (the normalization of :mod:`lib.hessian`),
returned with ``W``'s own shape. Everything below is linear in ``H``, so each sample's Hessian-vector
products (HVPs) are computed on its own gradient graph and summed: ``z * (H z) = sum_s z * (H_s z)`` with
the *same* probe ``z`` for every sample. Probe ``j`` of parameter ``p`` is drawn from a generator seeded
by ``sha256(f"{seed}/{p}/{j}")``, on the CPU, so it does not depend on the sample, worker or device.

Estimators (``ESTIMATORS``); ``K`` = ``--vhp_samples`` = HVPs per sample:

* ``hutchinson`` -- ``(1/K) sum_j z_j * (H z_j)`` with Rademacher ``z_j`` (i.i.d. +-1 entries), unbiased;
  ``E ||est - diag||^2 = (1/K) sum_{i != j} H_ij^2`` exactly (Hutchinson 1989; Bekas, Kokiopoulou &
  Saad 2007, "An estimator for the diagonal of a matrix", Appl. Numer. Math. 57).
* ``xdiag`` -- XDiag (Epperly, Tropp & Webber 2024, "XTrace: making the most of every sample in stochastic
  trace estimation", SIAM J. Matrix Anal. Appl. 45(1), Sec. 2.4), unbiased: with ``s = K/2`` Rademacher
  ``Omega = [w_1..w_s]``, ``Y = H Omega = QR`` and ``Q_i`` an orthonormal basis of ``H Omega`` without column
  ``i``, it averages over ``i`` the estimates ``diag(Q_i Q_i^T H) + w_i * ((I - Q_i Q_i^T) H w_i)``: the low-rank
  part is exact and each probe is used both to build the basis and, left out of it, to correct it
  (see :func:`xdiag_estimate` for the closed form). It costs ``s`` HVPs for ``Y`` and ``s`` for ``Z = H Q``.
* ``fisher`` -- the empirical Fisher diagonal ``(1/(b (seqlen-1))) sum_s (grad f(x; X_s))^2`` from
  per-sample gradients (what the original calls 'Fisher'): not an estimate of ``diag(H)``, a baseline;
  it equals the Fisher information (hence the Hessian's expectation) only for a model that generated
  the data. Its cost is one gradient per sample.
* ``ggn`` -- Hutchinson on the generalized Gauss-Newton matrix ``G = sum_t J_t^T (diag p_t - p_t p_t^T) J_t``
  (:class:`lib.curvature.GGNOperator`): ``(1/K) sum_j z_j * (G z_j)`` with the Hutchinson probes, an unbiased
  estimate of ``diag(G)`` (not of ``diag(H)``: ``H = G +`` the terms with the network's second derivatives).
  Each product is one Jacobian-vector and one vector-Jacobian product of the network, no second backward
  through it.
* ``exact`` -- ``(H e_i)_i`` for every unit vector ``e_i``: ``n`` HVPs per sample, for small layers and
  as ground truth (refused above ``EXACT_MAX_ENTRIES``).

Two passes for XDiag. Its second set of products needs ``Q``, which depends on the sum over *all*
samples of the first set, so it is two additive jobs run one after the other: phase 1 sums
``H Omega`` (and everything else: Hutchinson sums, exact entries, Fisher), phase 2 sums ``H Q``.

Convergence study (paper Fig. 3a). ``record`` entries keep the per-probe contributions
``z_j * (H z_j)`` at those entries (a ``(K, m)`` partial sum), so the estimate after every ``k <= K`` can be
formed afterwards; a per-probe record of all ``n`` entries would cost ``K * n`` floats, so the entries are
the tracked rows plus, for the consecutive-difference metric, all entries when ``K * n <= MONITOR_BUDGET``,
else a fixed random subset of ``MONITOR_BUDGET // K`` entries (stated in the output). XDiag's estimate
after its first ``s' <= s`` probes is computed from prefixes of ``Omega, Q, R, Z`` (a QR of the first ``s'``
columns of ``Y`` is the prefix of the QR of ``Y``), so its curve costs no extra HVPs.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .jobs import ModelJob, Partial, derived_seed, run_serial
from .loss import SubsetLoss
from .models import ModelSpec
from .finite_difference import FDSettings, FDStats, KinkMonitor, fd_products, gradient_of
from .operator import ChunkPolicy, gradient_graph
from .subsets import whole_parameter

ESTIMATORS = ("xdiag", "hutchinson", "fisher", "ggn", "exact")
SECOND_ORDER = ("xdiag", "hutchinson", "exact")
EXACT_MAX_ENTRIES = 16384
"""Largest number of entries the ``exact`` method (one HVP per entry and sample) and ``--track_rows`` accept."""
MONITOR_BUDGET = 2**25
"""Most per-probe contributions (probes x entries) recorded for the consecutive-difference metric."""

Progress = Callable[[int], None]


# ----------------------------------------------------------------------------- probes


def probe_seed(seed: int, param_name: str, j: int) -> int:
    """Seed of probe ``j`` of parameter ``param_name``: 63 bits of ``sha256(f"{seed}/{param_name}/{j}")``."""
    return derived_seed(seed, param_name, j)


def rademacher_probes(n: int, seed: int, param_name: str, start: int, stop: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Probes ``start..stop-1`` of ``param_name``, shape ``(stop - start, n)``: i.i.d. +-1 entries, on the CPU."""
    out = torch.empty(stop - start, n, dtype=dtype)
    for r, j in enumerate(range(start, stop)):
        g = torch.Generator().manual_seed(probe_seed(seed, param_name, j))
        out[r] = torch.randint(0, 2, (n,), generator=g).to(dtype).mul_(2).sub_(1)
    return out


# ----------------------------------------------------------------------------- estimator math (pure)


def hutchinson_running(contributions: torch.Tensor) -> torch.Tensor:
    """Running means: row ``k-1`` is the Hutchinson estimate from the first ``k`` rows of ``contributions`` (``(K, m)``)."""
    c = contributions.to(torch.float64)
    return c.cumsum(0) / torch.arange(1, c.shape[0] + 1, dtype=torch.float64)[:, None]


def xdiag_basis(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q, R`` (reduced QR, float64) of the sketch ``Y = H Omega`` given as rows ``y = Y^T`` (``(s, n)``).

    Raises ``ValueError`` if ``Y`` is numerically rank deficient (``H`` of rank below ``s``).
    """
    q, r = torch.linalg.qr(y.to(torch.float64).T)
    d = r.diagonal().abs()
    if not bool(torch.isfinite(r).all()) or (d.numel() > 0 and bool((d <= 1e-12 * d.max()).any())):
        raise ValueError(f"the XDiag sketch H*Omega has rank below {y.shape[0]}: the Hessian's rank is smaller than --vhp_samples/2; use --estimator exact or fewer HVPs")
    return q, r


def xdiag_estimate(omega: torch.Tensor, q: torch.Tensor, z: torch.Tensor, r: torch.Tensor, s: int | None = None) -> torch.Tensor:
    """XDiag estimate of ``diag(H)`` from its first ``s`` probes, on the rows given (any subset of entries).

    ``omega``: ``(m, S)`` Rademacher probes; ``q``: ``(m, S)`` rows of ``Q`` (``H Omega = Q R``); ``z``: ``(m, S)``
    rows of ``Z = H Q``; ``r``: ``(S, S)``. Uses the prefixes ``[:, :s]`` / ``[:s, :s]`` (default ``s = S``),
    which are exactly XDiag with ``s`` probes. Closed form of the average over ``i`` of
    ``diag(Q_i Q_i^T H) + w_i * (I - Q_i Q_i^T) H w_i``: with ``t_i`` the ``i``-th column of ``R^{-T}`` normalized,
    ``Q_i Q_i^T = Q (I - t_i t_i^T) Q^T`` and ``(I - Q_i Q_i^T) H w_i = Q t_i (t_i^T R e_i)``, so

        est = rowsum(Q * Z) + (1/s) sum_i [ -(Q t_i) * (Z t_i) + (t_i^T R e_i) w_i * (Q t_i) ].
    """
    s = r.shape[0] if s is None else s
    om, qs, zs, rs = (a.to(torch.float64) for a in (omega[:, :s], q[:, :s], z[:, :s], r[:s, :s]))
    eye = torch.eye(s, dtype=torch.float64)
    t = torch.linalg.solve_triangular(rs, eye, upper=True).T  # R^{-T}
    t = t / t.norm(dim=0, keepdim=True)
    c = (t * rs).sum(0)  # t_i . R e_i
    qt, zt = qs @ t, zs @ t
    return (qs * zs).sum(1) + ((om * qt * c) - qt * zt).mean(1)


def offdiagonal_error(h: torch.Tensor) -> float:
    """Hutchinson's expected relative error with one probe, ``sqrt(sum_{i != j} H_ij^2) / ||diag H||``.

    With ``k`` probes the root-mean-square relative error is this divided by ``sqrt(k)``.
    """
    h = h.to(torch.float64)
    d = h.diagonal()
    return math.sqrt(max(float((h * h).sum() - (d * d).sum()), 0.0)) / float(d.norm())


def rel_l2(est: torch.Tensor, ref: torch.Tensor) -> float:
    """``||est - ref|| / ||ref||`` (float64)."""
    ref = ref.to(torch.float64)
    return float((est.to(torch.float64) - ref).norm() / ref.norm())


def log_grid(k_max: int, step: int = 1, points: int = 48) -> list[int]:
    """Multiples of ``step`` up to ``k_max``: all of them when few, else about ``points`` log-spaced ones (with the last)."""
    n = k_max // step
    if n <= points:
        return [step * i for i in range(1, n + 1)]
    idx = sorted({max(1, round(math.exp(u))) for u in torch.linspace(0, math.log(n), points).tolist()} | {n})
    return [step * i for i in idx]


# ----------------------------------------------------------------------------- the additive job


@dataclass
class ParamPlan:
    """What to compute for one parameter (``numel`` entries, flat storage order) in each work unit.

    * ``probes``: Rademacher probes ``0..probes-1``; sums ``z * (H z)`` into ``zhz`` (``(n,)``);
    * ``keep``: also returns ``H z_j`` for ``j < keep`` as ``hz`` (``(keep, n)``; XDiag's ``Y^T``);
    * ``record``: flat entries at which each probe's ``z * (H z)`` is kept, ``record`` (``(probes, m)``);
    * ``exact``: flat entries ``i`` whose ``(H e_i)_i`` is computed exactly, ``exact`` (``(len,)``);
    * ``basis``: ``(s, n)`` vectors ``v`` whose ``H v`` is returned as ``hq`` (XDiag's ``Z^T``, phase 2);
    * ``fisher``: the squared per-sample gradient, summed, ``fisher`` (``(n,)``);
    * ``ggn_probes``: Hutchinson probes ``0..ggn_probes-1`` on the GGN; sums ``z * (G z)`` into ``ggn`` (``(n,)``).
    """

    param_name: str
    numel: int
    probes: int = 0
    keep: int = 0
    record: torch.Tensor | None = None
    exact: torch.Tensor | None = None
    basis: torch.Tensor | None = None
    fisher: bool = False
    ggn_probes: int = 0

    @property
    def second_order(self) -> bool:
        return bool(self.probes) or self.exact is not None or self.basis is not None

    def steps(self) -> int:
        """HVPs per sample batch (a gradient counts as one step when there are none)."""
        n = self.probes + (0 if self.exact is None else len(self.exact)) + (0 if self.basis is None else self.basis.shape[0])
        return n + self.ggn_probes or 1

    def config(self) -> dict[str, Any]:
        def digest(t: torch.Tensor | None) -> str | None:
            return None if t is None else hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

        return {
            "param": self.param_name,
            "numel": self.numel,
            "probes": self.probes,
            "keep": self.keep,
            "record": digest(self.record),
            "exact": digest(self.exact),
            "basis": digest(self.basis),
            "basis_shape": None if self.basis is None else list(self.basis.shape),
            "fisher": self.fisher,
            "ggn_probes": self.ggn_probes,
        }


def key(param_name: str, what: str) -> str:
    """Name of a partial sum: ``<param>|<what>``."""
    return f"{param_name}|{what}"


class DiagonalJob(ModelJob):
    """Hessian-diagonal products of whole weights as an additive job (:mod:`lib.jobs`): unit ``k`` = batch ``k``.

    For each :class:`ParamPlan` the batch's forward and ``create_graph`` backward are done once (the
    gradient graph is reused by every product of that parameter), then the plan's products are taken
    ``probe_batch`` at a time (``is_grads_batched``; halved on CUDA out-of-memory). ``run_unit`` returns
    ``{key(param, what): tensor}`` (see :class:`ParamPlan`) and ``nll_sum``. The model is either given
    (``model``) or loaded from ``spec`` in :meth:`setup` (worker processes).
    """

    def __init__(self, plans: Sequence[ParamPlan], samples: torch.Tensor, model_input_bs: int = 1, seed: int = 0, probe_batch: int | None = None, fused_head: bool | None = None, spec: ModelSpec | None = None, model: nn.Module | None = None, phase: str = "1", fd: FDSettings | None = None):
        if model is None and spec is None:
            raise ValueError("give a model or a ModelSpec")
        self.plans, self.samples, self.model_input_bs, self.seed = list(plans), samples, model_input_bs, seed
        self.probe_batch, self.fused_head, self.spec, self.model, self.phase = probe_batch, fused_head, spec, model, phase
        self.fd = fd
        """``None``: exact HVPs; else finite differences of first-order gradients (:mod:`lib.finite_difference`)."""

    def setup(self, device: torch.device) -> None:
        self.ensure_model(device)
        self._policy = ChunkPolicy(self.probe_batch)  # None = measured per weight size on the first batch (lib.autotune)
        self._tokens = self.model_input_bs * self.samples.shape[1]

    def probe_batch_report(self) -> dict[str, Any]:
        """For the JSON: the given ``probe_batch``, or per weight size (entries) the measured choice and timings."""
        return getattr(self, "_policy", ChunkPolicy()).report(self.probe_batch, "probe_batch")

    def _objective(self, param_name: str) -> SubsetLoss:
        """The summed NLL as a function of ``x = W.reshape(-1)`` (built per use: it holds an index of ``n`` entries)."""
        return SubsetLoss(self.model, whole_parameter(self.model, param_name), fused_head=self.fused_head, double_backward=self.fd is None)

    def num_units(self) -> int:
        return -(-self.samples.shape[0] // self.model_input_bs)

    def steps_per_unit(self) -> int:
        return sum(p.steps() for p in self.plans)

    def describe_unit(self, k: int) -> str:
        bs = self.model_input_bs
        return f"sample {k}" if bs == 1 else f"samples {k * bs}..{(k + 1) * bs - 1}"

    def _products(self, g: torch.Tensor, x: torch.Tensor, rows: Callable[[int, int], torch.Tensor], count: int, sink: Callable[[int, torch.Tensor, torch.Tensor], None], progress: Progress | None) -> None:
        """For ``start..stop`` chunks of ``count`` vectors ``v = rows(start, stop)``: ``sink(start, v, H v)``
        (:func:`lib.operator.hvp_products`).

        The chunk is ``probe_batch``, else measured (:class:`lib.operator.ChunkPolicy`) the first time a weight
        of ``x.numel()`` entries has at least ``TUNE_MIN_PRODUCTS`` products; the measured products are kept.
        """
        if self.fd is not None:  # g is None: products from the batch's gradient callable, set by run_unit
            with KinkMonitor(self.model) as monitor:
                for a in range(count):
                    v = rows(a, a + 1).to(device=x.device, dtype=x.dtype)
                    hv, _, stats = fd_products(self._fd_grad, x, v, self.fd, progress, monitor)
                    self._fd_stats.add(stats)
                    sink(a, v, hv.to(x.dtype))
            return
        self._policy.products(g, x, rows, count, sink, self.model, self._tokens, count * self.num_units(), progress)

    def _fisher(self, objective: SubsetLoss, x0: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum over the batch's samples of the squared per-sample gradient, summed NLL of the batch)``."""
        out, nll = torch.zeros_like(x0), torch.zeros((), dtype=x0.dtype, device=x0.device)
        for row in batch:
            x = x0.clone().requires_grad_(True)
            value = objective(x, row[None])
            (g,) = torch.autograd.grad(value, x)
            out += g**2
            nll += value.detach()
        return out, nll

    def _exact(self, g: torch.Tensor, x: torch.Tensor, entries: torch.Tensor, progress: Progress | None) -> torch.Tensor:
        """``(H e_i)_i`` for the flat ``entries`` ``i``."""
        idx, n = entries.to(x.device), x.numel()
        res = torch.empty(len(idx), dtype=x.dtype, device=x.device)

        def unit_rows(a: int, b: int) -> torch.Tensor:
            e = torch.zeros(b - a, n, dtype=x.dtype, device=x.device)
            e[torch.arange(b - a, device=x.device), idx[a:b]] = 1
            return e

        def take(a: int, v: torch.Tensor, hv: torch.Tensor) -> None:
            res[a : a + len(hv)] = hv[torch.arange(len(hv), device=x.device), idx[a : a + len(hv)]]

        self._products(g, x, unit_rows, len(idx), take, progress)
        return res

    def _probes(self, g: torch.Tensor, x: torch.Tensor, plan: ParamPlan, progress: Progress | None) -> Partial:
        """Hutchinson sums ``zhz``, kept products ``hz`` (XDiag's sketch) and per-probe ``record`` of one parameter."""
        n, name = x.numel(), plan.param_name
        zhz = torch.zeros(n, dtype=x.dtype, device=x.device)
        kept = torch.empty(plan.keep, n, dtype=x.dtype, device=x.device) if plan.keep else None
        rec_idx = None if plan.record is None else plan.record.to(x.device)
        rec = None if rec_idx is None else torch.empty(plan.probes, len(rec_idx), dtype=x.dtype, device=x.device)

        def take(a: int, v: torch.Tensor, hv: torch.Tensor) -> None:
            c = v * hv
            zhz.add_(c.sum(0))
            if rec is not None:
                rec[a : a + len(c)] = c[:, rec_idx]
            if kept is not None and a < plan.keep:
                m = min(len(hv), plan.keep - a)
                kept[a : a + m] = hv[:m]

        self._products(g, x, lambda a, b: rademacher_probes(n, self.seed, name, a, b, x.dtype), plan.probes, take, progress)
        out = {key(name, "zhz"): zhz.cpu()}
        if kept is not None:
            out[key(name, "hz")] = kept.cpu()
        if rec is not None:
            out[key(name, "record")] = rec.cpu()
        return out

    def _basis(self, g: torch.Tensor, x: torch.Tensor, basis: torch.Tensor, progress: Progress | None) -> torch.Tensor:
        """``H v`` for the rows ``v`` of ``basis`` (``(s, n)``)."""
        hq = torch.empty(basis.shape[0], x.numel(), dtype=x.dtype, device=x.device)

        def take(a: int, v: torch.Tensor, hv: torch.Tensor) -> None:
            hq[a : a + len(hv)] = hv

        self._products(g, x, lambda a, b: basis[a:b], basis.shape[0], take, progress)
        return hq

    def _ggn_probes(self, objective: SubsetLoss, x0: torch.Tensor, batch: torch.Tensor, probes: int, progress: Progress | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum_j z_j * (G z_j) over the Hutchinson probes j < probes, summed NLL of the batch)``, ``G`` the batch's GGN."""
        from .curvature import GGNOperator

        op = GGNOperator(objective, x0, batch)
        n, name = x0.numel(), objective.subset.slices[0].param_name
        out = torch.zeros_like(x0)
        for j in range(probes):
            z = rademacher_probes(n, self.seed, name, j, j + 1, x0.dtype)[0].to(x0.device)
            out += z * op.matvec(z)
            if progress is not None:
                progress(1)
        return out, op.nll.detach()

    def run_unit(self, k: int, progress: Progress | None = None) -> Partial:
        out: Partial = {}
        nll = None
        for plan in self.plans:
            objective = self._objective(plan.param_name)
            x0 = objective.x0()
            batch = self.samples[k * self.model_input_bs : (k + 1) * self.model_input_bs].to(x0.device)
            name = plan.param_name
            if plan.ggn_probes:
                out[key(name, "ggn")], value = self._ggn_probes(objective, x0, batch, plan.ggn_probes, progress)
                nll = value if nll is None else nll
                if not plan.second_order and not plan.fisher:
                    continue
            if not plan.second_order or (plan.fisher and batch.shape[0] > 1):
                out[key(name, "fisher")], value = self._fisher(objective, x0, batch)
                nll = value if nll is None else nll
                if not plan.second_order:
                    if progress is not None:
                        progress(1)
                    continue
            if self.fd is None:
                x, g, value = gradient_graph(lambda z: objective(z, batch), x0)
            else:  # finite differences: a plain gradient, and the products from the gradient callable (no graph)
                self._fd_grad, self._fd_stats = gradient_of(lambda z: objective(z, batch)), FDStats()
                (x, value), g = (x0, None), None
                if plan.fisher and batch.shape[0] == 1:
                    g, value = self._fd_grad(x0)
                else:
                    with torch.no_grad():
                        value = objective(x0, batch)
            nll = value.detach() if nll is None else nll
            if plan.fisher and batch.shape[0] == 1:
                out[key(name, "fisher")] = g.detach() ** 2  # one sample: its gradient is the graph's
            if plan.exact is not None:
                out[key(name, "exact")] = self._exact(g, x, plan.exact, progress)
            if plan.probes:
                out.update(self._probes(g, x, plan, progress))
            if plan.basis is not None:
                out[key(name, "hq")] = self._basis(g, x, plan.basis, progress)
            if self.fd is not None:
                for what, t in self._fd_stats.as_tensors().items():
                    out[what] = out.get(what, 0) + t
            del g, value, x
        out["nll_sum"] = nll
        return {name: v.detach().cpu() for name, v in out.items()}

    def config(self) -> dict[str, Any]:
        return {
            "kind": "hessian_diagonal",
            "phase": self.phase,
            "plans": [p.config() for p in self.plans],
            "samples_sha256": hashlib.sha256(self.samples.numpy().tobytes()).hexdigest(),
            "samples_shape": list(self.samples.shape),
            "model_input_bs": self.model_input_bs,
            "seed": self.seed,
            "probes": "rademacher, generator seeded by sha256(f'{seed}/{param}/{j}')",
            "fused_head": self.fused_head,
            "model": None if self.spec is None else self.spec.identity(),
            **({} if self.fd is None else {"hvp": self.fd.describe(next(self.model.parameters()).dtype if self.model is not None else getattr(torch, self.spec.dtype))}),
        }


# ----------------------------------------------------------------------------- planning and results


@dataclass
class Target:
    """One weight to estimate: its name, shape, and the flat entries tracked exactly (``tracked``, may be empty)."""

    param_name: str
    shape: tuple[int, ...]
    tracked: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def hvps_per_sample(estimator: str, numel: int, k: int) -> int:
    """HVPs each sample costs for one weight: ``k`` (hutchinson, xdiag), ``numel`` (exact), 0 (fisher: one gradient)."""
    return {"hutchinson": k, "xdiag": 2 * (k // 2), "exact": numel, "fisher": 0, "ggn": k}[estimator]


def monitor_entries(numel: int, probes: int, seed: int, budget: int = MONITOR_BUDGET) -> torch.Tensor:
    """Entries for the consecutive-difference metric: all if ``probes * numel <= budget``, else a seeded random subset."""
    if probes * numel <= budget:
        return torch.arange(numel)
    m = max(1, budget // max(probes, 1))
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:m].sort().values


@dataclass
class DiagonalResult:
    """Estimated diagonals, normalized to the Hessian of the mean next-token NLL.

    ``diagonals[estimator][param_name]``: float64 tensor with the parameter's shape. ``curves`` (only with
    tracked entries): ``curves[param_name][estimator] = {"k": [...], "tracked_rel_error": [...],
    "consecutive_rel_diff": [...]}``; ``tracked_exact[param_name]`` the exact diagonal at the tracked entries.
    """

    diagonals: dict[str, dict[str, torch.Tensor]]
    targets: list[Target]
    vhp_samples: int
    hvps: dict[str, int]
    nll_sum: float
    n_samples: int
    n_tokens: int
    elapsed_s: float
    tracked_exact: dict[str, torch.Tensor] = field(default_factory=dict)
    curves: dict[str, dict[str, dict[str, list]]] = field(default_factory=dict)
    monitor_size: dict[str, int] = field(default_factory=dict)
    phase_s: dict[str, float] = field(default_factory=dict)
    probe_batch: dict[str, Any] = field(default_factory=dict)
    """Per phase: the given ``probe_batch``, or the measured choice (:meth:`DiagonalJob.probe_batch_report`)."""
    hvp: dict[str, Any] = field(default_factory=lambda: {"hvp": "exact"})
    """How the HVPs were taken: exact, or the finite-difference settings and kink-retry counts (:class:`lib.finite_difference.FDStats`)."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.n_tokens)


Runner = Callable[[DiagonalJob, str], "Partial | None"]
"""Runs an additive job to its float64 sums; the second argument names the phase (``"1"``, ``"2"``)."""


def plan_phase1(targets: Sequence[Target], estimators: Sequence[str], k: int, seed: int) -> list[ParamPlan]:
    """Phase-1 plans: Hutchinson probes, XDiag's sketch ``H Omega``, exact entries (all, or the tracked ones), Fisher.

    Hutchinson and XDiag share probes: XDiag's ``Omega`` is the first ``k/2`` Hutchinson probes.
    """
    plans = []
    for t in targets:
        n = t.numel
        keep = k // 2 if "xdiag" in estimators else 0
        probes = k if "hutchinson" in estimators else keep
        exact = torch.arange(n) if "exact" in estimators else (t.tracked if len(t.tracked) else None)
        record = None
        if len(t.tracked) and "hutchinson" in estimators:
            record = torch.cat([t.tracked, monitor_entries(n, probes, seed)]).unique()
        plans.append(ParamPlan(t.param_name, n, probes=probes, keep=keep, record=record, exact=exact, fisher="fisher" in estimators, ggn_probes=k if "ggn" in estimators else 0))
    return plans


def _curve(est_at: Callable[[int], torch.Tensor], ks: list[int], tracked_pos: torch.Tensor, monitor_pos: torch.Tensor, exact: torch.Tensor) -> dict[str, list]:
    """Tracked relative error and consecutive relative difference of ``est_at(k)`` (estimates on the recorded rows).

    ``consecutive_rel_diff[i] = ||e(k_i) - e(k_{i-1})|| / ||e(k_i)||`` on the monitored entries (NaN for the first).
    """
    errs, diffs, prev = [], [], None
    for k in ks:
        e = est_at(k)
        errs.append(rel_l2(e[tracked_pos], exact))
        cur = e[monitor_pos]
        diffs.append(float("nan") if prev is None else float((cur - prev).norm() / cur.norm()))
        prev = cur
    return {"k": ks, "tracked_rel_error": errs, "consecutive_rel_diff": diffs}


def hessian_diagonal(
    model: nn.Module,
    targets: Sequence[Target],
    samples: torch.Tensor,
    estimators: Sequence[str] = ("xdiag",),
    vhp_samples: int = 100,
    seed: int = 0,
    model_input_bs: int = 1,
    probe_batch: int | None = None,
    fused_head: bool | None = None,
    spec: ModelSpec | None = None,
    runner: Runner | None = None,
    progress: bool = False,
    fd: FDSettings | None = None,
) -> DiagonalResult | None:
    """Diagonal of the Hessian of the mean next-token NLL over ``samples`` (``(b, seqlen)``) for each target weight.

    ``vhp_samples`` = HVPs per sample and weight for ``hutchinson`` and ``xdiag``. ``runner(job, phase)``
    runs each additive job (default: :func:`lib.jobs.run_serial` on the model's device); ``fd``: finite-difference HVPs
    (:mod:`lib.finite_difference`) instead of exact ones. Targets with
    tracked entries also get convergence curves (and the exact diagonal there). Returns ``None`` when the
    runner returns ``None`` (torchrun ranks other than 0; with ``xdiag`` the runner must give every rank
    the phase-1 sums, which phase 2 needs).
    """
    for e in estimators:
        if e not in ESTIMATORS:
            raise ValueError(f"unknown estimator {e!r}; choose from {ESTIMATORS}")
    if runner is None:
        device = next(model.parameters()).device
        runner = lambda job, phase: run_serial(job, device, progress=progress, desc=f"HVPs (phase {phase})")  # noqa: E731
    k = vhp_samples
    t0 = time.perf_counter()
    plans = plan_phase1(targets, estimators, k, seed)
    common = dict(model_input_bs=model_input_bs, seed=seed, probe_batch=probe_batch, fused_head=fused_head, spec=spec, model=model, fd=fd)
    jobs = {"1": DiagonalJob(plans, samples, phase="1", **common)}
    sums = runner(jobs["1"], "1")
    phase_s = {"1": time.perf_counter() - t0}
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    sums2: Partial | None = {}
    if "xdiag" in estimators and sums is not None:
        t1 = time.perf_counter()
        dtype = next(model.parameters()).dtype
        plans2 = []
        for p in plans:
            bases[p.param_name] = xdiag_basis(sums[key(p.param_name, "hz")])
            plans2.append(ParamPlan(p.param_name, p.numel, basis=bases[p.param_name][0].T.to(dtype).contiguous()))
        jobs["2"] = DiagonalJob(plans2, samples, phase="2", **common)
        sums2 = runner(jobs["2"], "2")
        phase_s["2"] = time.perf_counter() - t1
    if sums is None or ("xdiag" in estimators and sums2 is None):
        return None  # a torchrun rank other than 0: rank 0 holds the sums
    n_tokens = samples.shape[0] * (samples.shape[1] - 1)
    hvps = {e: sum(hvps_per_sample(e, t.numel, k) for t in targets) for e in estimators}
    result = DiagonalResult({e: {} for e in estimators}, list(targets), k, hvps, float(sums["nll_sum"]), samples.shape[0], n_tokens, 0.0, phase_s=phase_s)
    result.probe_batch = {phase: job.probe_batch_report() for phase, job in jobs.items()}
    if fd is not None:
        stats = FDStats.from_sums(sums)
        stats.add(FDStats.from_sums(sums2 or {}))
        result.hvp = {**fd.report(next(model.parameters()).dtype), **stats.to_json()}
    for t, p in zip(targets, plans):
        name = t.param_name
        omega = rademacher_probes(t.numel, seed, name, 0, p.keep).T if p.keep else None
        for e in estimators:
            if e == "hutchinson":
                d = sums[key(name, "zhz")] / k
            elif e == "ggn":
                d = sums[key(name, "ggn")] / k
            elif e == "xdiag":
                q, r = bases[name]
                d = xdiag_estimate(omega, q, sums2[key(name, "hq")].T, r)
            else:
                d = sums[key(name, e)]
            result.diagonals[e][name] = (d.to(torch.float64) / n_tokens).reshape(t.shape)
        if len(t.tracked):
            _track(result, t, p, sums, sums2, bases.get(name), omega, estimators, k, seed)
    result.elapsed_s = time.perf_counter() - t0
    return result


def _track(result: DiagonalResult, t: Target, p: ParamPlan, sums: Partial, sums2: Partial, basis, omega, estimators: Sequence[str], k: int, seed: int) -> None:
    """Convergence curves on the tracked entries (error) and the monitored entries (consecutive difference)."""
    name, n_tokens = t.param_name, result.n_tokens
    exact = sums[key(name, "exact")][torch.searchsorted(p.exact, t.tracked)].to(torch.float64) / n_tokens
    result.tracked_exact[name] = exact
    curves: dict[str, dict[str, Any]] = {}
    if "hutchinson" in estimators:
        monitor = monitor_entries(t.numel, p.probes, seed)
        run = hutchinson_running(sums[key(name, "record")]) / n_tokens
        pos = lambda idx: torch.searchsorted(p.record, idx)  # noqa: E731
        curves["hutchinson"] = _curve(lambda j: run[j - 1], list(range(1, k + 1)), pos(t.tracked), pos(monitor), exact)
        result.monitor_size[name] = len(monitor)
    if "xdiag" in estimators:
        q, r = basis
        s = r.shape[0]
        monitor = monitor_entries(t.numel, s, seed)
        rows = torch.cat([t.tracked, monitor]).unique()
        pos = lambda idx: torch.searchsorted(rows, idx)  # noqa: E731
        om, qr_, z = omega[rows], q[rows], sums2[key(name, "hq")].T[rows]
        est = lambda j: xdiag_estimate(om, qr_, z, r, j // 2) / n_tokens  # noqa: E731
        curves["xdiag"] = _curve(est, log_grid(2 * s, step=2), pos(t.tracked), pos(monitor), exact)
        result.monitor_size.setdefault(name, len(monitor))
    for e, c in curves.items():
        c["final_tracked_rel_error"] = c["tracked_rel_error"][-1]
    for e in ("fisher", "ggn", "exact"):
        if e in estimators:
            d = result.diagonals[e][name].reshape(-1)[t.tracked]
            curves[e] = {"k": [], "tracked_rel_error": [], "consecutive_rel_diff": [], "final_tracked_rel_error": rel_l2(d, exact)}
    result.curves[name] = curves
