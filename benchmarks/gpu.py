"""Benchmark on one GPU: the OPT-125M architecture (random weights, no download) at the report's seqlen 2048.

Prints, per measurement, one line as it finishes and a Markdown table at the end (the device, torch and CUDA
versions, the date). Each part is skipped once ``--budget_s`` seconds have passed, so the whole run fits a
short lease:

1. **per Hessian column**, the report's method (``torch.autograd.functional.hessian``'s algorithm on the plain
   loss: the gradient with ``create_graph``, then one backward per row, timed on ``--report_rows`` rows after the
   graph is built) against this project's :class:`lib.hessian.exact.ExactHessianJob` on ``--t`` entries of row 0 of
   block-0 ``q_proj``, with the chunk measured (``auto``) and fixed (``--chunks``); the peak GPU memory of each;
2. **the report's Fig. 1a configuration** (t=768, seqlen 2048) on ``--fig1a_samples`` samples with the defaults:
   seconds per sample, and that rate extrapolated to the WikiText-2 test split (140 samples of 2048 tokens with
   OPT's tokenizer; the report: 29,338 s on 4 A100s);
3. **diagonal probes per second** (Hutchinson, the whole of block-0 ``q_proj``), ``--probe_batch`` auto vs 1;
4. **variants of one Hessian column** (``--parts variants``): double backward in float32 (the default), with TF32
   matrix products, forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``), and in bfloat16, each per
   column and with its max relative difference to the float32 columns; then the top CUDA kernels of two
   float32 columns (``torch.profiler``).

    python benchmarks/gpu.py --device cuda                 # about 4 minutes on one H200
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from exact_hessian import opt  # noqa: E402 -- OPTForCausalLM(OPTConfig(**config)), seed 0, eager, frozen

from lib.hessian.diagonal import Target, hessian_diagonal  # noqa: E402
from lib.hessian.exact import ExactHessianJob  # noqa: E402
from lib.objective import subsets  # noqa: E402
from lib.objective.loss import SubsetLoss  # noqa: E402
from lib.products.operator import gradient_graph  # noqa: E402
from lib.runtime.jobs import run_serial  # noqa: E402

WIKITEXT2_TEST_SAMPLES = 140
"""WikiText-2's test split in OPT's tokenizer: 287,645 tokens, 140 full samples of 2048 (what ``--b`` takes by
default: full samples only, as in ``benchmarks/gpu_estimate.py``)."""
REPORT_FIG1A_S = 29_338.0
"""The report's Fig. 1a wall time over the test split on 4 A100s."""


def measured(device: torch.device, fn: Callable[[], object]) -> tuple[object, float, float]:
    """``(fn(), seconds, peak GiB allocated during fn)``, synchronized."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = float("nan")
    return out, time.perf_counter() - t0, peak


def report_columns(model, subset, ids, rows: int) -> tuple[float, float]:
    """The report's method on one sample: ``(graph seconds, seconds per row)`` over ``rows`` rows."""
    plain = SubsetLoss(model, subset, fused_head=False)
    x0 = plain.x0().detach()
    dev = ids.device
    (x, g, _), t_graph, _ = measured(dev, lambda: gradient_graph(lambda x: plain(x, ids), x0))
    _, t_rows, _ = measured(
        dev, lambda: [torch.autograd.grad(g[r], x, retain_graph=True)[0] for r in range(rows)]
    )
    return t_graph, t_rows / rows


def exact_job(
    model, subset, ids, chunk: int | None
) -> tuple[ExactHessianJob, torch.Tensor, float, float]:
    """This project's exact Hessian over ``ids`` (one sample per forward): ``(job, H, seconds, peak GiB)``."""
    job = ExactHessianJob(subset, ids, model_input_bs=1, chunk=chunk, model=model)
    out, dt, peak = measured(ids.device, lambda: run_serial(job, ids.device)["hessian_sum"])
    return job, out, dt, peak


def add(rows: list[tuple[str, str, str, str]], *cells: str) -> None:
    """Append one table row (what, seconds, rate, peak GiB) and print it as it comes."""
    rows.append(tuple(cells))  # type: ignore[arg-type]
    print(" | ".join(cells), flush=True)


