"""Benchmark: the default exact Hessian against the report's ``torch.autograd.functional.hessian`` and curvlinops.

Every case runs three methods on the same samples, **interleaved in one process** (one run of each per round,
``--rounds`` rounds; min, median and the per-round ratios are printed, the slowest round's ratio included):

* **report**: the report's method, ``torch.autograd.functional.hessian`` of the plain loss (Hugging Face logits,
  ``cross_entropy``), one sample per call (its ``model_input_bs`` 1), summed over the samples;
* **curvlinops** 3.0.1: ``HessianLinearOperator`` (forward-over-reverse, vmapped over the columns, in blocks of
  ``--peer_block``) on the subset's weight with ``CrossEntropyLoss(reduction="sum")``, applied to the unit vectors of
  the subset's entries (the rows of those entries are the block);
* **default**: this project with its defaults, the whole job as the scripts run it (:class:`lib.hessian.exact.ExactHessianJob`:
  ``model_input_bs`` auto, chunk measured on the first batch, products through the layer outputs where fewer);

and reports the max relative difference of each to the default's Hessian. Cases (``--cases``):

* ``embedded32`` / ``embedded128``: the bundled model, the first 32 / 128 weights of row 0 of block-0 ``q_proj``, b 4, seqlen 128;
* ``tiny400``: all 400 weights of block-0 ``q_proj`` of a tiny random OPT (hidden 20, 2 blocks, vocab 64), b 2, seqlen 32;
* ``opt125m768``: the OPT-125M architecture with random weights (``OPTConfig()``, no download), the whole first row
  of block-0 ``q_proj`` (768 weights, the report's Fig. 1a subset), b 1, seqlen 128. The report's method and curvlinops
  take 13-40 minutes per run here, so by default they are timed on their first ``--extrapolate`` rows / columns
  (after their one-time set-up: the gradient graph, the operator) and scaled linearly to 768 (both cost the same per
  row; ``--extrapolate 0`` runs them in full); the default always runs in full;
* ``block0``, ``block6``, ``blocks12``: the earlier OPT-125M cases (``--t`` entries of ``q_proj`` in block 0, 6, all 12), b 1.

    OMP_NUM_THREADS=1 python benchmarks/exact_hessian.py                    # about 30 minutes on a 2-core CPU
    OMP_NUM_THREADS=1 python benchmarks/exact_hessian.py --cases embedded32 --rounds 9
    python benchmarks/exact_hessian.py --device cuda --rounds 3          # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.hessian.exact import ExactHessianJob  # noqa: E402
from lib.model.data import load_samples  # noqa: E402
from lib.model.models import load_model, prepare_model  # noqa: E402
from lib.objective import subsets  # noqa: E402
from lib.objective.loss import SubsetLoss  # noqa: E402
from lib.products.operator import gradient_graph  # noqa: E402
from lib.runtime.jobs import run_serial  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spectrum import LogitsOf  # noqa: E402 -- input_ids (1, s) -> next-token logits (s-1, V)


def opt(**config) -> nn.Module:
    """An OPT model with random weights from ``OPTConfig(**config)`` (seed 0, eager attention, frozen)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(**config)
    cfg._attn_implementation = "eager"
    return prepare_model(OPTForCausalLM(cfg))


def tiny400() -> tuple[nn.Module, subsets.Subset, torch.Tensor]:
    """A tiny random OPT (hidden 20, 2 blocks, vocab 64), all 400 weights of its block-0 ``q_proj``, and 2 random
    samples of 32 tokens (seed 0)."""
    model = opt(
        vocab_size=64,
        hidden_size=20,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=40,
        max_position_embeddings=64,
        word_embed_proj_dim=20,
    )
    subset = subsets.make_subset(
        subsets.from_indices(
            model,
            "model.decoder.layers.0.self_attn.q_proj.weight",
            [[i, j] for i in range(20) for j in range(20)],
        )
    )
    return model, subset, torch.randint(3, 64, (2, 32), generator=torch.Generator().manual_seed(0))


@dataclass
class Case:
    model: nn.Module
    subset: subsets.Subset
    samples: torch.Tensor
    extrapolate: int = 0
    """Time the peers on this many rows / columns and scale to the subset's size (0: run them in full)."""


