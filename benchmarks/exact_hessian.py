"""Benchmark: the default exact method against the paper's ``torch.autograd.functional.hessian``.

Both run side by side in one process on an OPT-125M-architecture model with random weights (built
from ``OPTConfig()``; no download), on the same sample, for three subsets: ``q_proj`` of block 0,
``q_proj`` of block 6, and ``q_proj`` of all 12 blocks (``t`` entries each). Prints the fastest wall time of
``--repeat`` alternating runs, the time ratio, the peak memory above the baseline (CUDA allocator peak on GPU, sampled RSS on CPU) and
the max relative difference between the two Hessians.

    python benchmarks/exact_hessian.py                    # CPU, seqlen 128, t 32
    python benchmarks/exact_hessian.py --device cuda --seqlen 2048
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib import subsets  # noqa: E402
from lib.autotune import tune  # noqa: E402
from lib.hessian import batch_hessian  # noqa: E402
from lib.operator import ChunkPolicy  # noqa: E402
from lib.loss import SubsetLoss  # noqa: E402
from lib.models import prepare_model, resolve_device  # noqa: E402


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak, or the process RSS sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.bytes = max(0, max(self.peak, self._rss()) - self.base)


def run(method: str, fused: bool, model, subset, ids, chunk: int, device) -> tuple[torch.Tensor, float, int]:
    """Time one Hessian; ``chunk`` 0 = measured as ``--chunk 0`` does (:func:`lib.autotune.tune`, included in the time)."""
    objective = SubsetLoss(model, subset, fused_head=fused)
    x0 = objective.x0()
    policy = ChunkPolicy(chunk or None, min_products=1)
    schedule = lambda compute, n: policy.run(compute, n, n, lambda c, k: tune(c, k, model, ids.numel(), x0, total=n))  # noqa: E731
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        h, _ = batch_hessian(objective, ids, method=method, schedule=schedule)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
    return h, dt, mem.bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--t", type=int, default=32)
    p.add_argument("--chunk", type=int, default=0, help="0 = auto: measured on the first columns, as the scripts' --chunk 0")
    p.add_argument("--cases", default="block0,block6,blocks12")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeat", type=int, default=2, help="alternate the two methods this many times; report the fastest of each")
    args = p.parse_args()
    from transformers import OPTConfig, OPTForCausalLM

    device = resolve_device(args.device)
    torch.manual_seed(0)
    config = OPTConfig()  # the OPT-125M architecture: 12 blocks, hidden 768, vocab 50272
    config._attn_implementation = "eager"
    model = prepare_model(OPTForCausalLM(config).to(getattr(torch, args.dtype)).to(device))
    ids = torch.randint(3, config.vocab_size, (1, args.seqlen), generator=torch.Generator().manual_seed(0)).to(device)
    chunk = args.chunk
    cases = {
        "block0": subsets.single_layer_single_block(model, "self_attn.q_proj", 0, args.t),
        "block6": subsets.single_layer_single_block(model, "self_attn.q_proj", 6, args.t),
        "blocks12": subsets.single_layer_several_blocks(model, "self_attn.q_proj", 12, args.t),
    }
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else os.cpu_count()} {'' if device.type == 'cuda' else 'CPU cores'}), torch {torch.__version__}, threads {torch.get_num_threads()}, seqlen {args.seqlen}, t {args.t}, chunk {chunk}")
    print("| subset | n | paper autograd (s) | default rev-rev (s) | speed-up | peak MiB paper | peak MiB default | max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.cases.split(","):
        subset = cases[name]
        run("rev-rev", True, model, subset, ids, chunk, device)  # warm-up (allocator, kernels)
        t_ref = t_new = float("inf")
        for _ in range(args.repeat):  # alternate, keep the fastest: robust to load from other processes
            h_ref, t, m_ref = run("autograd", False, model, subset, ids, chunk, device)
            t_ref = min(t_ref, t)
            h_new, t, m_new = run("rev-rev", True, model, subset, ids, chunk, device)
            t_new = min(t_new, t)
        diff = float((h_new - h_ref).abs().max() / h_ref.abs().max())
        print(f"| {name} | {subset.size} | {t_ref:.2f} | {t_new:.2f} | {t_ref / t_new:.2f}x | {m_ref / 2**20:.0f} | {m_new / 2**20:.0f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
