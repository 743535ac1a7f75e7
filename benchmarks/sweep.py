"""Benchmark (not a test): every linear layer's trace and top eigenvalue, one sweep against per-layer loops.

On the bundled model (4 blocks x 6 linear layers = 24 weights), ``--b`` samples of ``--seqlen`` tokens, float32, the
Hessian of the mean next-token NLL w.r.t. each layer's weight: its trace to ``--trace_rel`` relative standard error
(the sweep chooses the shared or per-unit estimator; the peers then run per-layer Hutchinson with the number of probes
that reaches the standard error the sweep achieved on that layer, from its measured per-unit variance: equal error)
and its top eigenvalue to a Ritz residual below ``--tol`` of it (each method's worst residual is measured and
reported; PyHessian's power iteration stops on ``--pyhessian_tol`` relative change instead):

* **sweep**: :func:`lib.hessian.sweep.sweep` (one model, one set of samples, per-unit probes, Lanczos ``tol``);
* **project loop**: what a user's loop over layers does with this project's library: per layer, load the model and
  the samples, build ``lib.HessianOperator`` on the layer, :func:`lib.spectrum.algorithms.hutchinson_trace` and
  :func:`lib.spectrum.algorithms.lanczos` (the process start-up of a loop of ``hessian_spectrum.py`` runs is not counted);
* **PyHessian**: per layer, only that weight requiring grad, ``hessian(...)`` on one batch of all samples,
  ``trace(maxIter=probes, tol=0)`` and ``eigenvalues(tol=--pyhessian_tol)`` (power iteration; a second row with
  ``tol=1e-8``, nearer the 1e-3 residual: PyHessian's float32 power iteration stalls above it on some layers, and it
  converges to the eigenvalue of largest magnitude, which is not the top one on indefinite blocks: listed as
  ``not_the_top``);
* **hessian-eigenthings 1.0.0a5**: per layer, ``HessianOperator(param_filter=match_names(layer))``,
  ``hutchinson(num_samples=probes)`` and ``lanczos(k=1, which="LA", max_iter=--eig_steps)``.

Rounds are interleaved (one run of each method per round, ``--rounds``) on one thread; min and median wall seconds
are reported with the load average (the machine may be shared).

    OMP_NUM_THREADS=1 python benchmarks/sweep.py            # about 2 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lib  # noqa: E402
from lib.hessian import sweep as sw  # noqa: E402
from lib.objective.subsets import params_subset  # noqa: E402
from lib.spectrum import algorithms as spectrum  # noqa: E402


class LogitsOf(nn.Module):
    """The model as ``input_ids -> logits of the predicted positions`` (``(b (s - 1), V)``), for PyHessian."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        return logits[:, :-1].reshape(-1, logits.shape[-1])


def layer_names(model) -> list[str]:
    return [p for u in sw.make_units(model, "layer") for p in (u.slices[0].param_name,)]


def run_sweep(args) -> dict:
    model = lib.load_model("embedded")
    samples = lib.load_samples("embedded", seqlen=args.seqlen, b=args.b)
    units = sw.make_units(model, "layer")
    s = sw.SweepSettings(
        trace_rel=args.trace_rel,
        min_probes=args.min_probes,
        max_probes=args.max_probes,
        tol=args.tol,
        max_iter=200,
        model_input_bs=args.b,
        trace_estimator=args.trace_estimator,
    )
    r = sw.sweep(model, samples, units, ["trace", "top"], s)
    tops = [x for x in r.rows if x.quantity == "top"]
    traces = [x for x in r.rows if x.quantity == "trace"]
    # equal error: the per-unit Hutchinson probes that reach each unit's achieved standard error
    args.sweep_tops = {
        u.slices[0].param_name: r.value(u.name, "top").estimate for u in units
    }  # to tell which eigenvalue PyHessian's power iteration found
    var_p = r.trace["variance_per_unit"]
    cap = args.peer_cap or math.inf  # default none: every layer at the sweep's error (equal error)
    # 1 / se^2 from m samples overestimates 1 / sigma^2 by (m - 1) / (m - 3) (normal samples): corrected, so the
    # peers are not handed more probes than the sweep's true error needs (m: the trace's products, an upper bound)
    args.unit_probes = [
        int(min(max(math.ceil(v / t.error**2 * (t.hvps - 3) / (t.hvps - 1)), args.min_probes), cap))
        for v, t in zip(var_p, traces)
    ]
    return {
        "hvps": r.hvps,
        "peer_probes": sum(args.unit_probes),
        "trace_estimator": r.trace["chosen"],
        "trace_rel_stderr_max": max(t.error / abs(t.estimate) for t in traces),
        "residual": max(x.error / abs(x.estimate) for x in tops),
    }


def run_project_loop(args) -> dict:
    names = layer_names(lib.load_model("embedded"))
    hvps, worst = 0, 0.0
    for name, k in zip(names, args.unit_probes):
        model = lib.load_model("embedded")
        samples = lib.load_samples("embedded", seqlen=args.seqlen, b=args.b)
        subset = params_subset(model, [name])
        op = lib.HessianOperator(model, subset, samples, model_input_bs=args.b)
        spectrum.hutchinson_trace(op.matmat, subset.size, k, seed=1)
        e = spectrum.lanczos(
            op.matmat, subset.size, 1, tol=args.tol, max_iter=200, eigenvectors=False
        )
        hvps += op.hvps
        worst = max(worst, float(e.residuals[0] / e.eigenvalues[0].abs()))
    return {"hvps": hvps, "residual": worst}