def make_case(name: str, t: int, extrapolate: int, device: torch.device) -> Case:
    """The case's model and samples on ``device``."""
    case = _make_case(name, t, extrapolate)
    case.model.to(device)
    case.samples = case.samples.to(device)
    return case


def _make_case(name: str, t: int, extrapolate: int) -> Case:
    g = torch.Generator().manual_seed(0)
    if name.startswith("embedded"):
        model = load_model("embedded")
        return Case(
            model,
            subsets.single_layer_single_block(
                model, "self_attn.q_proj", 0, int(name[len("embedded") :])
            ),
            load_samples("embedded", 128, 4),
        )
    if name == "tiny400":
        return Case(*tiny400())
    model = opt()  # the OPT-125M architecture: 12 blocks, hidden 768, vocab 50272
    ids = torch.randint(3, model.config.vocab_size, (1, 128), generator=g)
    if name == "opt125m768":
        return Case(
            model,
            subsets.single_layer_single_block(model, "self_attn.q_proj", 0, 768),
            ids,
            extrapolate,
        )
    if name in ("block0", "block6"):
        return Case(
            model,
            subsets.single_layer_single_block(model, "self_attn.q_proj", int(name[5:]), t),
            ids,
        )
    if name == "blocks12":
        return Case(
            model, subsets.single_layer_several_blocks(model, "self_attn.q_proj", 12, t), ids
        )
    raise SystemExit(f"unknown case {name!r}")


def default(case: Case) -> torch.Tensor:
    """This project's exact Hessian with its defaults (summed over the samples)."""
    job = ExactHessianJob(
        case.subset, case.samples, model_input_bs=_auto_bs(case), model=case.model
    )
    out = run_serial(job, case.samples.device)["hessian_sum"]
    default.report = {
        "chunk": job.chunk_report(),
        "products": job.products_report(),
        "model_input_bs": job.model_input_bs,
    }  # type: ignore[attr-defined]
    return out


def _auto_bs(case: Case) -> int:
    """``--model_input_bs auto`` as the scripts resolve it."""
    from lib.products.autotune import samples_per_forward

    b, s = case.samples.shape
    return samples_per_forward("auto", case.model, b, s, case.subset.size, case.samples.device)[0]


def report_method(case: Case) -> torch.Tensor:
    """The report's ``torch.autograd.functional.hessian`` of the plain loss, per sample (or its first rows, see ``extrapolate``)."""
    plain = SubsetLoss(case.model, case.subset, fused_head=False)
    x0 = plain.x0().detach()
    total = 0
    for i in range(case.samples.shape[0]):
        fn = lambda x, i=i: plain(x, case.samples[i : i + 1])  # noqa: E731
        if not case.extrapolate:
            total = total + torch.autograd.functional.hessian(fn, x0)
            continue
        # what hessian(vectorize=False) does: the gradient with create_graph, then one backward per row
        x, g, _ = gradient_graph(fn, x0)
        rows = [torch.autograd.grad(g[r], x, retain_graph=True)[0] for r in range(case.extrapolate)]
        total = total + torch.stack(rows)
    return total


