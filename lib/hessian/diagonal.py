"""Diagonal of the Hessian of the mean next-token NLL for whole weights: the additive job and the driver.

For a weight ``W`` with ``n`` entries (``x = W.reshape(-1)``), ``b`` samples ``X_s`` and the summed NLL
``f(x; X_s)`` of :mod:`lib.objective.loss`, the target is

    diag(H) / (b * (seqlen - 1)),        H = sum_s H_s,  H_s = d^2 f(x; X_s) / dx^2  at x0,

the diagonal of the Hessian of the *mean* next-token NLL (the normalization of :mod:`lib.hessian.exact`),
returned with ``W``'s own shape. Everything is linear in ``H``, so each sample's Hessian-vector products
(HVPs) are computed on its own gradient graph and summed: ``z * (H z) = sum_s z * (H_s z)`` with the *same*
probe ``z`` for every sample.

The estimators (:data:`ESTIMATORS`: ``hutchinson``, ``xdiag``, ``empirical_fisher``, ``ggn``, ``exact``) live one per
module in :mod:`lib.estimators.diagonal`, each with its formula, reference, cost, plan and finish step; this module
runs their plans as additive jobs (:class:`DiagonalJob`, a :class:`lib.products.operator.ProductJob`: probe rows with
reducing sinks), one per phase (XDiag needs two passes: its second set of products depends on the sum over *all*
samples of the first), and packages the result (:func:`hessian_diagonal`).

Convergence study (paper Fig. 3a). With tracked entries, Hutchinson keeps the per-probe contributions
``z_j * (H z_j)`` at those entries (a ``(K, m)`` partial sum), so the estimate after every ``k <= K`` can be
formed afterwards; a per-probe record of all ``n`` entries would cost ``K * n`` floats, so the entries are
the tracked rows plus, for the consecutive-difference metric, all entries when ``K * n <= MONITOR_BUDGET``,
else a fixed random subset of ``MONITOR_BUDGET // K`` entries (stated in the output). XDiag's estimate
after its first ``s' <= s`` probes is computed from prefixes of ``Omega, Q, R, Z``, so its curve costs no extra HVPs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..deprecation import renamed_keywords, warn_renamed
from ..estimators.diagonal import (
    REGISTRY,
    DiagonalEstimator,
    Entries,
    ParamPlan,
    Probes,
    Rows,
    Target,
    Unit,
    estimate,
    plan_phase1,
    run_plan,
)
from ..estimators.diagonal.exact import MAX_ENTRIES as EXACT_MAX_ENTRIES
from ..estimators.diagonal.hutchinson import hutchinson_running, offdiagonal_error
from ..estimators.diagonal.work import (
    MONITOR_BUDGET,
    key,
    log_grid,
    monitor_entries,
    probe_seed,
    rademacher_probes,
    rel_l2,
)
from ..estimators.diagonal.xdiag import xdiag_basis, xdiag_estimate
from ..model.models import ModelSpec
from ..objective.forward import JVPPolicy
from ..objective.subsets import whole_parameter
from ..products.finite_difference import FDStats
from ..products.operator import BatchGraph, ProductJob, Products, fd_stats, graph_sums
from ..runtime.jobs import Partial, run_serial
from ..runtime.library_defaults import settle

ESTIMATORS = REGISTRY.names()
"""The registered estimators' names, in registry order (what ``--estimator`` accepts)."""
RENAMED = dict(REGISTRY.renamed)
"""Old estimator names and their new ones (``fisher`` was the empirical Fisher; ``fisher`` now means the sampled one)."""

__all__ = [
    "ESTIMATORS",
    "EXACT_MAX_ENTRIES",
    "MONITOR_BUDGET",
    "REGISTRY",
    "RENAMED",
    "DiagonalEstimator",
    "DiagonalJob",
    "DiagonalResult",
    "Entries",
    "ParamPlan",
    "Probes",
    "Rows",
    "Target",
    "hessian_diagonal",
    "hutchinson_running",
    "hvps_per_sample",
    "key",
    "log_grid",
    "monitor_entries",
    "offdiagonal_error",
    "plan_phase1",
    "probe_seed",
    "rademacher_probes",
    "rel_l2",
    "xdiag_basis",
    "xdiag_estimate",
]

Progress = Callable[[int], None]


