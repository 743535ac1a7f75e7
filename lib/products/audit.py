"""The float64 audit: how far a run's Hessian-vector products are from exact float64 ones, measured inside the run.

A run takes its products ``H v`` by a path that may be approximate: float32 matmuls at a lowered precision (TF32 /
bf16 passes, ``--matmul_precision high|medium``), a bfloat16 / float16 model, or finite differences of gradients
(``--hvp finite_difference``). The audit takes ``K`` products both by the run's path (:func:`operator_path`: the run's
model, precision and :class:`lib.products.operator.Products`) and by exact float64 double backward (:func:`float64_reference`:
a float64 copy of the model, or the model itself when it is float64), on the same samples (the first ``audit_b``), and
compares them column by column (:func:`audit_products`)::

    e_k = ||H_run v_k - H_64 v_k|| / ||H_64 v_k||                 (per product; max and median reported)
    ||dH||_F ~ sqrt(n * mean_k ||dH v_k||^2 / ||v_k||^2)          (dH = H_run - H_64 on the audit's samples)

The vectors ``v_k`` are columns ``e_i`` of the exact block (the exact scripts: ``K`` columns drawn at random, so the
audit reads ``K`` of the block's own columns) or Rademacher probes (diagonal, spectrum). Both kinds have
``E[v v^T] = (||v||^2 / n) I``, so the second line is an unbiased estimate of ``||dH||_F^2``; ``||dH||_F >= ||dH||_2``
bounds the eigenvalue shift by Weyl's inequality (``|lambda_i(H_run) - lambda_i(H_64)| <= ||dH||_2``), which
:func:`eigenvalue_bounds` adds to Lanczos' residual bound.

For finite differences the audit also estimates the truncation error of the step ``h`` from a second product at
``h / 2`` (``D(h) - D(h/2) = (3/4) (h^2/6) T[v, v] + ...``, so the truncation of ``D(h)`` is ``4/3 ||D(h) - D(h/2)||``,
rounding included), and ``--fd_step auto`` (:func:`choose_fd_step`) takes the step of :data:`FD_LADDER` with the
smallest audited error.

The pipeline calls :func:`prepare` (the step of ``--fd_step auto``) before the computation and :func:`audit_run` after
it; :func:`json_fields` and :func:`report_lines` turn the result into the JSON's ``audit`` section and the printed line.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..model.precision import keep_float64
from ..objective.subsets import Subset, params_subset
from ..runtime.jobs import derived_seed
from .finite_difference import FDSettings, FiniteDifference, underflow_message
from .operator import REVERSE_OVER_REVERSE, HessianOperator, Products

ProductFn = Callable[[torch.Tensor], torch.Tensor]
"""``V (n, p) float64 -> H V (n, p) float64``: one way of taking a block of Hessian-vector products."""

DEFAULT_PRODUCTS = 4
"""``--audit`` of the approximate paths when not given (0 for exact float32 at full precision and for float64)."""
DEFAULT_AUDIT_B = 4
"""``--audit_b`` when not given: the first ``min(b, 4)`` samples (diagonal, spectrum); the exact scripts audit every
sample, reading ``K`` of the block's own columns (the reference costs ``K / t`` of the run in float64)."""
DEFAULT_TOL = 0.1
"""``--audit_tol``'s default (the spec's field says it too): a product off by more than 10 % warns. Passes: float32
finite differences (2.7e-2 measured on the embedded model), TF32 (3.4e-2 on OPT-125M, H200); warns: bf16 products
(1.3e-1 on OPT-125M), bf16 finite differences on ReLU models (0.5-0.7)."""
FD_LADDER = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
"""The relative steps ``--fd_step auto`` tries (those above the dtype's epsilon)."""
REFERENCE = "float64 exact"