def curvlinops_method(case: Case, block: int) -> torch.Tensor:
    """curvlinops' ``HessianLinearOperator`` on each slice's weight applied to the subset's unit vectors, ``block`` columns at a time."""
    from curvlinops import HessianLinearOperator

    names = list(dict.fromkeys(case.subset.param_names))
    params = [case.model.get_parameter(n) for n in names]
    for p in params:
        p.requires_grad_(True)
    try:
        data = [(s[None], s[1:]) for s in case.samples]
        op = HessianLinearOperator(
            LogitsOf(case.model),
            nn.CrossEntropyLoss(reduction="sum"),
            params,
            data,
            check_deterministic=False,
        )
        offsets = dict(
            zip(names, [0, *torch.tensor([p.numel() for p in params]).cumsum(0).tolist()])
        )
        flat = torch.cat([s.flat_index + offsets[s.param_name] for s in case.subset.slices])
        cols = flat[: case.extrapolate] if case.extrapolate else flat
        out = []
        for a in range(0, len(cols), block):
            e = torch.zeros(op.shape[1], len(cols[a : a + block]), device=case.samples.device)
            e[cols[a : a + block], torch.arange(e.shape[1])] = 1
            out.append((op @ e)[flat].T)
        return torch.cat(out)
    finally:
        for p in params:
            p.requires_grad_(False)


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    """``(fn(), wall seconds, this thread's CPU seconds)`` (CUDA synchronized)."""
    t0, c0 = time.perf_counter(), time.thread_time()
    out = fn()
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return out, time.perf_counter() - t0, time.thread_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cases", default="embedded32,embedded128,tiny400,opt125m768")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--t",
        type=int,
        default=32,
        help="entries per block for the block0 / block6 / blocks12 cases",
    )
    p.add_argument(
        "--extrapolate",
        type=int,
        default=64,
        help="opt125m768: time the report's method and curvlinops on this many rows / columns and scale (0: in full)",
    )
    p.add_argument(
        "--peer_block", type=int, default=32, help="curvlinops columns per vmapped product"
    )
    p.add_argument("--no_curvlinops", action="store_true")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()}",
        flush=True,
    )
    rows = []
    for name in args.cases.split(","):
        case = make_case(
            name, args.t, args.extrapolate if name == "opt125m768" else 0, torch.device(args.device)
        )
        n = case.subset.size
        scale = n / case.extrapolate if case.extrapolate else 1.0
        methods: dict[str, Callable[[], torch.Tensor]] = {
            "report": lambda c=case: report_method(c),
            "default": lambda c=case: default(c),
        }
        if not args.no_curvlinops:
            methods["curvlinops"] = lambda c=case: curvlinops_method(c, args.peer_block)
        default(case) if n <= 128 else None  # warm-up (allocator, kernels) on the small cases
        times: dict[str, list[float]] = {m: [] for m in methods}
        cpu: dict[str, list[float]] = {m: [] for m in methods}
        out: dict[str, torch.Tensor] = {}
        for rnd in range(args.rounds):
            for m, fn in methods.items():
                out[m], dt, dc = timed(fn)
                times[m].append(dt * (scale if m != "default" else 1.0))
                cpu[m].append(dc * (scale if m != "default" else 1.0))
            print(
                f"{name} round {rnd}: "
                + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in methods)
                + f" (load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
        h = out["default"]
        rows_cmp = h[: len(out["report"])] if case.extrapolate else h
        diffs = {
            m: float((out[m].to(h) - rows_cmp).abs().max() / rows_cmp.abs().max())
            for m in methods
            if m != "default"
        }
        med = {m: statistics.median(v) for m, v in times.items()}
        ratio = {
            m: [a / d for a, d in zip(times[m], times["default"])]
            for m in methods
            if m != "default"
        }
        cpu_ratio = {
            m: statistics.median(a / d for a, d in zip(cpu[m], cpu["default"]))
            for m in methods
            if m != "default"
        }
        rows.append((name, n, case, med, cpu_ratio, ratio, diffs, dict(default.report)))  # type: ignore[attr-defined]
        print(f"  {name}: default {default.report}; max rel diff {diffs}", flush=True)  # type: ignore[attr-defined]
    print(
        "\n| case | n | samples x seqlen | report (s, median) | curvlinops (s, median) | default (s, median) | report / default: median (slowest round) | curvlinops / default: median (slowest round) | CPU-time ratios report, curvlinops (median) | max rel diff report, curvlinops |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, n, case, med, cpu_ratio, ratio, diffs, _rep in rows:
        b, s = case.samples.shape
        cl = f"{med['curvlinops']:.2f}" if "curvlinops" in med else "-"
        rc = (
            f"{statistics.median(ratio['curvlinops']):.2f}x ({min(ratio['curvlinops']):.2f}x)"
            if "curvlinops" in ratio
            else "-"
        )
        ext = f" (peers: {case.extrapolate} rows, scaled)" if case.extrapolate else ""
        print(
            f"| {name}{ext} | {n} | {b} x {s} | {med['report']:.2f} | {cl} | {med['default']:.2f} | {statistics.median(ratio['report']):.2f}x ({min(ratio['report']):.2f}x) | {rc} | {cpu_ratio['report']:.2f}x, {cpu_ratio.get('curvlinops', float('nan')):.2f}x | {diffs.get('report', float('nan')):.1e}, {diffs.get('curvlinops', float('nan')):.1e} |"
        )
    print(
        f"\nload average at the end {os.getloadavg()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


if __name__ == "__main__":
    main()