def hvps_per_sample(estimator: str, numel: int, k: int) -> int:
    """HVPs each sample costs ``estimator`` for one weight of ``numel`` entries with ``K = k``."""
    return REGISTRY[estimator].hvps_per_sample(numel, k)


# ----------------------------------------------------------------------------- the additive job


class _ModelUnit(Unit):
    """One batch of one weight on the job's model: the objective of the whole weight, its values, the batch, and the
    products on the batch's gradient graph (built on first use, shared by every product of the weight)."""

    def __init__(self, job: DiagonalJob, plan: ParamPlan, k: int):
        self.job, self.param_name, self.numel, self.seed = (
            job,
            plan.param_name,
            plan.numel,
            job.seed,
        )
        self.objective = job.subset_loss(whole_parameter(job.model, plan.param_name))
        self.x0 = self.like = self.objective.x0()
        self.batch = job.batch(k, self.x0.device)
        self.jvp = job.jvp
        self._graph: BatchGraph | None = None

    def graph(self) -> BatchGraph:
        if self._graph is None:
            self._graph = self.job.batch_graph(self.objective, self.batch, self.x0)
            self.offer_nll(self._graph.value)
        return self._graph

    def multiply(self, rows, count: int, sink, progress: Progress | None = None) -> None:
        self.job.multiply(self.graph(), rows, count, sink, progress)

    def gradient(self) -> torch.Tensor:
        return self.graph().g


class DiagonalJob(ProductJob):
    """Hessian-diagonal products of whole weights as an additive job (:class:`lib.products.operator.ProductJob`): unit ``k`` =
    batch ``k``.

    For each :class:`ParamPlan` (one weight) the batch's pieces of work run in order (:func:`run_plan`); those that
    multiply by ``H`` share one forward and ``create_graph`` backward, then take their products ``chunk``
    at a time (given, else measured per weight size; halved on CUDA out-of-memory). ``run_unit`` returns
    ``{key(param, what): tensor}`` (see the work kinds of :mod:`lib.estimators.diagonal.work`) and ``nll_sum``.
    The model is either given (``model``) or loaded from ``spec`` in :meth:`setup` (worker processes).
    """

    @renamed_keywords(probe_batch="chunk")
    def __init__(
        self,
        plans: Sequence[ParamPlan],
        samples: torch.Tensor,
        model_input_bs: int = 1,
        seed: int = 0,
        chunk: int | None = None,
        fused_head: bool | None = None,
        spec: ModelSpec | None = None,
        model: nn.Module | None = None,
        phase: str = "1",
        products: Products | None = None,
    ):
        super().__init__(samples, model_input_bs, chunk, fused_head, spec, model, products)
        self.plans, self.seed, self.phase = list(plans), seed, phase

    def setup(self, device: torch.device) -> None:
        super().setup(device)
        self.jvp = (
            JVPPolicy()
        )  # the GGN's J z: forward mode where it runs and measures faster (per process)

    @property
    def probe_batch(self) -> int | None:
        """Deprecated name of :attr:`chunk` (HVPs per batched backward; ``None``: measured)."""
        warn_renamed("DiagonalJob", "probe_batch", "chunk", stacklevel=3)
        return self.chunk

    def probe_batch_report(self) -> dict[str, Any]:
        """Deprecated name of :meth:`chunk_report`."""
        warn_renamed("DiagonalJob", "probe_batch_report", "chunk_report", stacklevel=3)
        return self.chunk_report()

    def steps_per_unit(self) -> int:
        return sum(p.steps() for p in self.plans)

    def run_unit(self, k: int, progress: Progress | None = None) -> Partial:
        out: Partial = {}
        nll = None
        for plan in self.plans:
            unit = _ModelUnit(self, plan, k)
            out.update(run_plan(plan, unit, progress))
            nll = unit.nll if nll is None else nll
            for what, count in graph_sums(
                self.products, unit._graph
            ).items():  # finite differences: products and kink retries
                out[what] = out.get(what, 0) + count
            del unit  # frees the weight's gradient graph before the next weight's
        out["nll_sum"] = nll
        return {name: v.detach().cpu() for name, v in out.items()}

    def config(self) -> dict[str, Any]:
        return {
            "kind": "hessian_diagonal",
            "phase": self.phase,
            "plans": [p.config() for p in self.plans],
            **self.base_config(),
            "seed": self.seed,
            "probes": "rademacher, generator seeded by sha256(f'{seed}/{param}/{j}')",
            **self._groups_config(),
        }

    def _groups_config(self) -> dict[str, Any]:
        """With Hutchinson's probe groups (per-entry standard error), a key that names them: a checkpoint written
        before they existed lacks it, so its refusal names ``probe_groups`` among the differences."""
        b = max((getattr(w, "groups", 0) for p in self.plans for w in p.work.values()), default=0)
        return (
            {"probe_groups": f"{b} interleaved groups (j mod {b}) summed beside zhz"} if b else {}
        )


