"""Benchmark (not a test): whole-model Hessians past one device -- finite-difference vs exact HVPs, one process vs FSDP
ranks, side by side with hessian-eigenthings' finite-difference operator; and the finite-difference error on the
embedded model.

Sections (``--sections``, default all):

* ``errors`` -- the embedded model (OPT architecture, ReLU), ``--b`` samples of 128 tokens: relative error
  ``||Hv_fd - Hv|| / ||Hv||`` of one finite-difference product (central and Richardson; float64, float32, bf16;
  eager attention, and fused SDPA in float32) against the exact float64 HVP, for block-0 ``q_proj`` (16,384
  entries) and the whole model; with the kink-aware step's retries and crossings.
* ``hvp`` -- the OPT-125M architecture with random weights (``OPTConfig()`` with an untied head, so that every
  operator computes the same matrix: 163.8M parameters), seqlen 128, ``--scale_b`` samples, float32, every
  parameter (``--params '*'``): wall time of one HVP, exact (double backward) vs this project's finite difference
  vs hessian-eigenthings 1.0.0a5's ``HessianOperator(method="finite_difference")``, interleaved in one process for
  ``--rounds`` rounds (medians); peak resident memory of each in its own subprocess (sampled ``/proc/self/statm``).
* ``top5`` -- top-5 eigenvalues by Lanczos without reorthogonalization (3 vectors; ``--max_iter`` steps) on that
  model: this project in one process, hessian-eigenthings' ``lanczos`` on its finite-difference operator.
* ``fsdp`` -- the same HVP and top-5 under ``torchrun --nproc_per_node 2`` with ``--fsdp``'s operator (gloo),
  per-rank wall and peak resident memory.
* ``eig_errors`` -- the top-3 eigenvalues of block-0 ``q_proj`` by Lanczos on finite-difference products against exact ones.

    OMP_NUM_THREADS=1 python benchmarks/scale.py            # about an hour on the shared 2-core CPU

Results go to ``benchmarks/scale_results.json`` (``--out``); ``benchmarks/README.md`` has the tables.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib.objective.subsets import params_subset  # noqa: E402
from lib.products import finite_difference as fd  # noqa: E402
from lib.products.operator import HessianOperator, gradient_graph, hvp_rows  # noqa: E402
from lib.spectrum import algorithms as spectrum  # noqa: E402
from lib.spectrum import vectors  # noqa: E402

F64 = torch.float64
Q_PROJ = "model.decoder.layers.0.self_attn.q_proj.weight"


class PeakRSS:
    """Resident memory of this process sampled every ``period`` seconds while active: ``base`` (at entry) and ``peak``."""

    def __init__(self, period: float = 0.005):
        self.period, self.base, self.peak, self._stop = period, 0, 0, threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.period)

    def __enter__(self) -> PeakRSS:
        trim()
        self.base = self.peak = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def trim() -> None:
    """Return freed heap memory to the OS (glibc), so that resident memory measures what is alive."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover
        pass


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------- errors on the embedded model


def errors(b: int) -> dict:
    from lib.model.data import load_samples
    from lib.model.models import load_model
    from lib.objective.loss import SubsetLoss

    samples = load_samples("embedded", 128, b)
    out: dict = {}
    for name, globs in (("q_proj block 0", [Q_PROJ]), ("whole model", ["*"])):
        m64 = load_model("embedded", dtype=F64)
        subset = params_subset(m64, globs)
        obj = SubsetLoss(m64, subset)
        x0 = obj.x0()
        v = torch.randn(x0.numel(), dtype=F64, generator=torch.Generator().manual_seed(0))
        ref = torch.zeros_like(x0)
        for i in range(b):
            x, g, _ = gradient_graph(lambda z: obj(z, samples[i : i + 1]), x0)
            ref += hvp_rows(g, x, v[None])[0].detach()
        del m64, obj
        rows = []
        for dtype, attn in (
            (F64, "eager"),
            (torch.float32, "eager"),
            (torch.float32, "sdpa"),
            (torch.bfloat16, "eager"),
        ):
            model = load_model("embedded", dtype=dtype, attn_implementation=attn)
            o = SubsetLoss(model, params_subset(model, globs), double_backward=False)
            xd = o.x0()
            for rich in (False, True):
                hv, stats = torch.zeros_like(ref), fd.FDStats()
                with fd.KinkMonitor(model) as mon:
                    for i in range(b):
                        grad = fd.gradient_of(lambda z: o(z, samples[i : i + 1]))
                        part, _, st = fd.fd_products(
                            grad, xd, v[None], fd.FDSettings(rich), monitor=mon
                        )
                        hv += part[0].double()
                        stats.add(st)
                row = {
                    "dtype": str(dtype).removeprefix("torch."),
                    "attention": attn,
                    "richardson": rich,
                    "relative_error": rel(hv, ref),
                    **stats.to_json(),
                }
                rows.append(row)
                print(name, row, flush=True)
            del model, o
        out[name] = {"n": int(x0.numel()), "rows": rows}
    return out


