"""The paper's additive loss, reparametrized as a function of a flat weight subset ``x``.

For a batch of token sequences ``X`` (shape ``(B, s)``) the loss is the *summed* next-token
negative log-likelihood (paper eq. 4, no mean and no ``exp``)::

    f(x; X) = sum_{b < B} sum_{i < s-1} -log p_theta(x)(X[b, i+1] | X[b, :i+1])

where ``theta(x)`` is the model's weights with the subset's entries replaced by ``x``. Because
``f`` is a sum over samples, Hessians over many samples are sums of per-sample Hessians.
The model is evaluated with :func:`torch.func.functional_call` on rebuilt weights; nothing is
patched. At ``x = x0`` (the model's own values) ``f`` equals the plain model's summed NLL.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .models import attention_context
from .subsets import Subset

FUSED_HEAD_MODEL_TYPES = frozenset({"opt", "llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "gpt_neox"})
"""Architectures whose logits are exactly ``lm_head(base_model(...).last_hidden_state)``."""


def summed_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``sum -log softmax(logits[:, i])[input_ids[:, i+1]]`` over all batch rows and positions ``i < s-1``.

    ``logits``: ``(B, s, V)``; ``input_ids``: ``(B, s)``; returns a scalar.
    """
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="sum")


class _HeadNLLGrad(torch.autograd.Function):
    """``G(h) = (softmax(h W^T + c) - onehot(y)) W``, the gradient of the head NLL w.r.t. ``h``.

    Its vector-Jacobian product is the exact softmax Hessian through the head:
    ``u -> (P * (a - rowsum(P * a))) W`` with ``a = u W^T``, reusing the forward's probabilities
    ``P`` (so only one extra ``(n, V)`` tensor is materialized per product).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(h: torch.Tensor, probs: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        r = probs.clone()
        r.scatter_add_(-1, labels.unsqueeze(-1), torch.full_like(labels, -1, dtype=r.dtype).unsqueeze(-1))
        return r @ weight

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, probs, weight, _ = inputs
        ctx.save_for_backward(probs, weight)

    @staticmethod
    def backward(ctx, u: torch.Tensor):
        probs, weight = ctx.saved_tensors
        a = u @ weight.T
        pa = probs * a
        return pa.sub_(probs * pa.sum(-1, keepdim=True)) @ weight, None, None, None


class _HeadNLL(torch.autograd.Function):
    """``sum_i logsumexp(h_i W^T + c) - (h_i W^T + c)[y_i]`` for ``h``: ``(n, d)``, ``W``: ``(V, d)``; a scalar."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor):
        logits = h @ weight.T
        if bias is not None:
            logits = logits + bias
        lse = torch.logsumexp(logits, dim=-1)
        loss = (lse - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)).sum()
        probs = torch.exp(logits.sub_(lse.unsqueeze(-1)))
        return loss, probs

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        h, weight, _, labels = inputs
        _, probs = output
        ctx.mark_non_differentiable(probs)
        ctx.save_for_backward(h, probs, weight, labels)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_probs):
        h, probs, weight, labels = ctx.saved_tensors
        return grad_loss * _HeadNLLGrad.apply(h, probs, weight, labels), None, None, None


def head_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    """Summed NLL of a frozen linear LM head: hidden ``(n, d)``, weight ``(V, d)``, labels ``(n,)``; twice differentiable in ``hidden``."""
    return _HeadNLL.apply(hidden, weight, bias, labels)[0]


