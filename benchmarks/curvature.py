"""Benchmark (not a test): cost of the curvature approximations on the embedded model, interleaved in one process.

1. **One Gauss-Newton-vector product** (:class:`lib.hessian.curvature.GGNOperator`: one JVP by double backward +
   one VJP) against one Hessian-vector product on a retained gradient graph, per sample, for the whole
   block-0 ``q_proj`` weight (16384 entries) -- the per-probe cost of ``hessian_diagonal.py --estimator
   ggn`` against ``hutchinson``; the one-off set-up per sample (graph building) is reported separately.
2. **``--compare`` overhead**: one work unit (sample) of the exact Hessian job against the same unit with
   every approximation (``t`` entries of row 0), which adds ``t`` Jacobian columns, the sampled labels and
   ``2 * perturbations`` forward passes.

    OMP_NUM_THREADS=1 python benchmarks/curvature.py
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.hessian.curvature import CurvatureJob, GGNOperator, rounding_perturbations  # noqa: E402
from lib.hessian.diagonal import rademacher_probes  # noqa: E402
from lib.hessian.exact import ExactHessianJob  # noqa: E402
from lib.model.data import load_samples  # noqa: E402
from lib.model.models import load_model  # noqa: E402
from lib.objective import subsets  # noqa: E402
from lib.objective.loss import SubsetLoss  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument(
        "--reps", type=int, default=5, help="interleaved repetitions; the minimum is reported"
    )
    p.add_argument("--t", type=int, default=32)
    p.add_argument("--perturbations", type=int, default=64)
    args = p.parse_args()
    model = load_model("embedded")
    ids = load_samples("embedded", seqlen=args.seqlen, b=1)
    name = "model.decoder.layers.0.self_attn.q_proj.weight"
    obj = SubsetLoss(model, subsets.whole_parameter(model, name))
    x0 = obj.x0()
    z = rademacher_probes(x0.numel(), 0, name, 0, 1, x0.dtype)[0]

    best = {
        k: math.inf for k in ("hvp_setup", "hvp", "ggn_setup", "ggn", "exact_unit", "compare_unit")
    }
    sub = subsets.single_layer_single_block(model, "self_attn.q_proj", 0, args.t)
    d, _ = rounding_perturbations(model, sub, args.perturbations, 4, 0)
    exact = ExactHessianJob(sub, ids, model=model)
    compare = CurvatureJob(
        sub, ids, ["ggn", "fisher", "empirical_fisher", "gptq", "kfac", "diag"], 4, d, model=model
    )
    exact.setup(torch.device("cpu"))
    compare.setup(torch.device("cpu"))
    for _ in range(args.reps):
        state = {}

        def hvp_setup():
            x = x0.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(obj(x, ids), x, create_graph=True)
            state.update(x=x, g=g)

        best["hvp_setup"] = min(best["hvp_setup"], timed(hvp_setup))
        best["hvp"] = min(
            best["hvp"],
            timed(
                lambda: torch.autograd.grad(
                    state["g"], state["x"], grad_outputs=z, retain_graph=True
                )
            ),
        )
        state.clear()
        best["ggn_setup"] = min(
            best["ggn_setup"], timed(lambda: state.update(op=GGNOperator(obj, x0, ids)))
        )
        best["ggn"] = min(best["ggn"], timed(lambda: state["op"].matvec(z)))
        state.clear()
        best["exact_unit"] = min(best["exact_unit"], timed(lambda: exact.run_unit(0)))
        best["compare_unit"] = min(best["compare_unit"], timed(lambda: compare.run_unit(0)))
    print(
        f"embedded model, seqlen {args.seqlen}, one sample, threads {torch.get_num_threads()}, min of {args.reps} interleaved reps"
    )
    print(
        f"whole block-0 q_proj ({x0.numel()} entries): HVP {best['hvp']:.4f} s (graph {best['hvp_setup']:.4f} s); GGN-vector product {best['ggn']:.4f} s (set-up {best['ggn_setup']:.4f} s); ratio GGN/HVP {best['ggn'] / best['hvp']:.2f}"
    )
    print(
        f"t={args.t}: exact Hessian unit {best['exact_unit']:.3f} s; with --compare (all, 4 draws, {args.perturbations} perturbations) {best['compare_unit']:.3f} s; ratio {best['compare_unit'] / best['exact_unit']:.2f}"
    )


if __name__ == "__main__":
    main()