def eigen_errors(b: int, max_iter: int = 60) -> dict:
    """Top-3 eigenvalues of block-0 ``q_proj``'s Hessian by Lanczos on finite-difference products (float64, float32,
    bf16; eager and fused SDPA) against exact float64 products, all to ``tol = 1e-6`` or ``max_iter`` passes."""
    from lib.model.data import load_samples
    from lib.model.models import load_model

    samples = load_samples("embedded", 128, b)
    rows = []
    ref = None
    for dtype, attn, hvp in (
        (F64, "eager", "exact"),
        (F64, "eager", "finite_difference"),
        (torch.float32, "eager", "finite_difference"),
        (torch.float32, "sdpa", "finite_difference"),
        (torch.bfloat16, "eager", "finite_difference"),
    ):
        model = load_model("embedded", dtype=dtype, attn_implementation=attn)
        subset = params_subset(model, [Q_PROJ])
        op = HessianOperator(model, subset, samples, hvp=hvp)
        r = spectrum.lanczos(op.matmat, subset.size, 3, tol=1e-6, max_iter=max_iter, seed=0)
        if ref is None:
            ref = r.eigenvalues
        row = {
            "dtype": str(dtype).removeprefix("torch."),
            "attention": attn,
            "hvp": hvp,
            "eigenvalues": r.eigenvalues.tolist(),
            "max_relative_error": float(((r.eigenvalues - ref).abs() / ref.abs()).max()),
            "passes": r.passes,
        }
        rows.append(row)
        print(row, flush=True)
    return {"subset": "q_proj block 0", "rows": rows}


# ----------------------------------------------------------------------------- OPT-125M architecture


def build(seed: int = 0):
    """OPT-125M's architecture (``OPTConfig()`` defaults) with an untied head, random weights, float32, every parameter trainable."""
    from transformers import OPTConfig, OPTForCausalLM

    from lib.model.models import prepare_model

    torch.manual_seed(seed)
    model = prepare_model(OPTForCausalLM(OPTConfig(tie_word_embeddings=False)))
    model.requires_grad_(
        True
    )  # hessian-eigenthings differentiates w.r.t. trainable parameters; ours ignores the flag
    return model


def samples_for(b: int, seqlen: int = 128, vocab: int = 50272) -> torch.Tensor:
    return torch.randint(2, vocab, (b, seqlen), generator=torch.Generator().manual_seed(1))


def eigenthings_fd(model, samples):
    import hessian_eigenthings as he

    data = [{"input_ids": s[None], "labels": s[None]} for s in samples]
    return he.HessianOperator(model, data, he.hf_lm_loss(), method="finite_difference")


def operators(model, samples):
    """``{name: (matvec of a float32 vector, what)}`` for the three HVPs of the ``hvp`` section."""
    subset = params_subset(model, ["*"])
    exact = HessianOperator(model, subset, samples, keep_graphs=False)
    ours = HessianOperator(model, subset, samples, hvp="finite_difference")
    theirs = eigenthings_fd(model, samples)
    return {
        "exact (double backward)": lambda v: exact.matvec(v.double()).float(),
        "this project, finite difference": lambda v: ours.matvec(v.double()).float(),
        "hessian-eigenthings, finite difference": lambda v: theirs.matvec(v),
    }, ours


