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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..model.models import attention_context
from .subsets import Subset

FUSED_HEAD_MODEL_TYPES = frozenset(
    {"opt", "llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "gpt_neox"}
)
"""Architectures whose logits are exactly ``lm_head(base_model(...).last_hidden_state)``."""


def summed_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``sum -log softmax(logits[:, i])[input_ids[:, i+1]]`` over all batch rows and positions ``i < s-1``.

    ``logits``: ``(B, s, V)``; ``input_ids``: ``(B, s)``; returns a scalar.

    Args:
        logits: ``(B, s, V)`` next-token logits (floating).
        input_ids: ``(B, s)`` int64 token ids.

    Returns:
        A 0-d tensor (the logits' dtype): the NLL summed over ``B * (s - 1)`` predicted tokens.
    """
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="sum"
    )


class _HeadNLLGrad(torch.autograd.Function):
    """``G(h) = (softmax(h W^T + c) - onehot(y)) W = m - W[y]``, the gradient of the head NLL w.r.t. ``h``,
    with ``m = P W`` (``(n, d)``) the probability-weighted mean of the head's rows.

    Its vector-Jacobian product is the exact softmax Hessian through the head:
    ``u -> (P * a) W - (u . m) m`` per row, with ``a = u W^T``, reusing the forward's probabilities ``P``
    (one extra ``(n, V)`` tensor per product, multiplied in place: no row sums over the vocabulary).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        h: torch.Tensor, probs: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean = probs @ weight
        return mean - weight[labels], mean

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, probs, weight, _ = inputs
        _, mean = output
        ctx.mark_non_differentiable(mean)
        ctx.save_for_backward(probs, weight, mean)

    @staticmethod
    def backward(ctx, u: torch.Tensor, _grad_mean):
        probs, weight, mean = ctx.saved_tensors
        s = (u * mean).sum(-1, keepdim=True)
        return (torch.mm(u, weight.T).mul_(probs) @ weight).sub_(s * mean), None, None, None


class _HeadNLL(torch.autograd.Function):
    """``sum_i logsumexp(h_i W^T + c) - (h_i W^T + c)[y_i]`` for ``h``: ``(n, d)``, ``W``: ``(V, d)``; a scalar."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
    ):
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
        return grad_loss * _HeadNLLGrad.apply(h, probs, weight, labels)[0], None, None, None


def head_nll(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """Summed NLL of a frozen linear LM head: hidden ``(n, d)``, weight ``(V, d)``, labels ``(n,)``; twice differentiable in ``hidden``.

    ``sum_i logsumexp(h_i W^T + c) - (h_i W^T + c)[y_i]``, its Hessian-vector products reusing the forward's
    probabilities.

    Args:
        hidden: ``(n, d)`` final hidden states (floating).
        weight: ``(V, d)`` the head's weight (not differentiated).
        bias: ``(V,)`` the head's bias, or ``None``.
        labels: ``(n,)`` int64 target token ids.

    Returns:
        A 0-d tensor: the NLL summed over the ``n`` rows.
    """
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

    def __init__(
        self,
        model: nn.Module,
        subset: Subset,
        fused_head: bool | None = None,
        double_backward: bool = True,
    ):
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
            self._offsets.append(
                (s.param_name, s.flat_index.to(param.device), start, start + len(s))
            )
            if len(s) == param.numel() and bool((s.flat_index == torch.arange(len(s))).all()):
                self._whole.add(s.param_name)
            start += len(s)
        self._whole -= {n for n in self._whole if sum(o[0] == n for o in self._offsets) > 1}
        names_of: dict[int, int] = defaultdict(int)
        for _, p in model.named_parameters(remove_duplicate=False):
            names_of[id(p)] += 1
        self._tied = any(names_of[id(model.get_parameter(n))] > 1 for n in subset.param_names)
        """Whether a substituted weight is tied (e.g. a tied LM head): functional_call then moves it in every role."""
        can_fuse = self._can_fuse_head()
        if fused_head and not can_fuse:
            raise ValueError("the fused head does not apply to this model or subset")
        self.fused_head = can_fuse if fused_head is None else fused_head

    def _can_fuse_head(self) -> bool:
        model = self.model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if getattr(
            model.config, "model_type", None
        ) not in FUSED_HEAD_MODEL_TYPES or not isinstance(head, nn.Linear):
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
        parts = torch.split(
            x, [b - a for _, _, a, b in self._offsets]
        )  # one backward concatenation, not a full-size gradient per slice
        for (name, idx, _, _), part in zip(self._offsets, parts):
            if name in self._whole:
                param = self.model.get_parameter(name)
                whole[name] = part.to(param.device).view(param.shape)
            else:
                pieces[name].append((idx, part))
        return {
            **whole,
            **{name: _rebuild(self.model.get_parameter(name), p) for name, p in pieces.items()},
        }

    def features(
        self, x: torch.Tensor, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What the loss's softmax reads, at the ``N = B * (s-1)`` predicted positions of ``input_ids`` (``(B, s)``).

        Returns ``(feats, head_weight, head_bias)``: with the fused head, ``feats`` are the LM head's inputs
        ``(N, d)`` and the logits are ``feats @ head_weight.T + head_bias`` (``head_weight``: ``(V, d)``);
        otherwise ``feats`` are the logits ``(N, V)`` and the head is ``(None, None)``.
        """
        weights = self.weights(x)
        with attention_context(self.model) if self.double_backward else contextlib.nullcontext():
            if not self.fused_head:
                logits = functional_call(
                    self.model,
                    weights,
                    args=(),
                    kwargs={"input_ids": input_ids, "use_cache": False},
                    tie_weights=self._tied,  # a tied weight is one parameter, moved in every role
                )[0]
                return logits[:, :-1].reshape(-1, logits.shape[-1]), None, None
            base = self.model.base_model
            k = len(self.model.base_model_prefix) + 1
            hidden = functional_call(
                base,
                {n[k:]: w for n, w in weights.items()},
                args=(),
                kwargs={"input_ids": input_ids, "use_cache": False},
            )[0]
        head = self.model.get_output_embeddings()
        return (
            hidden[:, :-1].reshape(-1, hidden.shape[-1]).to(head.weight.device),
            head.weight,
            head.bias,
        )

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Scalar summed NLL of ``input_ids`` (``(B, s)``) at subset values ``x`` (``(n,)``)."""
        feats, weight, bias = self.features(x, input_ids)
        labels = input_ids[:, 1:].reshape(-1).to(feats.device)
        if weight is None:
            return F.cross_entropy(feats, labels, reduction="sum")
        return head_nll(feats, weight, bias, labels)


@dataclass(frozen=True)
class LayerOutputs:
    """The subset as a linear map into the outputs of its layers: ``x -> z``, ``z = y[..., units]`` per layer.

    Every entry ``k`` is weight ``(unit o_k, input i_k)`` of a linear layer ``M_k`` (``nn.Linear`` or GPT-2's
    ``Conv1D``, used once per forward, its weight used by no other module), so ``dz_{M}[p, r] = sum_k h_M[p, i_k] dx_k``
    over the entries of ``M`` with ``o_k = units_M[r]``, ``h_M`` the layer's input at position ``p``. When no
    layer's input depends on ``x``, ``z`` is linear in ``x`` with a constant Jacobian ``J`` and, exactly,
    ``H_x = J^T H_z J``: ``H_z`` needs one Hessian-vector product per (position, unit) instead of one per entry.

    ``modules``: ``(qualified module name, units (R_M,), column offset)``; ``width``: ``sum_M R_M``, the columns of
    ``z`` per position; ``entry_module``, ``entry_column``, ``entry_input``: per entry ``k``, its layer's index in
    ``modules``, its column of ``z`` and its input index ``i_k``.
    """

    modules: tuple[tuple[str, torch.Tensor, int], ...]
    width: int
    entry_module: torch.Tensor
    entry_column: torch.Tensor
    entry_input: torch.Tensor

    @staticmethod
    def of(model: nn.Module, subset: Subset) -> LayerOutputs | None:
        """The map for ``subset``, or ``None`` when an entry is not the weight of a plain, unshared linear layer."""
        owners: dict[int, int] = defaultdict(int)
        for m in model.modules():
            for p in m._parameters.values():
                if p is not None:
                    owners[id(p)] += 1
        per_module: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = defaultdict(
            list
        )
        start = 0
        for s in subset.slices:
            mod_name, _, leaf = s.param_name.rpartition(".")
            module = model.get_submodule(mod_name) if mod_name else model
            conv1d = type(module).__name__ == "Conv1D"
            if (
                leaf != "weight"
                or not (type(module) is nn.Linear or conv1d)
                or owners[id(module.weight)] != 1
            ):
                return None
            idx = s.flat_index.cpu()
            n_cols = module.weight.shape[1]
            row, col = idx // n_cols, idx % n_cols
            unit, inp = (col, row) if conv1d else (row, col)
            per_module[mod_name].append((torch.arange(start, start + len(s)), unit, inp))
            start += len(s)
        n = start
        modules, entry_module, entry_column, entry_input = (
            [],
            torch.empty(n, dtype=torch.long),
            torch.empty(n, dtype=torch.long),
            torch.empty(n, dtype=torch.long),
        )
        offset = 0
        for m_index, (name, parts) in enumerate(per_module.items()):
            pos, unit, inp = (torch.cat(t) for t in zip(*parts))
            units, column = torch.unique(unit, return_inverse=True)
            modules.append((name, units, offset))
            entry_module[pos], entry_column[pos], entry_input[pos] = m_index, offset + column, inp
            offset += len(units)
        return LayerOutputs(tuple(modules), offset, entry_module, entry_column, entry_input)

    def products_per_sample(self, seqlen: int) -> int:
        """Hessian-vector products per sample for ``H_z``: ``seqlen * width``."""
        return seqlen * self.width

    @contextmanager
    def perturbed(
        self, model: nn.Module, delta: torch.Tensor, batch: int, seqlen: int
    ) -> Iterator[list[torch.Tensor | None]]:
        """Within: each layer's output ``y`` becomes ``y + delta`` on its units (``delta``: flat ``(batch * seqlen * width,)``,
        laid out ``(batch, seqlen, width)``). Yields the layers' inputs as they are seen (``(batch, seqlen, in)``, one
        per module, ``None`` until called); raises ``ValueError`` if a layer is called twice or its input depends on ``delta``."""
        z = delta.view(batch, seqlen, self.width)
        inputs: list[torch.Tensor | None] = [None] * len(self.modules)
        handles = []

        def hook(i: int, units: torch.Tensor, offset: int):
            def add(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                if inputs[i] is not None or args[0].requires_grad:
                    raise ValueError(
                        "a selected layer is called twice or its input depends on the subset"
                    )
                inputs[i] = args[0].detach()
                d = z[..., offset : offset + len(units)].to(output.device, output.dtype)
                return output.index_add(-1, units.to(output.device), d)

            return add

        try:
            for i, (name, units, offset) in enumerate(self.modules):
                handles.append(
                    model.get_submodule(name).register_forward_hook(hook(i, units, offset))
                )
            yield inputs
        finally:
            for h in handles:
                h.remove()

    def jacobian(self, inputs: list[torch.Tensor], sample: int, dtype: torch.dtype) -> torch.Tensor:
        """``J`` of one sample: ``(seqlen * width, n)``, ``J[(p, c), k] = h_{M_k}[p, i_k]`` if ``c`` is entry ``k``'s column."""
        seqlen = inputs[0].shape[1]
        n = self.entry_input.numel()
        j = torch.zeros(seqlen, self.width, n, dtype=dtype, device=inputs[0].device)
        for m in range(len(self.modules)):
            ks = (self.entry_module == m).nonzero().squeeze(1)
            h = inputs[m][sample].to(j.device, dtype)  # (seqlen, in)
            j[:, self.entry_column[ks].to(j.device), ks.to(j.device)] = h[
                :, self.entry_input[ks].to(j.device)
            ]
        return j.view(seqlen * self.width, n)