# ----------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class DiagonalResult:
    """Estimated diagonals, normalized to the Hessian of the mean next-token NLL.

    ``diagonals[estimator][param_name]``: float64 tensor with the parameter's shape. ``curves`` (only with
    tracked entries): ``curves[param_name][estimator] = {"k": [...], "tracked_rel_error": [...],
    "consecutive_rel_diff": [...]}``; ``tracked_exact[param_name]`` the exact diagonal at the tracked entries.
    """

    diagonals: dict[str, dict[str, torch.Tensor]]
    targets: list[Target]
    hvps: int
    """``K``: HVPs per sample and weight asked of the estimators that use it (``--hvps``; was ``vhp_samples``)."""
    hvps_per_sample: dict[str, int]
    """Per estimator: the HVPs it takes per sample, all target weights together."""
    nll_sum: float
    n_samples: int
    n_tokens: int
    elapsed_s: float
    tracked_exact: dict[str, torch.Tensor] = field(default_factory=dict)
    curves: dict[str, dict[str, dict[str, list]]] = field(default_factory=dict)
    monitor_size: dict[str, int] = field(default_factory=dict)
    phase_s: dict[str, float] = field(default_factory=dict)
    chunk: dict[str, Any] = field(default_factory=dict)
    """Per phase: the given ``chunk``, or the measured choice (:meth:`DiagonalJob.chunk_report`)."""
    hvp: dict[str, Any] = field(default_factory=lambda: {"hvp": "exact"})
    """How the HVPs were taken: exact, or the finite-difference settings and kink-retry counts (:class:`FDStats`)."""
    standard_errors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """``standard_errors[estimator][param_name]``: per-entry standard error of the diagonal (same normalization and
    shape), for the estimators that give one (Hutchinson with ``K >= 2``: :meth:`DiagonalEstimator.standard_error`)."""

    @property
    def vhp_samples(self) -> int:
        """Deprecated name of :attr:`hvps`."""
        warn_renamed("DiagonalResult", "vhp_samples", "hvps", stacklevel=3)
        return self.hvps

    @property
    def probe_batch(self) -> dict[str, Any]:
        """Deprecated name of :attr:`chunk`."""
        warn_renamed("DiagonalResult", "probe_batch", "chunk", stacklevel=3)
        return self.chunk

    @property
    def perplexity(self) -> float:
        """``exp`` of the mean next-token NLL over the ``n_tokens`` predicted tokens."""
        return math.exp(self.nll_sum / self.n_tokens)

    def errors_vs_exact(self) -> dict[str, dict[str, float]]:
        """``{estimator: {param_name: ||est - exact|| / ||exact||}}`` (:func:`rel_l2`) for every estimator but
        ``exact``; empty unless ``exact`` was among the estimators."""
        if "exact" not in self.diagonals:
            return {}
        exact = self.diagonals["exact"]
        return {
            e: {
                t.param_name: rel_l2(self.diagonals[e][t.param_name], exact[t.param_name])
                for t in self.targets
            }
            for e in self.diagonals
            if e != "exact"
        }


Runner = Callable[[DiagonalJob, str], "Partial | None"]
"""Runs an additive job to its float64 sums; the second argument names the phase (``"1"``, ``"2"``)."""


