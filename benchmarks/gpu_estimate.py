"""FLOPs and graph memory of the report's OPT-125M configurations, counted without weights or compute, and the
time they would take on one GPU: **estimates**, not measurements (no GPU was available).

The OPT-125M architecture (``OPTConfig()``: 12 blocks, hidden 768, vocab 50272) is built on the ``meta`` device, so
nothing is downloaded or computed: :class:`torch.utils.flop_counter.FlopCounterMode` counts the matrix products of

* one sample's gradient graph: the forward of the summed NLL and its ``create_graph`` backward w.r.t. the subset
  ``x`` (all weights frozen, the fused LM head, eager attention), as ``lib.SubsetLoss`` runs them;
* one Hessian-vector product through that graph (one more backward; a Hessian row, or one probe of the diagonal);

and ``saved_tensors_hooks`` add up the bytes of the tensors the graph keeps (unique storages). The runs' totals
follow from the product counts of each script (``b`` samples, ``n`` rows, ``K`` HVPs per sample, XDiag's two passes,
the tracked rows of Fig. 3a), and the time from an assumed sustained float32 throughput (``--tflops``). The same
count for the bundled model's Fig. 1a configuration, divided by its measured CPU time, gives this CPU's throughput
(``--cpu_seconds``) as a check of the FLOP model.

    OMP_NUM_THREADS=1 python benchmarks/gpu_estimate.py --tflops 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib.estimators.diagonal.driver import plan_phase1  # noqa: E402
from lib.estimators.diagonal.work import Target  # noqa: E402
from lib.model.models import prepare_model  # noqa: E402
from lib.objective.loss import SubsetLoss  # noqa: E402
from lib.objective.subsets import (  # noqa: E402  # noqa: E402
    from_indices,
    make_subset,
    several_layers_several_blocks,
    single_layer_several_blocks,
    single_layer_single_block,
)

Q0 = "model.decoder.layers.0.self_attn.q_proj.weight"


class Flops(TorchDispatchMode):
    """Counts the FLOPs of the matrix products run inside it (torch's own formulas, ``flop_registry``); unlike
    ``FlopCounterMode`` it installs no module hooks, which ``torch.autograd.grad`` on a leaf refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **(kwargs or {}), out_val=out)
        return out


def meta_model(config: dict | None = None, local: str | None = None) -> torch.nn.Module:
    """The OPT-125M architecture (or the config of the model directory ``local``) on the meta device, eager attention."""
    from transformers import AutoConfig, OPTConfig, OPTForCausalLM

    cfg = AutoConfig.from_pretrained(local) if local else OPTConfig(**(config or {}))
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = OPTForCausalLM(cfg)
    return prepare_model(model)


def count(model: torch.nn.Module, subset, seqlen: int) -> dict[str, float]:
    """FLOPs of one sample's graph (forward + create_graph backward) and of one HVP, and the graph's bytes."""
    f = SubsetLoss(model, subset)
    x = f.x0().detach().requires_grad_(True)
    ids = torch.zeros(1, seqlen, dtype=torch.long, device="meta")
    seen: dict[int, int] = {}
    weights = {p.untyped_storage()._cdata for p in model.parameters()} | {
        b.untyped_storage()._cdata for b in model.buffers()
    }

    def pack(
        t: torch.Tensor,
    ) -> torch.Tensor:  # the graph's own tensors: unique storages, the frozen weights excluded
        st = t.untyped_storage()
        if st._cdata not in weights:
            seen[st._cdata] = st.nbytes()
        return t

    with Flops() as graph_flops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = f(x, ids)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
    v = torch.zeros_like(x)
    with Flops() as hvp_flops:
        torch.autograd.grad(g, x, v, retain_graph=True)
    return {
        "graph": graph_flops.total,
        "hvp": hvp_flops.total,
        "graph_bytes": sum(seen.values()),
        "graph_ops": graph_flops.ops,
        "hvp_ops": hvp_flops.ops,
    }


def whole(model: torch.nn.Module, name: str):
    """A whole weight as a subset (the diagonal's target)."""
    n = model.get_parameter(name).numel()
    return make_subset(from_indices(model, name, torch.arange(n)))