def default_products(dtype: str, hvp: str, matmul_precision: str, fsdp: bool = False) -> int:
    """``--audit``'s default: :data:`DEFAULT_PRODUCTS` for the approximate paths (a lowered float32 matmul precision,
    a 16-bit dtype, finite differences), 0 for exact products in float64 or full-precision float32 (nothing to audit)
    and under FSDP (no whole model on one rank for the float64 reference)."""
    if fsdp:
        return 0
    lowered = dtype == "float32" and matmul_precision != "highest"
    approximate = hvp != "exact" or dtype in ("bfloat16", "float16") or lowered
    return DEFAULT_PRODUCTS if approximate else 0


def column_vectors(n: int, k: int, seed: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(V (n, k), indices)``: ``k`` distinct unit columns ``e_i`` of the ``n x n`` identity, ``i`` drawn uniformly
    (seeded), in increasing order."""
    k = min(k, n)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[:k].sort().values
    v = torch.zeros(n, k, dtype=torch.float64)
    v[idx, torch.arange(k)] = 1.0
    return v, tuple(int(i) for i in idx)


def rademacher_vectors(n: int, k: int, seed: int) -> torch.Tensor:
    """``(n, k)`` float64 with i.i.d. +-1 entries (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, k), generator=gen).to(torch.float64).mul_(2).sub_(1)


def operator_path(
    model: nn.Module,
    subset: Subset,
    samples: torch.Tensor,
    products: Products,
    model_input_bs: int = 1,
    fused_head: bool | None = None,
) -> ProductFn:
    """The run's path: ``V -> H V`` on ``model`` (its dtype, device and the process's matmul precision) through
    ``products``, over ``samples`` (mean-NLL normalization, as every run)."""
    op = HessianOperator(
        model,
        subset,
        samples,
        model_input_bs,
        fused_head=fused_head,
        keep_graphs=False,
        products=products,
    )
    return op.matmat


def float64_copy(model: nn.Module) -> nn.Module:
    """``model`` itself when it is float64, else a float64 copy on its device (the same weights: a bf16 model's
    rounded values, held exactly), computing every step in float64 (:func:`lib.model.precision.keep_float64`)."""
    if next(model.parameters()).dtype == torch.float64:
        return model
    return keep_float64(copy.deepcopy(model).to(torch.float64))


def float64_reference(
    model: nn.Module,
    subset: Subset,
    samples: torch.Tensor,
    model_input_bs: int = 1,
    fused_head: bool | None = None,
) -> ProductFn:
    """The reference: exact double backward on :func:`float64_copy` of ``model`` over ``samples``."""
    return operator_path(
        float64_copy(model), subset, samples, REVERSE_OVER_REVERSE, model_input_bs, fused_head
    )