@renamed_keywords(vhp_samples="hvps", probe_batch="chunk")
def hessian_diagonal(
    model: nn.Module,
    targets: Sequence[Target],
    samples: torch.Tensor,
    estimators: Sequence[str] = ("xdiag",),
    hvps: int = 100,
    seed: int = 0,
    model_input_bs: int | str = "auto",
    chunk: int | None = None,
    fused_head: bool | None = None,
    spec: ModelSpec | None = None,
    runner: Runner | None = None,
    progress: bool = False,
    products: Products | None = None,
) -> DiagonalResult | None:
    """Diagonal of the Hessian of the mean next-token NLL over ``samples`` (``(b, seqlen)``) for each target weight.

    ``estimators``: names in :data:`ESTIMATORS`; ``hvps`` = ``K``, HVPs per sample and weight for those that
    use it; ``chunk``: HVPs per batched backward (``None``: measured per weight size). The old keywords
    ``vhp_samples`` and ``probe_batch`` still work (deprecated). ``runner(job, phase)`` runs each additive job (default: :func:`lib.runtime.jobs.run_serial` on the model's
    device). Targets with tracked entries also get convergence curves (and the exact diagonal there). Returns
    ``None`` when the runner returns ``None`` (torchrun ranks other than 0; with a two-phase estimator such as
    ``xdiag`` the runner must give every rank the phase-1 sums, which phase 2 needs).

    Args:
        model: a prepared causal LM.
        targets: the weights whose diagonals are estimated (:class:`Target`: name, shape, tracked entries).
        samples: ``(b, seqlen)`` int64 token ids.
        estimators: names in :data:`ESTIMATORS`.
        hvps: ``K``, HVPs per sample and weight (old keyword ``vhp_samples``).
        seed: seed of the probes (per weight and probe index).
        model_input_bs: samples per forward, or ``"auto"`` (the scripts' rule).
        chunk: HVPs per batched backward; ``None``: measured (old keyword ``probe_batch``).
        fused_head: the LM head through :func:`lib.objective.loss.head_nll`; ``None``: where the architecture allows.
        spec: how worker processes load the model (:class:`lib.model.models.ModelSpec`), or ``None``.
        runner: ``runner(job, phase)`` runs each additive job to its float64 sums, or ``None``.
        progress: show a tqdm bar (the default runner).
        products: how Hessian-vector products are taken (:class:`lib.products.base.Products`); ``None``: exact.

    Returns:
        The :class:`DiagonalResult` (``diagonals[estimator][param_name]``: float64, the weight's shape), or ``None``
        on the ranks the runner gives no sums.

    Raises:
        ValueError: an unknown estimator name (before any work).
        ParamError: an XDiag sketch of too low rank for ``hvps`` (:func:`xdiag_basis`).
    """
    REGISTRY.lookup(estimators)  # unknown names: ValueError before any work
    # as the scripts (lib.runtime.library_defaults)
    model_input_bs = settle(model, samples, model_input_bs, 1)
    if runner is None:
        device = next(model.parameters()).device
        runner = lambda job, phase: run_serial(
            job, device, progress=progress, desc=f"HVPs (phase {phase})"
        )  # noqa: E731
    t0 = time.perf_counter()
    common = dict(
        model_input_bs=model_input_bs,
        seed=seed,
        chunk=chunk,
        fused_head=fused_head,
        spec=spec,
        model=model,
        products=products,
    )
    jobs: dict[str, DiagonalJob] = {}
    stats = FDStats()

    def run(phase: str, plans: list[ParamPlan]) -> Partial | None:
        jobs[phase] = DiagonalJob(plans, samples, phase=phase, **common)
        sums = runner(jobs[phase], phase)
        counted = fd_stats(jobs[phase].products, sums)
        if counted is not None:
            stats.add(counted)
        return sums

    n_tokens = samples.shape[0] * (samples.shape[1] - 1)
    est = estimate(estimators, targets, hvps, seed, run, next(model.parameters()).dtype, n_tokens)
    if est is None:
        return None  # a torchrun rank other than 0: rank 0 holds the sums
    per_sample = {e: sum(hvps_per_sample(e, t.numel, hvps) for t in targets) for e in estimators}
    return DiagonalResult(
        est.diagonals,
        list(targets),
        hvps,
        per_sample,
        float(est.sums["nll_sum"]),
        samples.shape[0],
        n_tokens,
        time.perf_counter() - t0,
        tracked_exact=est.tracked_exact,
        curves=est.curves,
        monitor_size=est.monitor_size,
        phase_s=est.phase_s,
        chunk={phase: job.chunk_report() for phase, job in jobs.items()},
        hvp=jobs["1"].products.report(next(model.parameters()).dtype, stats),
        standard_errors=est.standard_errors,
    )