def probe(n: int) -> torch.Tensor:
    v = torch.randn(n, generator=torch.Generator().manual_seed(2))
    return v / v.norm()


def hvp_section(b: int, rounds: int) -> dict:
    model = build()
    samples = samples_for(b)
    n = sum(p.numel() for p in model.parameters())
    ops, ours = operators(model, samples)
    v = probe(n)
    times: dict[str, list[float]] = {k: [] for k in ops}
    results: dict[str, torch.Tensor] = {}
    for name, mv in ops.items():  # warm-up (each operator's one-time setup), not timed
        results[name] = mv(v)
    for r in range(rounds):
        for name, mv in ops.items():
            t0 = time.perf_counter()
            results[name] = mv(v)
            times[name].append(time.perf_counter() - t0)
            print(f"round {r}: {name} {times[name][-1]:.1f}s", flush=True)
    exact = results["exact (double backward)"]
    out = {"n": n, "b": b, "seqlen": 128, "rounds": rounds, "loadavg_after": os.getloadavg()}
    for name in ops:
        out[name] = {
            "wall_s": times[name],
            "median_s": statistics.median(times[name]),
            "relative_difference_to_exact": rel(results[name], exact),
        }
    out["this project, finite difference"]["kink_steps"] = ours.fd_stats.to_json()
    for name, key in (
        ("exact (double backward)", "exact"),
        ("this project, finite difference", "ours"),
        ("hessian-eigenthings, finite difference", "eigenthings"),
    ):
        out[name]["memory"] = measure_in_subprocess(key, b)
    return out


def measure_in_subprocess(kind: str, b: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--measure", kind, "--scale_b", str(b)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    if proc.returncode:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(kind: str, b: int) -> dict:
    """One HVP of ``kind`` in this (fresh) process: resident memory before and at its peak."""
    model = build()
    samples = samples_for(b)
    n = sum(p.numel() for p in model.parameters())
    ops, _ = operators(model, samples)
    name = {
        "exact": "exact (double backward)",
        "ours": "this project, finite difference",
        "eigenthings": "hessian-eigenthings, finite difference",
    }[kind]
    v = probe(n)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        ops[name](v)
        wall = time.perf_counter() - t0
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "base_rss": rss.base,
        "peak_rss": rss.peak,
        "growth": rss.peak - rss.base,
        "model_bytes": model_bytes,
        "wall_s": wall,
    }


def top5_section(b: int, max_iter: int, tol: float) -> dict:
    import hessian_eigenthings as he

    model = build()
    samples = samples_for(b)
    subset = params_subset(model, ["*"])
    n = subset.size
    op = HessianOperator(model, subset, samples, hvp="finite_difference")
    out = {}
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        r = spectrum.lanczos(
            op.matmat,
            n,
            5,
            tol=tol,
            max_iter=max_iter,
            seed=0,
            reorth="none",
            eigenvectors=False,
            space=vectors.local_space(n, dtype=torch.float32),
        )
        wall = time.perf_counter() - t0
    out["this project, finite difference, one process"] = {
        "eigenvalues": r.eigenvalues.tolist(),
        "passes": r.passes,
        "converged": r.converged.tolist(),
        "ghosts_removed": r.ghosts,
        "wall_s": wall,
        "per_pass_s": wall / r.passes,
        "peak_rss": rss.peak,
        "base_rss": rss.base,
        "kink_steps": op.fd_stats.to_json(),
    }
    print(out, flush=True)
    theirs = eigenthings_fd(model, samples)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        res = he.lanczos(
            theirs, k=5, which="LA", max_iter=max_iter, tol=tol, reorthogonalize=False, seed=0
        )
        wall = time.perf_counter() - t0
    vals = torch.as_tensor(res.eigenvalues, dtype=F64).sort(descending=True).values
    out["hessian-eigenthings, finite difference, one process"] = {
        "eigenvalues": vals.tolist(),
        "passes": max_iter,
        "wall_s": wall,
        "per_pass_s": wall / max_iter,
        "peak_rss": rss.peak,
        "base_rss": rss.base,
    }
    print(out, flush=True)
    return out


# ----------------------------------------------------------------------------- FSDP ranks (run under torchrun)