def relative_errors(hv: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """``||hv_k - ref_k|| / ||ref_k||`` per column of ``(n, K)`` blocks (``inf`` for a zero reference with a nonzero
    error, 0 for both zero)."""
    out = []
    for a, b in zip(hv.T, ref.T, strict=True):
        d, r = float((a - b).norm()), float(b.norm())
        out.append(d / r if r > 0 else (0.0 if d == 0 else math.inf))
    return out


@dataclass(frozen=True)
class AuditResult:
    """What the audit measured: ``rel_errors`` (one per product), their max and median, the Frobenius-relative error
    of the whole block, the estimate ``delta_norm`` of ``||H_run - H_64||_F`` on the audit's samples (module
    docstring), the time of each path, and for finite differences ``fd`` (the step, the truncation estimate, the
    ladder of ``--fd_step auto``)."""

    products: int
    audit_b: int
    probes: str
    rel_errors: tuple[float, ...]
    max_rel_error: float
    median_rel_error: float
    frobenius_rel_error: float
    delta_norm: float
    tol: float
    run_path_s: float
    reference_s: float
    columns: tuple[int, ...] | None = None
    fd: dict[str, Any] | None = None
    reference: str = REFERENCE
    other_s: float = 0.0
    """Seconds of the finite-difference extras (the step ladder, the truncation estimate)."""

    @property
    def seconds(self) -> float:
        return self.run_path_s + self.reference_s + self.other_s

    @property
    def exceeds(self) -> bool:
        return not self.max_rel_error <= self.tol

    def line(self) -> str:
        """``audit: 8 products, max rel. error 3.1e-02 against float64 exact``."""
        return (
            f"audit: {self.products} products, max rel. error {self.max_rel_error:.1e} against {self.reference} "
            f"(median {self.median_rel_error:.1e}; {self.audit_b} samples, {self.seconds:.1f}s)"
        )

    def warning(self) -> str | None:
        if not self.exceeds:
            return None
        return (
            f"the audited products are off by up to {self.max_rel_error:.1e} (relative, against {self.reference}), above "
            f"--audit_tol {self.tol:g}: the results were saved, but read them as approximate (float64 or exact products, "
            f"--matmul_precision highest, or another --fd_step bring it down; docs/numerics.md)"
        )

    def as_dict(self, run_s: float | None = None) -> dict[str, Any]:
        """For the JSON's ``audit`` section (``run_s``: the computation's seconds, for the audit's relative cost)."""
        out: dict[str, Any] = {
            "products": self.products,
            "audit_b": self.audit_b,
            "probes": self.probes,
            "reference": f"{self.reference}: double backward of a float64 copy of the model on the same samples",
            "rel_errors": list(self.rel_errors),
            "max_rel_error": self.max_rel_error,
            "median_rel_error": self.median_rel_error,
            "frobenius_rel_error": self.frobenius_rel_error,
            "delta_norm": self.delta_norm,
            "delta_norm_means": (
                "estimate of ||H_run - H_float64||_F on the audit's samples, sqrt(n mean_k ||dH v_k||^2 / ||v_k||^2); it "
                "bounds ||dH||_2 and so the shift of every eigenvalue (Weyl)"
            ),
            "tol": self.tol,
            "exceeds_tol": self.exceeds,
            "seconds": self.seconds,
            "run_path_s": self.run_path_s,
            "reference_s": self.reference_s,
            "fd_extras_s": self.other_s,
            "cost_relative_to_run": (self.seconds / run_s) if run_s else None,
        }
        if self.columns is not None:
            out["columns"] = list(self.columns)
        if self.fd is not None:
            out["fd"] = self.fd
        return out


def _timed(fn: ProductFn, v: torch.Tensor) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = fn(v)
    return torch.as_tensor(out, dtype=torch.float64), time.perf_counter() - t0


def audit_products(
    run_path: ProductFn,
    reference: ProductFn | None,
    vectors: torch.Tensor,
    audit_b: int,
    probes: str = "Rademacher",
    tol: float = DEFAULT_TOL,
    columns: tuple[int, ...] | None = None,
    fd: dict[str, Any] | None = None,
    ref: torch.Tensor | None = None,
) -> AuditResult:
    """Take ``H V`` for ``vectors`` (``(n, K)``) by ``run_path`` and by ``reference`` (or use ``ref``, its products
    already taken) and compare them (module docstring)."""
    n, k = vectors.shape
    hv, run_s = _timed(run_path, vectors)
    ref_s = 0.0
    if ref is None:
        if reference is None:
            raise ValueError("give the reference path or its products ref")
        ref, ref_s = _timed(reference, vectors)
    errs = relative_errors(hv, ref)
    diff = hv - ref
    ref_norm = float(ref.norm())
    sq = (diff.norm(dim=0) ** 2 / (vectors.norm(dim=0) ** 2).clamp_min(1e-300)).mean()
    return AuditResult(
        products=k,
        audit_b=audit_b,
        probes=probes,
        rel_errors=tuple(errs),
        max_rel_error=max(errs),
        median_rel_error=statistics.median(errs),
        frobenius_rel_error=float(diff.norm()) / ref_norm if ref_norm > 0 else math.inf,
        delta_norm=math.sqrt(n * float(sq)),
        tol=tol,
        run_path_s=run_s,
        reference_s=ref_s,
        columns=columns,
        fd=fd,
    )


def matrix_path(h: torch.Tensor) -> ProductFn:
    """``V -> h V`` for a matrix the run already computed (the exact scripts' block, float64 sums): the audit then
    reads the run's own columns and takes no product by the run's path."""
    h = h.to(torch.float64)
    return lambda v: h @ v.to(h.device)


def fd_truncation(d_h: torch.Tensor, d_half: torch.Tensor, h: float) -> dict[str, Any]:
    """The truncation error of central differences at the relative step ``h``, estimated from the products ``d_h`` at
    ``h`` and ``d_half`` at ``h / 2`` of the same vectors (module docstring): ``{relative_step,
    truncation_error_estimate}`` (relative, largest over the vectors; rounding included)."""
    d_h, d_half = d_h.to(torch.float64), d_half.to(torch.float64)
    est = max(relative_errors(d_h + (d_h - d_half) * (4 / 3), d_h))
    return {
        "relative_step": h,
        "truncation_error_estimate": est,
        "estimated_from": "4/3 ||D(h) - D(h/2)|| / ||D(h)||",
    }


def choose_fd_step(
    run_at: Callable[[float], ProductFn],
    reference: torch.Tensor,
    vectors: torch.Tensor,
    dtype: torch.dtype,
    ladder: tuple[float, ...] = FD_LADDER,
) -> tuple[float, list[dict[str, float]]]:
    """``(h, ladder)``: the step of ``ladder`` (those that do not underflow ``dtype``) whose products ``run_at(h)(V)``
    have the smallest largest relative error against ``reference`` (``H V`` in float64); ties: the larger step."""
    rows = []
    for h in ladder:
        if underflow_message(h, dtype) is not None:
            continue
        hv = torch.as_tensor(run_at(h)(vectors), dtype=torch.float64)
        errs = relative_errors(hv, reference)
        rows.append(
            {
                "relative_step": h,
                "max_rel_error": max(errs),
                "median_rel_error": statistics.median(errs),
            }
        )
    if not rows:
        raise ValueError(f"no step of {ladder} is above the machine epsilon of {dtype}")
    best = min(rows, key=lambda r: (r["max_rel_error"], -r["relative_step"]))
    return best["relative_step"], rows


def audit_hessian(
    model: nn.Module,
    subset: Subset,
    samples: torch.Tensor,
    products: Products | None = None,
    hvp: str = "exact",
    fd: FDSettings | None = None,
    k: int = DEFAULT_PRODUCTS,
    probes: str = "rademacher",
    seed: int = 0,
    tol: float = DEFAULT_TOL,
    model_input_bs: int = 1,
) -> AuditResult:
    """The audit as one library call: ``k`` products of the Hessian of the mean NLL over ``samples`` (``(b, seqlen)``)
    w.r.t. ``subset``, by ``model`` (its dtype and the current float32 matmul precision) with ``products`` (default:
    :func:`lib.products.operator.products_for` of ``hvp`` and ``fd``), against exact float64 double backward on the same
    samples. ``probes``: ``"rademacher"`` (``(n, k)`` +-1) or ``"columns"`` (``k`` random columns ``e_i``).

    Args:
        model: a prepared causal LM (any dtype).
        subset: the ``n`` entries of the weights.
        samples: ``(b, seqlen)`` int64 token ids.
        products: the products audited; ``None``: from ``hvp`` and ``fd``.
        hvp: ``"exact"`` or ``"finite_difference"`` (when ``products`` is ``None``).
        fd: the finite-difference settings (``hvp="finite_difference"``), or ``None`` for the defaults.
        k: number of products (vectors).
        probes: ``"rademacher"`` or ``"columns"``.
        seed: seed of the vectors.
        tol: the largest relative error of a product that passes.
        model_input_bs: samples per forward.

    Returns:
        The :class:`AuditResult`: the relative error of each of the ``k`` products, their max and median, the
        Frobenius-relative error, the times.

    Raises:
        ValueError: an unknown ``probes`` or ``hvp``.
    """
    from .operator import products_for

    if probes not in ("rademacher", "columns"):
        raise ValueError(f"probes must be 'rademacher' or 'columns', got {probes!r}")
    products = products_for(hvp, fd) if products is None else products
    n = subset.size
    columns = None
    if probes == "columns":
        vectors, columns = column_vectors(n, k, seed)
    else:
        vectors = rademacher_vectors(n, k, seed)
    return audit_products(
        operator_path(model, subset, samples, products, model_input_bs),
        float64_reference(model, subset, samples, model_input_bs),
        vectors,
        int(samples.shape[0]),
        "Rademacher" if probes == "rademacher" else "columns e_i",
        tol,
        columns,
    )


# ----------------------------------------------------------------------------- the pipeline's hooks


@dataclass
class Plan:
    """What the run's audit does, from its spec and structure: the subset, the vectors and their kind."""

    products: int
    audit_b: int
    tol: float
    subset: Subset | None = None
    probes: str = "Rademacher"
    vectors: torch.Tensor | None = None
    columns: tuple[int, ...] | None = None
    reference: torch.Tensor | None = None
    ladder: list[dict[str, float]] = field(default_factory=list)
    chosen_step: float | None = None
    reference_s: float = 0.0
    ladder_s: float = 0.0
    why_none: str | None = None
    """Why no product is audited (``products == 0``), or why the audit failed after the computation."""


def run_subset(run: Any) -> Subset:
    """The subset whose Hessian the run computes: the structure itself (exact scripts, spectrum), or the whole
    parameters of the diagonal's targets."""
    s = run.structure
    if isinstance(s, Subset):
        return s
    return params_subset(run.model, [target.param_name for target, _, _ in s])


def plan(run: Any) -> Plan:
    """The run's audit settings resolved (:func:`default_products`, :data:`DEFAULT_AUDIT_B`) and its vectors drawn."""
    spec, c = run.spec, run.spec.compute
    fsdp = bool(getattr(c, "fsdp", False))
    k = (
        c.audit
        if c.audit is not None
        else default_products(spec.model.dtype, c.hvp, spec.model.matmul_precision, fsdp)
    )
    split = spec.run.device_map is not None and c.audit is None and k > 0
    b = int(run.samples.shape[0])
    default_b = b if spec.family == "exact" else DEFAULT_AUDIT_B  # exact: the block's own columns
    p = Plan(0 if split else k, min(b, c.audit_b or default_b), c.audit_tol)
    if p.products == 0:
        p.why_none = (
            "not available with --fsdp"
            if fsdp
            else "--device_map: a float64 copy of a split model may not fit; --audit K takes it"
            if split
            else "--audit 0"
            if c.audit == 0
            else "exact products at full precision: nothing to audit"
        )
        return p
    p.subset = run_subset(run)
    need = audit_bytes(run.model, p.subset.size, k)
    free = _free_bytes(run.devices[0])
    if c.audit is None and need > AUDIT_MEMORY_FRACTION * free:
        p.products, p.subset = 0, None
        p.why_none = (
            f"the float64 audit would take about {need / 2**30:.1f} GiB (a float64 copy of the model and its vectors), "
            f"over {AUDIT_MEMORY_FRACTION:.0%} of the free {free / 2**30:.1f} GiB: left out by default; --audit K takes it"
        )
        return p
    seed = derived_seed(spec.get("seed"), "audit")
    if spec.family == "exact":
        p.vectors, p.columns = column_vectors(p.subset.size, k, seed)
        p.probes = "columns e_i of the exact block"
    else:
        p.vectors = rademacher_vectors(p.subset.size, k, seed)
    return p


AUDIT_MEMORY_FRACTION = 0.5
"""A default audit is left out when its float64 copy and vectors would take more than this share of the free memory."""


def audit_bytes(model: nn.Module, n: int, k: int) -> int:
    """About what the audit adds: a float64 copy of the model (none for a float64 model) and a few ``(n, k)`` float64
    blocks (the vectors, both paths' products and their transposes)."""
    params = sum(p.numel() for p in model.parameters())
    copy_bytes = 0 if next(model.parameters()).dtype == torch.float64 else 8 * params
    return copy_bytes + 6 * 8 * n * k


def _free_bytes(device: torch.device) -> int:
    """The free memory of ``device`` (a GPU's), else of the host."""
    from ..app.preflight import available_host_bytes, free_device_bytes

    free = free_device_bytes(device)
    return available_host_bytes() if free is None else min(free, available_host_bytes())


def _audit_model(run: Any) -> nn.Module:
    """The run's model on the run's first device (worker runs keep the parent's copy on the CPU)."""
    device = run.devices[0]
    if run.device == device or getattr(run.model, "hf_device_map", None):
        return run.model
    return copy.deepcopy(run.model).to(device)


def _paths(run: Any, p: Plan) -> tuple[nn.Module, torch.Tensor, int, bool | None]:
    model = _audit_model(run)
    samples = run.samples[: p.audit_b]
    bs = run.spec.data.model_input_bs
    bs = bs if isinstance(bs, int) else 1
    fused = False if run.spec.model.no_fused_head else None
    return model, samples, bs, fused


def prepare(run: Any) -> Plan:
    """Before the computation: the audit's plan, and with ``--fd_step auto`` the step (:func:`choose_fd_step`), set on
    ``run.fd_step`` for :meth:`lib.app.pipeline.Run.products`."""
    p = plan(run)
    if run.spec.compute.fd_step != "auto" or p.products == 0:
        return p
    assert p.subset is not None and p.vectors is not None  # a plan with products has both
    model, samples, bs, fused = _paths(run, p)
    t0 = time.perf_counter()
    p.reference = float64_reference(model, p.subset, samples, bs, fused)(p.vectors)
    p.reference_s = time.perf_counter() - t0
    richardson = run.spec.compute.fd_richardson
    run_at = lambda h: operator_path(  # noqa: E731
        model, p.subset, samples, FiniteDifference(FDSettings(richardson, h)), bs, fused
    )
    p.chosen_step, p.ladder = choose_fd_step(run_at, p.reference, p.vectors, run.dtype)
    p.ladder_s = time.perf_counter() - t0 - p.reference_s
    run.fd_step = p.chosen_step
    return p


def own_block(run: Any, result: Any, audit_b: int) -> torch.Tensor | None:
    """The exact scripts' block as the run computed it (float64 sums / tokens), when the audit uses all its samples:
    the audit then reads the run's own columns. ``None`` otherwise (other families, fewer samples)."""
    if run.spec.family != "exact" or audit_b != int(run.samples.shape[0]):
        return None
    sums, res = result[1], result[2]
    return sums["hessian_sum"] / res.n_tokens


def audit_run(run: Any, p: Plan, result: Any = None) -> AuditResult | None:
    """After the computation (rank 0): the audit of ``p`` (``None`` when it takes no products, or when it failed, e.g.
    the float64 copy ran out of memory: the run's results are saved all the same, ``p.why_none`` says why);
    ``result``: the family's, for the exact scripts' own block (:func:`own_block`)."""
    if p.products == 0:
        return None
    try:
        return _audit(run, p, result)
    except (torch.OutOfMemoryError, RuntimeError, MemoryError) as e:
        p.why_none = f"the audit failed ({type(e).__name__}: {str(e)[:200]}); the results are saved without it"
        if run.devices[0].type == "cuda":
            torch.cuda.empty_cache()
        return None


def _audit(run: Any, p: Plan, result: Any) -> AuditResult:
    assert p.subset is not None and p.vectors is not None  # a plan with products has both
    model, samples, bs, fused = _paths(run, p)
    products = run.products()
    block = None if result is None else own_block(run, result, p.audit_b)
    run_path = (
        operator_path(model, p.subset, samples, products, bs, fused)
        if block is None
        else matrix_path(block)
    )
    hv, run_s = _timed(run_path, p.vectors)
    t0 = time.perf_counter()
    reference, ref_s = p.reference, p.reference_s
    if reference is None:
        reference = float64_reference(model, p.subset, samples, bs, fused)(p.vectors)
        ref_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    fd = None
    s = products.fd_settings
    if (
        s is not None
    ):  # finite differences: the truncation error from a second product at half the step
        h = s.h(run.dtype)
        half = FiniteDifference(FDSettings(s.richardson, h / 2))
        d_half = operator_path(model, p.subset, samples, half, bs, fused)(p.vectors)
        fd = fd_truncation(hv, torch.as_tensor(d_half, dtype=torch.float64), h)
        if p.ladder:
            fd.update(auto=True, ladder=p.ladder)
    fd_s = time.perf_counter() - t1 + p.ladder_s
    res = audit_products(
        lambda v: hv, None, p.vectors, p.audit_b, p.probes, p.tol, p.columns, fd, ref=reference
    )
    return dataclasses.replace(res, run_path_s=run_s, reference_s=ref_s, other_s=fd_s)


def eigenvalue_bounds(fields: dict[str, Any], audit: AuditResult | None) -> dict[str, Any] | None:
    """For a spectrum's JSON (``eigenvalues`` and ``residuals`` in ``fields``): ``|lambda - lambda_exact| <= r_i +
    ||dH||``, the Ritz residual (an eigenvalue of the run's ``H`` lies within it) plus the audit's ``delta_norm``
    (0 when no audit ran: exact products)."""
    if "eigenvalues" not in fields or "residuals" not in fields:
        return None
    delta = 0.0 if audit is None else audit.delta_norm
    return {
        "bounds": [float(r) + delta for r in fields["residuals"]],
        "residual_part": list(fields["residuals"]),
        "product_error_part": delta,
        "how": (
            "|lambda_i - lambda_i(exact H)| <= residual_i + ||H_run - H_exact||_2, the latter estimated by the audit's "
            "delta_norm (Frobenius, on its samples; 0 without an audit: exact products)"
        ),
    }


def diagonal_error(audit: AuditResult, n: int) -> dict[str, Any]:
    """What the audited product error does to a diagonal estimate over ``n`` entries: for Rademacher probes
    ``E ||d_run - d_64||^2 = ||diag dH||^2 + ||offdiag dH||_F^2 / K <= ||dH||_F^2`` (Hutchinson; XDiag alike), so the
    audit's ``delta_norm`` bounds the l2 error the products add, ``delta_norm / sqrt(n)`` per entry (root mean
    square). The estimator's own sampling error is separate (``--track_rows`` measures it against exact entries)."""
    return {
        "l2_bound": audit.delta_norm,
        "per_entry_rms_bound": audit.delta_norm / math.sqrt(n) if n else None,
        "how": (
            "E||d_run - d_float64||^2 <= ||H_run - H_float64||_F^2 for Rademacher probes (Hutchinson, XDiag): the "
            "audit's delta_norm bounds the l2 error the products add (on the audit's samples); the estimator's own "
            "sampling error is separate"
        ),
    }


def json_fields(run: Any, fields: dict[str, Any], run_s: float | None) -> dict[str, Any]:
    """The JSON's ``audit`` section (``{"products": 0, ...}`` when none ran) and, for a spectrum, the eigenvalues'
    error bounds."""
    audit = getattr(run, "audit", None)
    p = getattr(run, "audit_plan", None)
    if audit is not None:
        out: dict[str, Any] = {"audit": audit.as_dict(run_s)}
    else:
        why = p.why_none if p is not None else None
        out = {"audit": {"products": 0, "why": why or "no audit"}}
    bounds = eigenvalue_bounds(fields, audit)
    if bounds is not None:
        out["eigenvalue_error_bounds"] = bounds
    if (
        audit is not None
        and run.spec.family == "diagonal"
        and p is not None
        and p.subset is not None
    ):
        out["diagonal_product_error"] = diagonal_error(audit, p.subset.size)
    return out


def report_lines(run: Any) -> list[str]:
    """The printed line of the audit (none without one); the warning above ``--audit_tol`` goes to stderr."""
    from ..model.inputs import warn

    audit = getattr(run, "audit", None)
    p = getattr(run, "audit_plan", None)
    if audit is None:
        if p is not None and p.products and p.why_none:
            warn(p.why_none)
        return []
    warning = audit.warning()
    if warning is not None:
        warn(warning)
    return [audit.line()]


def subtitle(audit: AuditResult | None) -> str:
    """What figure titles add when an audit ran: ``audited: max rel. error X``."""
    return "" if audit is None else f"; audited: max rel. error {audit.max_rel_error:.1e}"
