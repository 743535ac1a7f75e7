"""What a library call settles before its work, the way the scripts settle it: the threads and ``model_input_bs``.

A script chooses its intra-op threads (:func:`lib.runtime.threads.apply`) and resolves ``--model_input_bs auto`` by a rule
(:func:`lib.products.autotune.samples_per_forward`, from :func:`lib.app.pipeline.load`) before it computes. The library's
heavy calls (:func:`lib.exact_hessian`, :func:`lib.hessian_diagonal`, :class:`lib.HessianOperator`) do the same
through :func:`settle`, with the scripts' defaults, so that a library call and a script run of the same settings
batch the same samples and give bitwise the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from ..products.autotune import samples_per_forward
from . import threads


def settle(
    model: nn.Module,
    samples: torch.Tensor,
    model_input_bs: int | str,
    products: int,
    passes: int = 1,
) -> int:
    """Choose this process's threads once (:func:`lib.runtime.threads.for_library`), then ``model_input_bs``: itself if an
    integer, else (``"auto"``) the scripts' rule for ``samples`` (``(b, seqlen)``) and ``products`` Hessian-vector
    products per sample over ``passes`` passes on the model's device (the scripts' ``products``: the subset's size
    for an exact Hessian, 1 for a diagonal)."""
    threads.for_library()
    device = next(model.parameters()).device
    bs, _ = samples_per_forward(
        model_input_bs, model, samples.shape[0], samples.shape[1], products, device, passes
    )
    return bs
