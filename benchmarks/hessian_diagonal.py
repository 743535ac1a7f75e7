"""Benchmark (not a test): Hessian-diagonal estimators on the embedded model's block-0 ``q_proj`` (128 x 128).

1. **Cost of one probe**, per sample: a plain forward+backward, building the gradient graph (forward +
   ``create_graph`` backward), one Hessian-vector product (HVP) on that retained graph (``--probe_batch``
   1 and 8), and the original's approach, ``torch.autograd.functional.vhp`` per probe (a fresh forward
   and double backward every time, plain autograd through the LM head as in the original, and with
   the fused head).
2. **Ground truth**: the exact Hessian ``H`` of the whole weight (16384 x 16384) over ``--b`` samples,
   one HVP per entry and sample (cached in ``--cache``; about 10 minutes per sample on one CPU core).
3. **Check** that the estimators of :mod:`lib.hessian.diagonal` run through the real job equal the same
   estimators applied to the explicit ``H`` with the same probes (so step 4 measures the real thing).
4. **HVPs per sample needed to reach a relative l2 error** of 0.25 and 0.1 (``--targets``), for
   ``hutchinson`` (measured up to ``--k_max`` and, beyond, the exact expectation
   ``E err^2 = sum_{i!=j} H_ij^2 / (k ||diag H||^2)``, checked against the measurement), ``xdiag``
   (measured; root-mean-square over ``--seeds`` seeds), the original's balanced-block probes (their
   bias is an error floor), ``empirical_fisher`` (one number) and ``exact`` (n HVPs).

    OMP_NUM_THREADS=1 python benchmarks/hessian_diagonal.py   # b=2, seqlen 128: ~25 min the first time (20 for H), ~4 min from the cache
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.hessian.diagonal import (
    Target,
    hessian_diagonal,
    offdiagonal_error,
    rademacher_probes,
    rel_l2,
    xdiag_basis,
    xdiag_estimate,
)  # noqa: E402
from lib.model.data import load_samples  # noqa: E402
from lib.model.models import load_model  # noqa: E402
from lib.objective import subsets  # noqa: E402
from lib.objective.loss import SubsetLoss  # noqa: E402


def best_time(fn, reps: int) -> float:
    """Fastest of ``reps`` calls (seconds)."""
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def probe_costs(model, name: str, samples: torch.Tensor, reps: int) -> dict[str, float]:
    """Seconds per sample for a forward+backward, the graph, one HVP with graph reuse, and the original's vhp per probe."""
    fused = SubsetLoss(model, subsets.whole_parameter(model, name))
    plain = SubsetLoss(model, subsets.whole_parameter(model, name), fused_head=False)
    x0 = fused.x0()
    ids = samples[:1]
    n = x0.numel()
    z = rademacher_probes(n, 0, name, 0, 8, x0.dtype)

    def fwd_bwd():
        x = x0.clone().requires_grad_(True)
        torch.autograd.grad(fused(x, ids), x)

    def graph():
        x = x0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fused(x, ids), x, create_graph=True)
        return x, g

    x, g = graph()
    out = {
        "forward_backward_s": best_time(fwd_bwd, reps),
        "graph_s": best_time(graph, reps),
        "probe_s": best_time(
            lambda: torch.autograd.grad(g, x, grad_outputs=z[0], retain_graph=True), reps * 3
        ),
        "probe_batch8_s": best_time(
            lambda: torch.autograd.grad(
                g, x, grad_outputs=z, retain_graph=True, is_grads_batched=True
            ),
            reps,
        )
        / 8,
        "original_vhp_s": best_time(
            lambda: torch.autograd.functional.vhp(lambda v: plain(v, ids), x0, z[0]), reps
        ),
        "vhp_fused_head_s": best_time(
            lambda: torch.autograd.functional.vhp(lambda v: fused(v, ids), x0, z[0]), reps
        ),
    }
    return out