def variants(model, ids: torch.Tensor, t: int, cols: int) -> list[tuple[str, str, str, str]]:
    """Per-column time and error of the ways to take ``H e_j`` (section 4)."""
    import copy

    from torch.func import grad, jvp

    dev = ids.device
    sub = subsets.single_layer_single_block(model, "self_attn.q_proj", 0, t)
    eye = torch.eye(t, device=dev)[:cols]

    def rev_rev(m, dtype=torch.float32) -> torch.Tensor:
        s = subsets.single_layer_single_block(m, "self_attn.q_proj", 0, t)
        f = SubsetLoss(m, s)
        x, g, _ = gradient_graph(lambda x: f(x, ids), f.x0().detach())
        return torch.stack(
            [torch.autograd.grad(g, x, v.to(dtype), retain_graph=True)[0] for v in eye]
        ).float()

    def fwd_rev() -> torch.Tensor:
        plain = SubsetLoss(model, sub, fused_head=False)
        x0 = plain.x0().detach()
        gfn = grad(lambda x: plain(x, ids))
        return torch.stack([jvp(gfn, (x0,), (v,))[1] for v in eye])

    def tf32() -> torch.Tensor:
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return rev_rev(model)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old

    bf = copy.deepcopy(model).to(torch.bfloat16)
    sdpa = copy.deepcopy(model)
    sdpa.config._attn_implementation = "sdpa"  # looked up at each forward

    def sdpa_math() -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return rev_rev(sdpa)

    ways = {
        "double backward, float32 (default)": lambda: rev_rev(model),
        "double backward, TF32 matmuls": tf32,
        "forward-over-reverse, float32": fwd_rev,
        "double backward, SDPA math kernel": sdpa_math,
        "double backward, bfloat16 model": lambda: rev_rev(bf, torch.bfloat16),
    }
    out, ref = [], None
    for name, fn in ways.items():
        try:
            fn()  # warm-up
            h, dt, peak = measured(dev, fn)
        except Exception as e:  # noqa: BLE001 -- a way that fails is a row, not the end of the run
            add(out, name, "failed", f"{type(e).__name__}: {str(e)[:120]}", "-")
            continue
        ref = h if ref is None else ref
        err = float((h - ref).abs().max() / ref.abs().max())
        add(
            out,
            f"{name}, {cols} columns of t={t}",
            f"{dt:.2f}",
            f"{dt / cols * 1e3:.1f} ms/column, max rel diff to float32 {err:.1e}",
            f"{peak:.1f}",
        )
    del bf, sdpa
    if dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        sub2 = subsets.single_layer_single_block(model, "self_attn.q_proj", 0, t)
        f = SubsetLoss(model, sub2)
        x, g, _ = gradient_graph(lambda x: f(x, ids), f.x0().detach())
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for v in eye[:2]:
                torch.autograd.grad(g, x, v, retain_graph=True)
            torch.cuda.synchronize(dev)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--t", type=int, default=128, help="entries for the per-column comparison")
    p.add_argument("--report_rows", type=int, default=16)
    p.add_argument("--chunks", default="1,8,32", help="fixed chunks to time beside auto")
    p.add_argument("--fig1a_samples", type=int, default=2)
    p.add_argument("--probes", type=int, default=16, help="Hutchinson probes per diagonal run")
    p.add_argument("--budget_s", type=float, default=400.0)
    p.add_argument(
        "--parts", default="exact,fig1a,diagonal", help="of exact, fig1a, diagonal, variants, oom"
    )
    p.add_argument("--variant_columns", type=int, default=8)
    args = p.parse_args()
    dev = torch.device(args.device)
    start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731
    cuda = (
        f", CUDA {torch.version.cuda}, {torch.cuda.get_device_name(dev)}"
        if dev.type == "cuda"
        else ""
    )
    head = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}{cuda}"
    print(head, flush=True)

    model = opt().to(dev)  # OPT-125M architecture, float32, eager attention
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(
        3, model.config.vocab_size, (max(2, args.fig1a_samples), args.seqlen), generator=g
    )
    ids = ids.to(dev)
    sub_t = subsets.single_layer_single_block(model, "self_attn.q_proj", 0, args.t)
    rows: list[tuple[str, str, str, str]] = []  # (what, seconds, per column / rate, peak GiB)

    parts = set(args.parts.split(","))
    if (
        "oom" in parts
    ):  # a chunk too large for the GPU: halved until it fits, same Hessian as chunk 1
        sub64 = subsets.single_layer_single_block(model, "self_attn.q_proj", 0, 64)
        big, h_big, dt_big, peak_big = exact_job(model, sub64, ids[:1], 64)
        _, h_one, dt_one, peak_one = exact_job(model, sub64, ids[:1], 1)
        diff = float((h_big - h_one).abs().max() / h_one.abs().max())
        add(
            rows,
            f"t=64, chunk 64 given -> {big.chunk_report()} (out-of-memory halving)",
            f"{dt_big:.2f}",
            f"chunk 1: {dt_one:.2f} s, {peak_one:.1f} GiB; max rel diff {diff:.1e}",
            f"{peak_big:.1f}",
        )
    if "variants" in parts:
        rows += variants(model, ids[:1], args.t, args.variant_columns)
    if parts & {"exact", "fig1a"}:
        # warm-up: kernels, allocator, the fused head's set-up
        exact_job(
            model, subsets.single_layer_single_block(model, "self_attn.q_proj", 0, 4), ids[:1], 4
        )

        # 1. per column
        t_graph, t_row = report_columns(model, sub_t, ids[:1], args.report_rows)
        add(
            rows,
            f"report's method, 1 sample, graph + {args.report_rows} rows",
            f"{t_graph:.2f} + {t_row * args.report_rows:.2f}",
            f"{t_row * 1e3:.1f} ms/column (+{t_graph:.2f} s graph per sample)",
            "-",
        )
        h_ref, per_column = None, [t_row]
        for chunk in [None, *[int(c) for c in args.chunks.split(",") if c]]:
            if left() < 60:
                rows.append(
                    (f"default t={args.t} chunk {chunk or 'auto'}", "skipped (budget)", "-", "-")
                )
                continue
            try:
                job, h, dt, peak = exact_job(model, sub_t, ids[:1], chunk)
            except torch.OutOfMemoryError:
                rows.append((f"default t={args.t} chunk {chunk}", "out of memory", "-", "-"))
                torch.cuda.empty_cache()
                continue
            diff = (
                ""
                if h_ref is None
                else f", max rel diff to auto {float((h - h_ref).abs().max() / h_ref.abs().max()):.1e}"
            )
            h_ref = h if h_ref is None else h_ref
            per_column.append(dt / args.t)
            add(
                rows,
                f"default t={args.t} chunk {chunk or 'auto'} -> {job.chunk_report()}",
                f"{dt:.2f}",
                f"{dt / args.t * 1e3:.1f} ms/column, {t_row * args.t / dt:.2f}x the report's rows{diff}",
                f"{peak:.1f}",
            )

    if "fig1a" in parts:
        # 2. Fig. 1a
        per_col = min(per_column[1:] or per_column)
        b = args.fig1a_samples
        est = b * (768 * per_col + 5)
        if left() > est + 30:
            sub768 = subsets.single_layer_single_block(model, "self_attn.q_proj", 0, 768)
            job, h, dt, peak = exact_job(model, sub768, ids[:b], None)
            per_sample = dt / b
            whole = per_sample * WIKITEXT2_TEST_SAMPLES
            add(
                rows,
                f"Fig. 1a: t=768, seqlen {args.seqlen}, {b} samples, defaults ({job.chunk_report()}, {job.products_report()})",
                f"{dt:.1f}",
                f"{per_sample:.1f} s/sample; test split ({WIKITEXT2_TEST_SAMPLES} samples) {whole / 3600:.2f} h "
                f"on this GPU (report: {REPORT_FIG1A_S / 3600:.1f} h on 4 A100s, {REPORT_FIG1A_S * 4 / whole:.1f}x per GPU)",
                f"{peak:.1f}",
            )
        else:
            add(
                rows,
                f"Fig. 1a ({b} samples)",
                f"skipped: estimated {est:.0f} s > budget left {left():.0f} s",
                f"extrapolated from the per-column time: {768 * per_col:.1f} s/sample, "
                f"test split {768 * per_col * WIKITEXT2_TEST_SAMPLES / 3600:.2f} h",
                "-",
            )

    if "diagonal" in parts:
        # 3. diagonal probes per second
        name = "model.decoder.layers.0.self_attn.q_proj.weight"
        shape = tuple(model.get_parameter(name).shape)
        for pb in (None, 1):
            if left() < 30:
                rows.append((f"diagonal probe_batch {pb or 'auto'}", "skipped (budget)", "-", "-"))
                continue
            res, dt, peak = measured(
                dev,
                lambda pb=pb: hessian_diagonal(
                    model,
                    [Target(name, shape)],
                    ids[:1],
                    estimators=("hutchinson",),
                    hvps=args.probes,
                    chunk=pb,
                ),
            )
            add(
                rows,
                f"diagonal, Hutchinson K={args.probes}, whole q_proj, probe_batch {pb or 'auto'} -> {res.chunk}",
                f"{dt:.2f}",
                f"{args.probes / dt:.2f} probes/s",
                f"{peak:.1f}",
            )

    print(
        f"\n{head}; OPT-125M architecture (random weights), float32, eager attention, seqlen {args.seqlen}, one sample per forward\n"
    )
    print("| measurement | seconds | rate | peak GiB |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
