"""Curvature approximations next to the exact Hessian, on the same subset and samples, as one additive job.

Notation: ``f = sum_t l_t`` the summed next-token NLL over the predicted positions ``t`` of the samples,
``l_t = -log softmax(z_t)[y_t]``, ``z_t`` the logits (``(V,)``), ``p_t = softmax(z_t)``, ``J_t = dz_t/dx``
(``(V, n)``), ``N = b * (seqlen - 1)`` predicted tokens, ``P = b * seqlen`` positions. Every matrix is a sum
over samples, so each work unit (batch) returns its partial sums next to the exact Hessian's:
:class:`CurvatureJob` holds the exact job (:class:`lib.hessian.exact.ExactHessianJob`, composition) and adds the
approximations' sums, so ``--devices``, checkpoints and ``--resume`` apply unchanged. Normalized like the exact
Hessian (divided by ``N``) unless stated. The approximations (:data:`APPROXIMATIONS`) live one per module in
:mod:`lib.estimators.approximations`, each with its formula, reference, cost, per-batch sums and matrix:

* ``ggn`` -- ``sum_t J_t^T (diag p_t - p_t p_t^T) J_t / N``;
* ``fisher`` -- the sampled ("true") Fisher ``sum_t E_{y ~ p_t}[g_t g_t^T] / N``, ``g_t = J_t^T (p_t - e_y)``, with
  ``S`` = ``--fisher_samples`` labels drawn from the model per position (unbiased for the GGN);
* ``empirical_fisher`` -- ``sum_samples g_s g_s^T / N`` with ``g_s`` the gradient of sample ``s``'s summed
  NLL at the true labels (the outer products the diagonal script's ``empirical_fisher`` estimator squares);
* ``gptq`` -- ``2/P * sum_positions x x^T`` per (layer, output row): the layer-wise proxy of OBS / GPTQ / SparseGPT;
* ``kfac`` -- K-FAC ``A (x) G`` restricted to the subset, zero between layers;
* ``diag`` -- ``diag(H)`` as a matrix.

Jacobian-vector products ``J v`` come from :class:`lib.objective.forward.JVPPolicy`: forward mode (``torch.func.jvp``,
vmapped over the vectors; exact through Hugging Face's eager attention, equal to 1e-12 in float64 for OPT, Llama
and GPT-2: ``tests/test_forward.py``) where it runs and measures faster on the first vectors, else the
double-backward identity ``J v = d/du <J^T u, v>`` (a backward of the VJP graph, linear in ``u``), which needs
only reverse mode (kernels without forward AD, e.g. SDPA's fused attention).

Sampled labels of sample ``i``, draw ``j`` come from a generator seeded by ``sha256(f"{seed}/labels/{i}/{j}")``
(the same for every worker); the perturbations by ``sha256(f"{seed}/perturbations")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ParamError
from ..estimators.approximations import REGISTRY, MatrixContext, sources
from ..estimators.approximations.base import (
    LAYER_STATISTICS,
    LOGIT_CHUNK_ELEMENTS,
    LOGIT_JACOBIAN,
    BatchInputs,
    EntryLayout,
    entry_layout,
    gather_columns,
    jacobian_columns,
    label_gradients,
    layer_inputs_and_output_grads,
    logit_jacobian_chunks,
    sample_labels,
)
from ..estimators.approximations.ggn import ggn_sum
from ..estimators.diagonal.ggn import GGNOperator
from ..objective.forward import JVPPolicy
from ..objective.subsets import Subset
from ..products.operator import ProductJob, digest
from ..runtime.jobs import derived_seed
from .exact import ExactHessianJob, HessianResult, Progress

APPROXIMATIONS = REGISTRY.names()
JACOBIAN_BASED = tuple(a.name for a in REGISTRY if a.source is LOGIT_JACOBIAN)
LAYER_BASED = tuple(a.name for a in REGISTRY if a.source is LAYER_STATISTICS)
SAMPLED = tuple(a.name for a in REGISTRY if a.sampled)

__all__ = [
    "APPROXIMATIONS",
    "LOGIT_CHUNK_ELEMENTS",
    "CurvatureJob",
    "EntryLayout",
    "GGNOperator",
    "approximation_matrices",
    "compare_matrices",
    "entry_layout",
    "gather_columns",
    "ggn_sum",
    "jacobian_columns",
    "label_gradients",
    "layer_inputs_and_output_grads",
    "logit_jacobian_chunks",
    "rounding_perturbations",
    "sample_labels",
    "Comparison",
    "compare",
]


# ----------------------------------------------------------------------------- pure math


def frobenius_metrics(a: torch.Tensor, h: torch.Tensor) -> dict[str, float]:
    """Relative Frobenius error of ``a`` against ``h``, raw and after the best scalar fit ``c = <a, h> / <a, a>``, and the cosine."""
    a, h = a.to(torch.float64), h.to(torch.float64)
    hn, an, dot = float(h.norm()), float(a.norm()), float((a * h).sum())
    c = dot / an**2 if an > 0 else 0.0
    return {
        "rel_frobenius": float((a - h).norm()) / hn,
        "best_scale": c,
        "rel_frobenius_scaled": float((c * a - h).norm()) / hn,
        "cosine": dot / (an * hn) if an > 0 else 0.0,
    }


def top_eigvecs(a: torch.Tensor, k: int) -> torch.Tensor:
    """Eigenvectors (``(n, k)``) of the ``k`` largest eigenvalues of the symmetric part of ``a``."""
    a = a.to(torch.float64)
    _, v = torch.linalg.eigh((a + a.T) / 2)
    return v[:, -k:]


def subspace_overlap(a: torch.Tensor, h: torch.Tensor, k: int) -> float:
    """``||U_a^T U_h||_F^2 / k`` in ``[0, 1]``: overlap of the top-``k`` eigenvector subspaces (1 = the same subspace)."""
    k = min(k, h.shape[0])
    return float((top_eigvecs(a, k).T @ top_eigvecs(h, k)).pow(2).sum()) / k


def quadratic_forms(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``d_j^T A d_j / 2`` for the rows ``d_j`` of ``d`` (``(m, n)``); ``(m,)``."""
    d = d.to(torch.float64)
    return 0.5 * ((d @ a.to(torch.float64)) * d).sum(1)