def exact_hessian(model, name: str, samples: torch.Tensor) -> torch.Tensor:
    """``H = sum_s H_s`` (summed-NLL scale, float32, ``(n, n)``): row ``i`` is the HVP with ``e_i`` on each sample's graph."""
    objective = SubsetLoss(model, subsets.whole_parameter(model, name))
    x0 = objective.x0()
    n = x0.numel()
    h = torch.zeros(n, n, dtype=torch.float32)
    e = torch.zeros(n, dtype=x0.dtype)
    t0 = time.perf_counter()
    for s in range(samples.shape[0]):
        x = x0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(objective(x, samples[s : s + 1]), x, create_graph=True)
        for i in range(n):
            e.zero_()
            e[i] = 1
            (row,) = torch.autograd.grad(g, x, grad_outputs=e, retain_graph=True)
            h[i] += row.float()
            if i % 2048 == 0:
                print(
                    f"  exact Hessian: sample {s}, row {i}/{n}, {time.perf_counter() - t0:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
        del g, x
    return (h + h.T) / 2


def balanced_block_probes(n: int, m: int, block: int, gen: torch.Generator) -> torch.Tensor:
    """The original's probes (``(n, m)``): each contiguous block of ``block`` entries is a random permutation of
    ``block/2`` times +1 and ``block/2`` times -1 (entries of a block are negatively correlated: biased)."""
    base = torch.cat([torch.ones(block // 2), -torch.ones(block // 2)])
    idx = torch.argsort(torch.rand(m, n // block, block, generator=gen), dim=-1)
    return base[idx].reshape(m, n).T.contiguous()


def rms(rows: list[list[float]]) -> list[float]:
    return [math.sqrt(sum(r[i] ** 2 for r in rows) / len(rows)) for i in range(len(rows[0]))]


def first_below(ks: list[int], errs: list[float], target: float) -> float | None:
    """Smallest ``k`` with ``err <= target``, interpolated log-log between grid points; ``None`` if never."""
    for i, (k, e) in enumerate(zip(ks, errs)):
        if e <= target:
            if i == 0:
                return float(k)
            k0, e0 = ks[i - 1], errs[i - 1]
            u = (math.log(target) - math.log(e0)) / (math.log(e) - math.log(e0))
            return math.exp(math.log(k0) + u * (math.log(k) - math.log(k0)))
    return None


def grid(k_max: int, step: int) -> list[int]:
    out, k = [], step
    while k <= k_max:
        out.append(k)
        k = max(k + step, int(k * 1.25) // step * step)
    return out if out[-1] == k_max else out + [k_max]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--b", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--layer_name", default="self_attn.q_proj")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--k_max", type=int, default=2048, help="largest HVP budget measured per estimator"
    )
    p.add_argument("--targets", type=float, nargs="+", default=[0.25, 0.1])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cache", default="results/benchmark_hessian_diagonal_H.pt")
    p.add_argument("--output", default="results/benchmark_hessian_diagonal.json")
    args = p.parse_args()
    torch.manual_seed(0)
    model = load_model("embedded")
    samples = load_samples("embedded", seqlen=args.seqlen, b=args.b)
    name, _ = subsets.layer_module(model, 0, args.layer_name)
    shape = tuple(model.get_parameter(name).shape)
    n = math.prod(shape)
    report: dict = {
        "model": "embedded",
        "param": name,
        "numel": n,
        "b": args.b,
        "seqlen": args.seqlen,
        "threads": torch.get_num_threads(),
    }

    print("1. cost per sample (best of reps)")
    costs = probe_costs(model, name, samples, args.reps)
    fb = costs["forward_backward_s"]
    report["costs"] = costs
    for k, v in costs.items():
        print(f"  {k:22s} {v * 1e3:8.1f} ms  = {v / fb:5.2f} x forward+backward")
    for k in (100, 1000):
        ours = costs["graph_s"] + k * costs["probe_s"]
        print(
            f"  K={k}: original vhp per probe {k * costs['original_vhp_s']:.1f}s vs graph reuse {ours:.1f}s per sample: {k * costs['original_vhp_s'] / ours:.2f}x faster"
        )
        report[f"speedup_vs_original_K{k}"] = k * costs["original_vhp_s"] / ours

    print("2. exact Hessian of the whole weight")
    cache = Path(args.cache)
    key = {"param": name, "b": args.b, "seqlen": args.seqlen, "samples": samples.tolist()}
    h = None
    if cache.exists():
        stored = torch.load(cache, weights_only=True)
        if stored.get("key") == json.dumps(key):
            h, report["exact_hessian_s"] = stored["H"], float(stored["elapsed_s"])
            print(f"  loaded {cache} (computed in {report['exact_hessian_s']:.0f}s)")
    if h is None:
        t0 = time.perf_counter()
        h = exact_hessian(model, name, samples)
        report["exact_hessian_s"] = time.perf_counter() - t0
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": json.dumps(key), "H": h, "elapsed_s": report["exact_hessian_s"]}, cache)
        print(f"  {n} x {args.b} HVPs in {report['exact_hessian_s']:.0f}s; cached in {cache}")
    d = h.diagonal().double()
    ratio = offdiagonal_error(h)
    report["offdiag_over_diag"] = ratio
    print(
        f"  ||offdiag||_F / ||diag|| = {ratio:.2f}  (Hutchinson RMS relative error = {ratio:.2f} / sqrt(k))"
    )
    ev = torch.linalg.eigvalsh(h).double()
    e2 = (ev.abs().sort(descending=True).values ** 2).cumsum(0)
    tail = {r: math.sqrt(1 - float(e2[r - 1] / e2[-1])) for r in (1, 16, 128, 512)}
    report["spectrum_tail"] = tail
    report["negative_eigenvalue_mass"] = float((ev[ev < 0] ** 2).sum() / (ev**2).sum())
    print(
        "  ||H - H_r||_F / ||H||_F for the best rank r: "
        + ", ".join(f"r={r}: {v:.3f}" for r, v in tail.items())
    )

    print("3. the job equals the estimators on the explicit H with the same probes")
    k_check = 16
    res = hessian_diagonal(
        model,
        [Target(name, shape)],
        samples,
        estimators=("hutchinson", "xdiag"),
        hvps=k_check,
    )
    om = rademacher_probes(n, 0, name, 0, k_check).float().T
    hz = h @ om
    hut = (om * hz).mean(1).double()
    q, r = xdiag_basis(hz[:, : k_check // 2].T)
    xd = xdiag_estimate(om[:, : k_check // 2], q, (h @ q.float()).double(), r)
    check = {
        "hutchinson": rel_l2(res.diagonals["hutchinson"][name].reshape(-1) * res.n_tokens, hut),
        "xdiag": rel_l2(res.diagonals["xdiag"][name].reshape(-1) * res.n_tokens, xd),
    }
    report["job_vs_matrix_rel_diff"] = check
    print("  relative difference: " + ", ".join(f"{k} {v:.1e}" for k, v in check.items()))

    print(f"4. relative l2 error vs HVPs per sample ({args.seeds} seeds, RMS)")
    ks_h = list(range(1, args.k_max + 1))
    hut_rows, bb_rows, xd_rows = [], [], []
    ks_x = grid(args.k_max, 2)
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        om = rademacher_probes(n, 1000 + seed, name, 0, args.k_max).float().T
        hz = h @ om
        run = (om * hz).double().cumsum(1) / torch.arange(1, args.k_max + 1, dtype=torch.float64)
        hut_rows.append([rel_l2(run[:, k - 1], d) for k in ks_h])
        s = args.k_max // 2
        q, r = xdiag_basis(hz[:, :s].T)
        z = (h @ q.float()).double()
        omd = om[:, :s].double()
        xd_rows.append([rel_l2(xdiag_estimate(omd, q, z, r, k // 2), d) for k in ks_x])
        bb = balanced_block_probes(n, args.k_max, 32, torch.Generator().manual_seed(seed))
        run = (bb * (h @ bb)).double().cumsum(1) / torch.arange(
            1, args.k_max + 1, dtype=torch.float64
        )
        bb_rows.append([rel_l2(run[:, k - 1], d) for k in ks_h])
        print(f"  seed {seed}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    hut, xd, bb = rms(hut_rows), rms(xd_rows), rms(bb_rows)
    theory = [ratio / math.sqrt(k) for k in ks_h]
    agree = [m / t for m, t in zip(hut, theory)]
    # bias of the original's probes: E[z_i z_j] = -1/(B-1) within a block of B = 32 consecutive entries
    blk = (
        h.view(n // 32, 32, n // 32, 32).diagonal(dim1=0, dim2=2).permute(2, 0, 1).double()
    )  # (blocks, 32, 32)
    bias = -(blk.sum(-1) - blk.diagonal(dim1=1, dim2=2)) / 31
    floor = float(bias.reshape(-1).norm() / d.norm())
    fisher = (
        hessian_diagonal(model, [Target(name, shape)], samples, estimators=("empirical_fisher",))
        .diagonals["empirical_fisher"][name]
        .reshape(-1)
    )
    fisher_err = rel_l2(fisher, d / (args.b * (args.seqlen - 1)))
    table = {}
    for target in args.targets:
        row = {
            "hutchinson": (ratio / target) ** 2,
            "hutchinson_measured": first_below(ks_h, hut, target),
            "xdiag": first_below(ks_x, xd, target),
            "original_balanced_probes": first_below(ks_h, bb, target),
            "exact": n,
        }
        row["hutchinson_over_xdiag"] = row["hutchinson"] / row["xdiag"] if row["xdiag"] else None
        table[str(target)] = row
    report.update(
        hutchinson_rms={"k": ks_h, "err": hut, "theory": theory},
        xdiag_rms={"k": ks_x, "err": xd},
        original_balanced_rms={"k": ks_h, "err": bb, "bias_floor": floor},
        hutchinson_measured_over_theory={
            "min": min(agree),
            "max": max(agree),
            "at_k_max": agree[-1],
        },
        fisher_rel_error=fisher_err,
        hvps_to_reach=table,
    )
    print(
        f"  hutchinson measured / theory over k=1..{args.k_max}: {min(agree):.2f}..{max(agree):.2f}"
    )
    hut_at, bb_at = dict(zip(ks_h, hut)), dict(zip(ks_h, bb))
    for k, e in list(zip(ks_x, xd))[::4] + [(ks_x[-1], xd[-1])]:
        print(
            f"  K={k:5d}: hutchinson {hut_at[k]:.3f} (theory {ratio / math.sqrt(k):.3f}), xdiag {e:.3f}, original probes {bb_at[k]:.3f}"
        )
    print(
        f"  original's balanced-block probes: bias floor {floor:.3f}; fisher relative error {fisher_err:.3f}"
    )
    print(
        f"  {'target':>8s} {'hutchinson':>11s} {'(measured)':>11s} {'xdiag':>8s} {'ratio':>7s} {'original':>9s} {'exact':>7s}"
    )
    fmt = lambda v: "never" if v is None else f"{v:.0f}"  # noqa: E731
    for t, row in table.items():
        print(
            f"  {t:>8s} {fmt(row['hutchinson']):>11s} {fmt(row['hutchinson_measured']):>11s} {fmt(row['xdiag']):>8s} {row['hutchinson_over_xdiag'] or float('nan'):7.1f} {fmt(row['original_balanced_probes']):>9s} {n:7d}"
        )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