def run_pyhessian(args, tol: float | None = None) -> dict:
    import pyhessian

    ph = sys.modules["pyhessian.hessian"]  # the module (the package's attribute is the class)
    from pyhessian.utils import hessian_vector_product

    count = [0]

    def counted(*a):
        count[0] += 1
        return hessian_vector_product(*a)

    ph.hessian_vector_product = counted  # PyHessian's products, counted

    model = lib.load_model("embedded")
    samples = lib.load_samples("embedded", seqlen=args.seqlen, b=args.b)
    wrapped = LogitsOf(model)
    data = (samples, samples[:, 1:].reshape(-1))
    worst, untimed, other = 0.0, 0.0, []
    tops = getattr(args, "sweep_tops", {})
    for name, k in zip(layer_names(model), args.unit_probes):
        p = model.get_parameter(name)
        p.requires_grad_(True)
        torch.manual_seed(0)  # PyHessian's random probes and start vector: the same every round
        h = pyhessian.hessian(wrapped, nn.CrossEntropyLoss(), data=data, cuda=False)
        h.trace(maxIter=k, tol=0.0)
        vals, vecs = h.eigenvalues(maxIter=1000, tol=tol or args.pyhessian_tol)
        t0 = time.perf_counter()
        hv = hessian_vector_product(h.gradsH, h.params, vecs[0])  # the residual: not timed
        res = float(sum(((a - vals[0] * b) ** 2).sum() for a, b in zip(hv, vecs[0])).sqrt())
        worst = max(worst, res / abs(vals[0]))
        top = tops.get(name)
        if top is not None and abs(vals[0] - top) > 1e-2 * abs(top):
            other.append(
                f"{name}: {vals[0]:.4g} (top {top:.4g})"
            )  # power iteration: largest |eigenvalue|
        untimed += time.perf_counter() - t0
        p.requires_grad_(False)
        del h
    ph.hessian_vector_product = hessian_vector_product
    return {"hvps": count[0], "residual": worst, "untimed": untimed, "not_the_top": other}


def run_eigenthings(args) -> dict:
    import hessian_eigenthings as he

    model = lib.load_model("embedded")
    samples = lib.load_samples("embedded", seqlen=args.seqlen, b=args.b)
    data = [{"input_ids": samples, "labels": samples}]
    hvps, worst = 0, 0.0
    for name, k in zip(layer_names(model), args.unit_probes):
        p = model.get_parameter(name)
        p.requires_grad_(True)  # hessian-eigenthings selects among the trainable parameters
        op = he.HessianOperator(model, data, he.hf_lm_loss(), param_filter=he.match_names(name))
        he.hutchinson(op, num_samples=k, seed=1)
        r = he.lanczos(
            op, k=1, which="LA", max_iter=args.eig_steps, tol=args.tol, reorthogonalize=True, seed=0
        )
        hvps += k + args.eig_steps
        p.requires_grad_(False)
        worst = max(worst, float(r.residuals[0] / r.eigenvalues[0].abs()))
    return {"hvps": hvps, "residual": worst}


METHODS = {
    "sweep (lib.hessian.sweep)": run_sweep,
    "project loop (HessianOperator + spectrum per layer)": run_project_loop,
    "PyHessian (one layer at a time)": run_pyhessian,
    "PyHessian, tol 1e-8 (one layer at a time; residuals nearer 1e-3)": lambda a: run_pyhessian(
        a, 1e-8
    ),
    "hessian-eigenthings 1.0.0a5 (param_filter per layer)": run_eigenthings,
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--b", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--trace_rel", type=float, default=0.05)
    ap.add_argument("--trace_estimator", default="auto", choices=sw.TRACE_ESTIMATORS)
    ap.add_argument("--min_probes", type=int, default=10)
    ap.add_argument("--max_probes", type=int, default=100)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--pyhessian_tol", type=float, default=1e-6)
    ap.add_argument(
        "--peer_cap",
        type=int,
        default=None,
        help="cap the peers' probes per layer (default none: the sweep's error on every layer; 400 before "
        "2026-12-07, which left the peers at a larger error than the sweep's on the hardest layers)",
    )
    ap.add_argument("--eig_steps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lib.load_model("embedded")  # imports and file cache warm before any timing
    import hessian_eigenthings  # noqa: F401
    import pyhessian  # noqa: F401

    times: dict[str, list[float]] = {m: [] for m in args.methods}
    info: dict[str, dict] = {}
    for _ in range(args.rounds):
        for m in args.methods:
            t0 = time.perf_counter()
            out = METHODS[m](args)
            times[m].append(time.perf_counter() - t0 - out.pop("untimed", 0.0))
            info[m] = out
            print(f"{m}: {times[m][-1]:.1f}s {out}", flush=True)
    base = min(times[args.methods[0]])
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, 1 thread",
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "config": vars(args),
        "methods": {
            m: {
                "min_s": min(t),
                "median_s": statistics.median(t),
                "x_sweep": min(t) / base,
                **info[m],
            }
            for m, t in times.items()
        },
    }
    print(json.dumps(result, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