def prediction_metrics(pred: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Pearson correlation and relative error ``||pred - ref|| / ||ref||`` of predicted loss changes (``(m,)``)."""
    pred, ref = pred.to(torch.float64), ref.to(torch.float64)
    if pred.numel() < 2:
        return {"corr": float("nan"), "rel_error": float("nan")}
    pc, rc = pred - pred.mean(), ref - ref.mean()
    den = float(pc.norm() * rc.norm())
    return {
        "corr": float((pc * rc).sum()) / den if den > 0 else float("nan"),
        "rel_error": float((pred - ref).norm() / ref.norm()),
    }


def compare_matrices(
    exact: torch.Tensor,
    approx: dict[str, torch.Tensor],
    top_k: int,
    perturbations: torch.Tensor | None = None,
    measured: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """All metrics of each approximation against ``exact`` (``(n, n)``).

    With ``perturbations`` (``(m, n)``): ``pred_vs_exact_*`` compares ``d^T A d / 2`` with ``d^T H d / 2``; each
    ``measured[label]`` (``(m,)``, a measured loss change per perturbation) adds ``pred_vs_<label>_*``, and an
    ``exact`` entry of its own (how well the quadratic model itself predicts it).
    """
    out: dict[str, dict[str, float]] = {}
    q_exact = (
        quadratic_forms(exact, perturbations)
        if perturbations is not None and len(perturbations)
        else None
    )
    measured = measured if q_exact is not None else None
    for name, a in approx.items():
        m = {
            **frobenius_metrics(a, exact),
            "top_k": min(top_k, exact.shape[0]),
            "top_k_overlap": subspace_overlap(a, exact, top_k),
        }
        if q_exact is not None:
            q = quadratic_forms(a, perturbations)
            m.update({f"pred_vs_exact_{k}": v for k, v in prediction_metrics(q, q_exact).items()})
            m.update(
                {
                    f"pred_vs_exact_scaled_{k}": v
                    for k, v in prediction_metrics(m["best_scale"] * q, q_exact).items()
                }
            )
            for label, ref in (measured or {}).items():
                m.update({f"pred_vs_{label}_{k}": v for k, v in prediction_metrics(q, ref).items()})
        out[name] = m
    if measured:
        out["exact"] = {
            f"pred_vs_{label}_{k}": v
            for label, ref in measured.items()
            for k, v in prediction_metrics(q_exact, ref).items()
        }
    return out


# ----------------------------------------------------------------------------- the additive job


class CurvatureJob(ProductJob):
    """The exact Hessian's job and, beside it (it holds one: ``exact``), the partial sums of the approximations and the
    perturbed losses per unit.

    Extra partial keys (all summed over samples, unnormalized) come from each approximation's module (e.g.
    ``ggn_sum``, ``fisher_sum`` summed over the ``fisher_samples`` draws too, ``empirical_fisher_sum``, ``input_gram``
    and ``kfac_g_sum`` on same-layer pairs), plus ``loss_change_sum`` (``(m, 2)``: ``f(x0 +- d_j) - f(x0)`` per
    perturbation). ``exact``: the exact job to compute beside (default: one built from ``subset``, ``samples`` and
    ``settings``, the keyword arguments of :class:`lib.hessian.exact.ExactHessianJob`).
    """

    def __init__(
        self,
        subset: Subset,
        samples: torch.Tensor,
        approximations: list[str],
        fisher_samples: int = 4,
        perturbations: torch.Tensor | None = None,
        seed: int = 0,
        exact: ExactHessianJob | None = None,
        **settings: Any,
    ):
        exact = ExactHessianJob(subset, samples, **settings) if exact is None else exact
        super().__init__(
            samples,
            exact.model_input_bs,
            exact.chunk,
            exact.fused_head,
            exact.spec,
            exact.model,
            exact.products,
        )
        try:
            REGISTRY.lookup(approximations)
        except ValueError:
            unknown = sorted(set(approximations) - set(APPROXIMATIONS))
            raise ValueError(
                f"unknown approximations {unknown}; choose from {APPROXIMATIONS}"
            ) from None
        self.exact, self.subset = exact, subset
        self.approximations, self.fisher_samples, self.seed = (
            list(approximations),
            fisher_samples,
            seed,
        )
        self.perturbations = (
            torch.zeros(0, subset.size, dtype=torch.float64)
            if perturbations is None
            else perturbations.to(torch.float64)
        )

    @classmethod
    def beside(
        cls,
        exact: ExactHessianJob,
        approximations: list[str],
        fisher_samples: int = 4,
        perturbations: torch.Tensor | None = None,
        seed: int = 0,
    ) -> CurvatureJob:
        """The comparison job computing ``approximations`` beside the given exact job (which it runs)."""
        return cls(
            exact.subset,
            exact.samples,
            approximations,
            fisher_samples,
            perturbations,
            seed,
            exact=exact,
        )

    def _sources(self):
        return sources(self.approximations)

    def layout(self) -> EntryLayout | None:
        """The subset's layer layout when a layer-based approximation is asked for (else ``None``)."""
        if not any(s.needs_layout for s, _ in self._sources()):
            return None
        return entry_layout(self.model, self.subset)

    def setup(self, device: torch.device) -> None:
        super().setup(device)
        self.exact.model = self.model  # one model per process, shared with the exact job
        self.exact.setup(device)
        self._layout = self.layout()
        self._jvp = (
            JVPPolicy()
        )  # the logit Jacobian's J v: forward mode where it runs and measures faster

    def steps_per_unit(self) -> int:
        return self.exact.steps_per_unit() + sum(
            s.steps(self.subset.size) for s, _ in self._sources()
        )

    def run_unit(self, k: int, progress: Progress | None = None) -> dict[str, torch.Tensor]:
        out = self.exact.run_unit(k, progress)
        batch = self.batch(k, self.exact.x0.device)
        inputs = BatchInputs(
            self.model,
            self.subset,
            self.exact.objective,
            self.exact.x0,
            batch,
            self.first_sample(k),
            self.seed,
            self.fisher_samples,
            self._layout,
            self._jvp,
        )
        for source, users in self._sources():
            out.update(source.run(inputs, users, progress))
        if len(self.perturbations):
            out["loss_change_sum"] = self._loss_changes(batch)
        return out

    @torch.no_grad()
    def _loss_changes(self, batch: torch.Tensor) -> torch.Tensor:
        """``(m, 2)``: ``f(x0 + d_j; batch) - f(x0; batch)`` and ``f(x0 - d_j; batch) - f(x0; batch)`` for each perturbation ``d_j``."""
        x0, objective = self.exact.x0.detach(), self.exact.objective
        base = objective(x0, batch)
        return torch.stack(
            [
                torch.stack([objective(x0 + sign * d.to(x0), batch) - base for sign in (1, -1)])
                for d in self.perturbations
            ]
        ).to(torch.float64)

    def chunk_report(self, flag: str = "chunk") -> dict[str, Any]:
        return self.exact.chunk_report(flag)

    def products_report(self) -> dict[str, Any]:
        return self.exact.products_report()

    def jvp_report(self) -> dict[str, Any] | None:
        """For the JSON: this process's :class:`lib.objective.forward.JVPPolicy` choice when the logit Jacobian is computed
        (``None`` without a Jacobian-based approximation, or before a unit ran here, e.g. with worker processes)."""
        policy = getattr(self, "_jvp", None)
        wants = any(s is LOGIT_JACOBIAN for s, _ in self._sources())
        return (
            policy.report() if wants and policy is not None and policy.chosen is not None else None
        )

    def result(self, sums: dict[str, torch.Tensor], elapsed_s: float) -> HessianResult:
        """The exact Hessian's result (:meth:`lib.hessian.exact.ExactHessianJob.result`)."""
        return self.exact.result(sums, elapsed_s)

    def config(self) -> dict[str, Any]:
        return {
            **self.exact.config(),
            "kind": "exact_hessian+curvature",
            "approximations": self.approximations,
            "fisher_samples": self.fisher_samples,
            "seed": self.seed,
            "perturbations_sha256": digest(self.perturbations),
        }