def _rebuild(param: torch.Tensor, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``param`` with ``param.view(-1)[idx] = values`` for each ``(idx, values)``, out of place and differentiable."""
    flat = param.detach().reshape(-1)
    for idx, values in pieces:
        flat = flat.index_put((idx,), values.to(flat.device))
    return flat.view(param.shape)


class SubsetLoss(nn.Module):
    """``f(x; input_ids)``: the summed next-token NLL with the subset's entries replaced by ``x``.

    ``fused_head``: compute the LM head and softmax with the custom twice-differentiable kernel
    :func:`head_nll` (cheaper Hessian-vector products); ``None`` = when the architecture allows it.
    ``double_backward=False`` (first-order use, e.g. finite-difference HVPs): SDPA attention keeps its fused kernels
    instead of being forced to the twice-differentiable math kernel.
    """

    def __init__(self, model: nn.Module, subset: Subset, fused_head: bool | None = None, double_backward: bool = True):
        super().__init__()
        self.model = model
        self.double_backward = double_backward
        self.subset = subset
        self._offsets: list[tuple[str, torch.Tensor, int, int]] = []
        start = 0
        self._whole: set[str] = set()
        """Parameters selected whole in storage order: substituted as a view of ``x`` (no scatter)."""
        for s in subset.slices:
            param = model.get_parameter(s.param_name)
            self._offsets.append((s.param_name, s.flat_index.to(param.device), start, start + len(s)))
            if len(s) == param.numel() and bool((s.flat_index == torch.arange(len(s))).all()):
                self._whole.add(s.param_name)
            start += len(s)
        self._whole -= {n for n in self._whole if sum(o[0] == n for o in self._offsets) > 1}
        can_fuse = self._can_fuse_head()
        if fused_head and not can_fuse:
            raise ValueError("the fused head does not apply to this model or subset")
        self.fused_head = can_fuse if fused_head is None else fused_head

    def _can_fuse_head(self) -> bool:
        model = self.model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if getattr(model.config, "model_type", None) not in FUSED_HEAD_MODEL_TYPES or not isinstance(head, nn.Linear):
            return False
        prefix = getattr(model, "base_model_prefix", "") + "."
        head_params = {id(p) for p in head.parameters()}
        for name in self.subset.param_names:
            if not name.startswith(prefix) or id(model.get_parameter(name)) in head_params:
                return False
        return True

    def x0(self) -> torch.Tensor:
        """The subset's current values, shape ``(n,)``."""
        return self.subset.gather(self.model)

    def weights(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The substituted parameters ``{qualified name: tensor}`` built from ``x``."""
        pieces: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        whole: dict[str, torch.Tensor] = {}
        parts = torch.split(x, [b - a for _, _, a, b in self._offsets])  # one backward concatenation, not a full-size gradient per slice
        for (name, idx, _, _), part in zip(self._offsets, parts):
            if name in self._whole:
                param = self.model.get_parameter(name)
                whole[name] = part.to(param.device).view(param.shape)
            else:
                pieces[name].append((idx, part))
        return {**whole, **{name: _rebuild(self.model.get_parameter(name), p) for name, p in pieces.items()}}

    def features(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What the loss's softmax reads, at the ``N = B * (s-1)`` predicted positions of ``input_ids`` (``(B, s)``).

        Returns ``(feats, head_weight, head_bias)``: with the fused head, ``feats`` are the LM head's inputs
        ``(N, d)`` and the logits are ``feats @ head_weight.T + head_bias`` (``head_weight``: ``(V, d)``);
        otherwise ``feats`` are the logits ``(N, V)`` and the head is ``(None, None)``.
        """
        weights = self.weights(x)
        with attention_context(self.model) if self.double_backward else contextlib.nullcontext():
            if not self.fused_head:
                logits = functional_call(self.model, weights, args=(), kwargs={"input_ids": input_ids, "use_cache": False}, tie_weights=False)[0]
                return logits[:, :-1].reshape(-1, logits.shape[-1]), None, None
            base = self.model.base_model
            k = len(self.model.base_model_prefix) + 1
            hidden = functional_call(base, {n[k:]: w for n, w in weights.items()}, args=(), kwargs={"input_ids": input_ids, "use_cache": False})[0]
        head = self.model.get_output_embeddings()
        return hidden[:, :-1].reshape(-1, hidden.shape[-1]).to(head.weight.device), head.weight, head.bias

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Scalar summed NLL of ``input_ids`` (``(B, s)``) at subset values ``x`` (``(n,)``)."""
        feats, weight, bias = self.features(x, input_ids)
        labels = input_ids[:, 1:].reshape(-1).to(feats.device)
        if weight is None:
            return F.cross_entropy(feats, labels, reduction="sum")
        return head_nll(feats, weight, bias, labels)