def fsdp_worker(b: int, rounds: int, max_iter: int, tol: float, out_path: str) -> None:
    import torch.distributed as dist

    from lib.products import fsdp

    model = build()
    samples = samples_for(b)
    subset = params_subset(model, ["*"])
    device = torch.device("cpu")
    fsdp.init(device)
    fsdp.shard(model, subset, device)
    trim()
    op = fsdp.ShardedOperator(model, subset, samples, 1, fd.FDSettings(), device, torch.float32)
    v = op.space.random(1, seed=2, kind="gaussian")
    v = v / float(op.space.colnorms(v)[0])
    walls = []
    with PeakRSS() as rss:
        for _ in range(rounds):
            t0 = time.perf_counter()
            op.matmat(v)
            walls.append(time.perf_counter() - t0)
    hvp = {
        "wall_s": walls,
        "median_s": statistics.median(walls),
        "base_rss": rss.base,
        "peak_rss": rss.peak,
    }
    with PeakRSS() as rss2:
        t0 = time.perf_counter()
        r = spectrum.lanczos(
            op.matmat,
            op.n,
            5,
            tol=tol,
            max_iter=max_iter,
            seed=0,
            reorth="none",
            eigenvectors=False,
            space=op.space,
        )
        wall = time.perf_counter() - t0
    top = {
        "eigenvalues": r.eigenvalues.tolist(),
        "passes": r.passes,
        "converged": r.converged.tolist(),
        "wall_s": wall,
        "per_pass_s": wall / r.passes,
        "peak_rss": rss2.peak,
        "base_rss": rss2.base,
    }
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(
        per_rank,
        {
            "rank": dist.get_rank(),
            "hvp": hvp,
            "top5": top,
            "memory": op.memory.to_json(),
            "entries": op.space.local,
        },
    )
    if dist.get_rank() == 0:
        Path(out_path).write_text(
            json.dumps(
                {
                    "world_size": dist.get_world_size(),
                    "ranks": per_rank,
                    "kink_steps": op.stats.to_json(),
                },
                indent=1,
            )
        )
    dist.barrier()
    dist.destroy_process_group()


def fsdp_section(b: int, rounds: int, max_iter: int, tol: float, ranks: int) -> dict:
    out = Path(ROOT / "benchmarks" / f".scale_fsdp_{ranks}.json")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(ranks),
        __file__,
        "--fsdp_worker",
        "--scale_b",
        str(b),
        "--rounds",
        str(rounds),
        "--max_iter",
        str(max_iter),
        "--tol",
        str(tol),
        "--worker_out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr[-3000:]}
    res = json.loads(out.read_text())
    out.unlink()
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", default=["errors", "eig_errors", "hvp", "top5", "fsdp"])
    p.add_argument("--b", type=int, default=2, help="samples for the embedded model's errors")
    p.add_argument(
        "--scale_b",
        type=int,
        default=2,
        help="samples of 128 tokens for the OPT-125M-architecture runs",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max_iter", type=int, default=30)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "scale_results.json"))
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    p.add_argument("--fsdp_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker_out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.scale_b)))
        return {}
    if args.fsdp_worker:
        fsdp_worker(args.scale_b, args.rounds, args.max_iter, args.tol, args.worker_out)
        return {}
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    for section in args.sections:
        t0 = time.perf_counter()
        started = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "loadavg_before": os.getloadavg(),
        }
        if section == "errors":
            res = errors(args.b)
        elif section == "eig_errors":
            res = eigen_errors(args.b)
        elif section == "hvp":
            res = hvp_section(args.scale_b, args.rounds)
        elif section == "top5":
            res = top5_section(args.scale_b, args.max_iter, args.tol)
        elif section == "fsdp":
            res = fsdp_section(args.scale_b, args.rounds, args.max_iter, args.tol, args.ranks)
        else:
            raise SystemExit(f"unknown section {section}")
        results[section] = {
            **started,
            "loadavg_after": os.getloadavg(),
            "section_s": time.perf_counter() - t0,
            **res,
        }
        path.write_text(json.dumps(results, indent=1))
        print(f"{section} done in {time.perf_counter() - t0:.0f}s", flush=True)
    return results


if __name__ == "__main__":
    main()
