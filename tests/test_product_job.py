"""The one product job (lib.products.operator.ProductJob): every job's products go through it, and through its ``products`` hook."""

from __future__ import annotations

import torch
from conftest import LAYER, tiny_ids, tiny_model

from lib.hessian.curvature import CurvatureJob
from lib.hessian.diagonal import DiagonalJob, Target, hessian_diagonal, plan_phase1
from lib.hessian.exact import ExactHessianJob, hessian_rev_rev
from lib.objective import subsets
from lib.objective.loss import SubsetLoss
from lib.products.base import Products
from lib.products.operator import (
    REVERSE_OVER_REVERSE,
    BatchGraph,
    HessianOperator,
    HVPJob,
    ProductJob,
    digest,
)
from lib.runtime.jobs import run_serial

CPU = torch.device("cpu")


class Counted(Products):
    """The default products, counted (a strategy object as another product method would be)."""

    name = "counted"

    def __init__(self):
        self.vectors = 0

    def graph(self, fn, x0):
        return REVERSE_OVER_REVERSE.graph(fn, x0)

    def __call__(self, graph, rows, count, sink, chunk, progress=None, start=0):
        self.vectors += count - start
        return REVERSE_OVER_REVERSE(graph, rows, count, sink, chunk, progress, start)


class CentralDifferences(Products):
    """``H v ~ (grad f(x + e v) - grad f(x - e v)) / (2 e)``: a product method without a kept graph."""

    name = "central_differences"

    def __init__(self, eps: float = 1e-4):
        self.eps, self.fn = eps, None

    def graph(self, fn, x0):
        x = x0.detach().clone().requires_grad_(True)
        value = fn(x)
        (g,) = torch.autograd.grad(value, x)
        self.fn = fn
        return BatchGraph(x.detach(), g, value.detach())

    def _grad(self, x):
        x = x.detach().clone().requires_grad_(True)
        return torch.autograd.grad(self.fn(x), x)[0]

    def __call__(self, graph, rows, count, sink, chunk, progress=None, start=0):
        for a in range(start, count):
            v = rows(a, a + 1).to(graph.x)
            hv = (self._grad(graph.x + self.eps * v[0]) - self._grad(graph.x - self.eps * v[0])) / (
                2 * self.eps
            )
            sink(a, v, hv[None])
        return chunk


def _setup():
    model = tiny_model("opt")
    subset = subsets.single_layer_single_block(model, LAYER["opt"], 0, 6)
    return model, subset, tiny_ids(b=4)


def test_every_job_is_a_product_job_with_the_same_batching_and_identity():
    model, subset, ids = _setup()
    target = Target("model.decoder.layers.0.self_attn.q_proj.bias", (16,))
    jobs = [
        ExactHessianJob(subset, ids, model_input_bs=3, model=model),
        HVPJob(
            subset,
            ids,
            torch.zeros(2, subset.size, dtype=torch.float64),
            model_input_bs=3,
            model=model,
        ),
        DiagonalJob(
            plan_phase1([target], ["hutchinson"], 2, 0), ids, model_input_bs=3, model=model
        ),
        CurvatureJob(subset, ids, ["ggn"], model_input_bs=3, model=model),
    ]
    for job in jobs:
        assert isinstance(job, ProductJob)
        assert (
            job.num_units() == 2
            and job.describe_unit(1) == "samples 3..5"
            and torch.equal(job.batch(1), ids[3:])
        )
        cfg = job.config()
        assert (
            cfg["samples_sha256"] == digest(ids)
            and cfg["model_input_bs"] == 3
            and cfg["products"] == "exact"
        )
    assert len({job.config()["kind"] for job in jobs}) == 4


def test_the_exact_job_equals_hessian_rev_rev_bitwise():
    model, subset, ids = _setup()
    sums = run_serial(ExactHessianJob(subset, ids, chunk=2, model=model), CPU)
    objective = SubsetLoss(model, subset)
    expect = sum(
        hessian_rev_rev(lambda x, r=row: objective(x, r[None]), objective.x0(), chunk=2)[0].double()
        for row in ids
    )
    assert torch.equal(sums["hessian_sum"], expect)


def test_every_job_computes_its_products_through_the_products_hook():
    model, subset, ids = _setup()
    n = subset.size
    ref = run_serial(ExactHessianJob(subset, ids, chunk=1, model=model), CPU)["hessian_sum"]
    counted = Counted()
    h = run_serial(ExactHessianJob(subset, ids, chunk=1, model=model, products=counted), CPU)[
        "hessian_sum"
    ]
    assert torch.equal(h, ref) and counted.vectors == n * len(ids)
    counted = Counted()
    op = HessianOperator(model, subset, ids, chunk=1, keep_graphs=False, products=counted)
    assert torch.allclose(op @ torch.eye(n, dtype=torch.float64), ref / (4 * 7), rtol=1e-12, atol=0)
    assert counted.vectors == n * len(ids)
    counted = Counted()
    target = Target("model.decoder.layers.0.self_attn.q_proj.bias", (16,))
    diagonal = lambda **products: hessian_diagonal(  # noqa: E731
        model,
        [target],
        ids,
        estimators=("hutchinson", "xdiag", "exact"),
        hvps=4,
        chunk=1,
        **products,
    )
    a, b = diagonal(products=counted), diagonal()
    assert all(
        torch.equal(a.diagonals[e][target.param_name], b.diagonals[e][target.param_name])
        for e in a.diagonals
    )
    assert counted.vectors == (4 + 16 + 2) * len(
        ids
    )  # probes (shared by hutchinson and xdiag), entries, xdiag's basis


def test_an_alternative_product_method_plugs_into_the_exact_job():
    model, subset, ids = _setup()
    ref = run_serial(ExactHessianJob(subset, ids, model=model), CPU)["hessian_sum"]
    job = ExactHessianJob(subset, ids, model=model, products=CentralDifferences())
    h = run_serial(job, CPU)["hessian_sum"]
    assert job.config()["products"] == "central_differences"
    err = float((h - ref).norm() / ref.norm())
    assert 0 < err < 1e-6, err


def test_the_compare_job_holds_its_exact_job_and_adds_to_its_sums():
    model, subset, ids = _setup()
    exact = ExactHessianJob(subset, ids, model_input_bs=2, chunk=1, model=model)
    job = CurvatureJob.beside(exact, ["ggn", "diag"])
    assert job.exact is exact and not isinstance(job, ExactHessianJob)
    sums = run_serial(job, CPU)
    alone = run_serial(ExactHessianJob(subset, ids, model_input_bs=2, chunk=1, model=model), CPU)
    assert torch.equal(sums["hessian_sum"], alone["hessian_sum"]) and set(sums) == {
        "hessian_sum",
        "nll_sum",
        "ggn_sum",
    }
    assert (
        job.steps_per_unit() == 2 * subset.size
    )  # the exact rows, then one Jacobian column per entry
    assert (
        job.config()["kind"] == "exact_hessian+curvature"
        and job.config()["method"] == exact.config()["method"]
    )