# ----------------------------------------------------------------------------- results


def rounding_perturbations(
    model: nn.Module, subset: Subset, count: int, bits: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d (count, n), s (n,))``: ``d`` uniform in ``[-s/2, s/2]`` per entry, ``s = (max - min) / (2^bits - 1)`` of the
    entry's weight row (output unit; the whole weight for parameters that are not matrices), the step of
    min-max round-to-nearest quantization with ``bits`` bits."""
    steps = []
    for sl in subset.slices:
        w = model.get_parameter(sl.param_name).detach().to("cpu", torch.float64)
        if w.ndim == 2:
            module = model.get_submodule(sl.param_name.rsplit(".", 1)[0])
            rows_first = type(module).__name__ != "Conv1D"
            by_row = w if rows_first else w.T
            step = (by_row.amax(1) - by_row.amin(1)) / (2**bits - 1)
            r, c = sl.flat_index // w.shape[1], sl.flat_index % w.shape[1]
            steps.append(step[r if rows_first else c])
        else:
            steps.append(
                torch.full(
                    (len(sl),), float(w.max() - w.min()) / (2**bits - 1), dtype=torch.float64
                )
            )
    s = torch.cat(steps)
    g = torch.Generator().manual_seed(derived_seed(seed, "perturbations"))
    return (torch.rand(count, subset.size, generator=g, dtype=torch.float64) - 0.5) * s, s


def approximation_matrices(
    sums: dict[str, torch.Tensor],
    result: HessianResult,
    approximations: list[str],
    fisher_samples: int,
    layout: EntryLayout | None,
    seqlen: int,
) -> dict[str, torch.Tensor]:
    """``{"exact": H, approx: matrix}`` (float64, ``(n, n)``) from the summed partials, normalized as each
    approximation's module states (:meth:`lib.estimators.approximations.Approximation.matrix`)."""
    h = result.hessian_sum.to(torch.float64) / result.n_tokens
    ctx = MatrixContext(h, result.n_tokens, result.n_samples * seqlen, fisher_samples, layout)
    return {"exact": h, **{a.name: a.matrix(sums, ctx) for a in REGISTRY.lookup(approximations)}}