def diagonal_hvps(
    numel: int, estimators: tuple[str, ...], k: int, tracked: int = 0
) -> tuple[int, int]:
    """``(HVPs per sample, passes over the data)`` of ``hessian_diagonal.py`` on one weight (from its plans)."""
    target = Target(Q0, (numel,), torch.arange(tracked))
    steps = sum(p.steps() for p in plan_phase1([target], estimators, k, 0))
    two_phase = "xdiag" in estimators
    return steps + (k // 2 if two_phase else 0), 2 if two_phase else 1


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument(
        "--b",
        type=int,
        default=140,
        help="samples: WikiText-2 test at seqlen 2048, OPT tokenizer (~140)",
    )
    p.add_argument(
        "--tflops", type=float, default=8.0, help="assumed sustained float32 TFLOP/s of one GPU"
    )
    p.add_argument(
        "--launch_us", type=float, default=10.0, help="assumed seconds per GPU kernel launch, in us"
    )
    p.add_argument(
        "--gpu_chunk",
        type=int,
        default=16,
        help="assumed products per batched backward on the GPU (--chunk auto)",
    )
    p.add_argument(
        "--cpu_seconds",
        type=float,
        default=0.0,
        help="measured CPU seconds of the bundled Fig. 1a run",
    )
    p.add_argument(
        "--embedded",
        default=str(Path(__file__).resolve().parent.parent / "assets" / "tiny-opt-shakespeare"),
    )
    p.add_argument("--json", default="", help="write the table here as JSON")
    args = p.parse_args(argv)

    model = meta_model()
    L, b = args.seqlen, args.b
    c_row = count(model, single_layer_single_block(model, "self_attn.q_proj", 0, 768), L)
    c_all = count(model, several_layers_several_blocks(model, 6, 12, 25), L)
    c_blk = count(model, single_layer_several_blocks(model, "self_attn.q_proj", 12, 150), L)
    c_w = count(model, whole(model, Q0), L)
    numel = model.get_parameter(Q0).numel()
    runs = {
        "1a (t=768)": (c_row, 768, 1),
        "1b (6 layers x t=300)": (
            count(model, several_layers_several_blocks(model, 6, 1, 300), L),
            1800,
            1,
        ),
        "1c (12 blocks x t=150)": (c_blk, 1800, 1),
        "1d (6 x 12 x t=25)": (c_all, 1800, 1),
        "2 (1a + batch study)": (c_row, 768, 1),
    }
    rows = []
    for name, (c, hvps, passes) in runs.items():
        rows.append((name, c, hvps, passes))
    for name, ests, k, tracked in (
        (
            "3a (hutchinson + xdiag + empirical_fisher, K=1000, 1 row tracked)",
            ("hutchinson", "xdiag", "empirical_fisher"),
            1000,
            768,
        ),
        ("3b hutchinson K=1000", ("hutchinson",), 1000, 0),
        ("3b all five runs (hutchinson K=1, 10, 100, 1000; xdiag K=1000)", None, 0, 0),
    ):
        if ests is None:
            h = sum(diagonal_hvps(numel, ("hutchinson",), kk)[0] for kk in (1, 10, 100, 1000))
            x, xp = diagonal_hvps(numel, ("xdiag",), 1000)
            rows.append((name, c_w, h + x, 4 + xp))
        else:
            hv, passes = diagonal_hvps(numel, ests, k, tracked)
            rows.append((name, c_w, hv, passes))
    out = {"seqlen": L, "b": b, "tflops": args.tflops, "runs": []}
    for name, c in (("row", c_row), ("1d", c_all), ("1c", c_blk), ("whole q_proj", c_w)):
        print(
            f"{name}: graph {c['graph'] / 1e9:.1f} GFLOP, HVP {c['hvp'] / 1e9:.1f} GFLOP, {c['graph_bytes'] / 2**20:.0f} MiB"
        )
    print(
        f"OPT-125M, seqlen {L}, b {b}: graph {c_row['graph'] / 1e12:.2f} TFLOP, HVP {c_row['hvp'] / 1e12:.2f} TFLOP "
        f"per sample; graph memory {c_row['graph_bytes'] / 2**30:.1f} GiB"
    )
    print(
        f"| run | HVPs per sample | passes | PFLOP | est. hours on one GPU at {args.tflops:g} TFLOP/s | graph GiB |"
    )
    for name, c, hvps, passes in rows:
        flops = b * (passes * c["graph"] + hvps * c["hvp"])
        hours = flops / (args.tflops * 1e12) / 3600
        out["runs"].append(
            {
                "run": name,
                "hvps_per_sample": hvps,
                "passes": passes,
                "flops": flops,
                "hours": hours,
                "graph_bytes": c["graph_bytes"],
            }
        )
        print(
            f"| {name} | {hvps} | {passes} | {flops / 1e15:.1f} | {hours:.1f} | {c['graph_bytes'] / 2**30:.1f} |"
        )
    emb = meta_model(local=args.embedded)
    q = "model.decoder.layers.0.self_attn.q_proj.weight"
    defaults = {  # the scripts' default commands on the bundled model: b 16, seqlen 128
        "single_layer_single_block.py (t 128)": (
            single_layer_single_block(emb, "self_attn.q_proj", 0, 128),
            128,
            1,
        ),
        "single_layer_several_blocks.py (4 x 32)": (
            single_layer_several_blocks(emb, "self_attn.q_proj", 4, 32),
            128,
            1,
        ),
        "several_layers_several_blocks.py (6 x 4 x 8)": (
            several_layers_several_blocks(emb, 6, 4, 8),
            192,
            1,
        ),
        "hessian_diagonal.py (xdiag K 100, whole q_proj)": (whole(emb, q), 100, 2),
    }
    out["embedded"] = {}
    print(
        f"bundled model, b 16, seqlen 128; GPU compute at {args.tflops:g} TFLOP/s or {args.launch_us:g} us per kernel "
        f"with {args.gpu_chunk} products per batched backward), whichever is longer"
    )
    for name, (subset, hvps, passes) in defaults.items():
        e = count(emb, subset, 128)
        flops = 16 * (passes * e["graph"] + hvps * e["hvp"])
        ops = 16 * (passes * e["graph_ops"] + hvps * e["hvp_ops"] / args.gpu_chunk)
        gpu_s = max(flops / (args.tflops * 1e12), ops * args.launch_us * 1e-6)
        out["embedded"][name] = {"flops": flops, "ops": ops, "gpu_compute_s": gpu_s}
        print(f"| {name} | {flops / 1e12:.2f} TFLOP | {ops:.0f} kernels | {gpu_s:.1f} s |")
    flops_1a = out["embedded"]["single_layer_single_block.py (t 128)"]["flops"]
    if args.cpu_seconds:
        out["cpu_gflops"] = flops_1a / args.cpu_seconds / 1e9
        print(
            f"Fig. 1a ({flops_1a / 1e12:.2f} TFLOP) in {args.cpu_seconds:g} CPU s: {out['cpu_gflops']:.1f} GFLOP/s on this CPU"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