def make_job(
    exact: ExactHessianJob,
    approximations: Sequence[str],
    fisher_samples: int = 4,
    perturbations: int = 64,
    perturbation_bits: int = 4,
    seed: int = 0,
) -> CurvatureJob:
    """The comparison job of a run: ``approximations`` (:data:`APPROXIMATIONS`) beside ``exact``, with
    ``fisher_samples`` sampled labels per position and ``perturbations`` rounding-noise perturbations of
    ``perturbation_bits`` bits (:func:`rounding_perturbations`) drawn from ``seed``."""
    unknown = [a for a in approximations if a not in APPROXIMATIONS]
    if unknown:
        raise ParamError(
            "approximations",
            f"approximations {unknown[0]!r} is unknown; choose from {', '.join(APPROXIMATIONS)}",
        )
    for name, value, low in (
        ("fisher_samples", fisher_samples, 1),
        ("perturbations", perturbations, 0),
        ("perturbation_bits", perturbation_bits, 1),
    ):
        if value < low:
            raise ParamError(name, f"{name} must be at least {low}, got {value}")
    approximations = list(dict.fromkeys(approximations))
    if any(a in LAYER_BASED for a in approximations):
        entry_layout(exact.model, exact.subset)
    d, _ = rounding_perturbations(exact.model, exact.subset, perturbations, perturbation_bits, seed)
    return CurvatureJob.beside(exact, approximations, fisher_samples, d, seed)


@dataclass(frozen=True)
class Comparison:
    """The curvature comparison of one run: each approximation against the exact Hessian.

    Attributes:
        matrices: ``{"exact": H, approx: A}``, float64 ``(n, n)``, normalized as each approximation's module states.
        metrics: ``{approx: {metric: value}}`` (:func:`compare_matrices`).
        details: what the metrics mean, the normalizations, the costs, the perturbations and (when measured) the
            mean loss changes, for the JSON.
    """

    matrices: dict[str, torch.Tensor]
    metrics: dict[str, Any]
    details: dict[str, Any]


def compare(
    job: CurvatureJob,
    sums: dict[str, torch.Tensor],
    result: HessianResult,
    top_k: int = 8,
) -> Comparison:
    """Every approximation of ``job`` against the exact Hessian of ``result``, from the summed partials ``sums``:
    the matrices, the metrics (top-``top_k`` eigenvector overlap, the perturbations' quadratic forms against the
    measured loss changes) and their description. Writes nothing."""
    layout = job.layout()
    mats = approximation_matrices(
        sums, result, job.approximations, job.fisher_samples, layout, job.samples.shape[1]
    )
    d = job.perturbations
    measured = None
    if "loss_change_sum" in sums:
        change = sums["loss_change_sum"] / result.n_tokens
        measured = {"measured": change[:, 0], "measured_even": change.mean(1)}
    metrics = compare_matrices(
        mats["exact"],
        {k: v for k, v in mats.items() if k != "exact"},
        top_k,
        d if len(d) else None,
        measured,
    )
    details: dict[str, Any] = {
        "fisher_samples": job.fisher_samples,
        "perturbations": len(d),
        "perturbation_step": "uniform in [-s/2, s/2], s = (max - min) / (2^bits - 1) of the entry's weight row",
        "metrics": "against the exact Hessian H: rel_frobenius = ||A - H||_F / ||H||_F; rel_frobenius_scaled after the best scalar fit best_scale * A; cosine = <A, H> / (||A|| ||H||); top_k_overlap = ||U_A^T U_H||_F^2 / k (top-k eigenvectors); pred_vs_exact_*: d^T A d / 2 against d^T H d / 2 over the perturbations (corr, rel_error; _scaled after best_scale); pred_vs_measured_*: against the measured f(x0 + d) - f(x0) of the mean NLL (with its first-order term g^T d, which the quadratic proxies ignore); pred_vs_measured_even_*: against (f(x0 + d) + f(x0 - d)) / 2 - f(x0) = d^T H d / 2 + O(d^4), the measured second-order part ('exact': the quadratic model itself)",
        "normalizations": "ggn, fisher, empirical_fisher, kfac's G: divided by b*(seqlen-1) like H; gptq = 2/(b*seqlen) sum x x^T; kfac = A (x) G with A = sum x x^T / (b*seqlen), so on a single row kfac = gptq * G[o, o] / 2",
        "cost": {a.name: a.cost for a in REGISTRY.lookup(job.approximations)},
    }
    if job.jvp_report() is not None:
        details["jacobian_vector_products"] = (
            job.jvp_report()
        )  # this process's choice (lib.objective.forward)
    if measured is not None:
        details["loss_change_mean"] = {
            **{k: float(v.mean()) for k, v in measured.items()},
            "quadratic_exact": float(quadratic_forms(mats["exact"], d).mean()),
        }
    return Comparison(mats, metrics, details)
