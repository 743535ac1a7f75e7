"""What a curvature approximation compared with the exact Hessian (``--compare``) is made of.

Notation (as in :mod:`lib.hessian.curvature`): ``l_t = -log softmax(z_t)[y_t]`` at each predicted position ``t``, ``z_t`` the
logits (``(V,)``), ``p_t = softmax(z_t)``, ``J_t = dz_t/dx`` (``(V, n)``), ``N = b * (seqlen - 1)`` predicted tokens,
``P = b * seqlen`` positions. Every approximation is a sum over samples, so each batch adds its partial sums next to
the exact Hessian's (an additive job, :class:`lib.hessian.curvature.CurvatureJob`).

* :class:`Source` -- an intermediate several approximations read, computed once per batch for all of them:
  :data:`LOGIT_JACOBIAN` (``J_t`` one column per Jacobian-vector product, in token chunks) and
  :data:`LAYER_STATISTICS` (the inputs of the subset's linear layers and, for sampled labels, the gradients w.r.t.
  their outputs);
* :class:`Approximation` -- one approximation: its source, the sums it adds per batch (the hook of its source:
  :meth:`Approximation.jacobian_accumulator` or :meth:`Approximation.layer_sums`), the matrix it makes of the
  sums (:meth:`Approximation.matrix`) and its cost; registered by name in :data:`REGISTRY`.

Sampled labels of sample ``i``, draw ``j`` come from a generator seeded by ``sha256(f"{seed}/labels/{i}/{j}")``
(the same for every worker).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError
from ...objective.forward import JVPPolicy
from ...objective.loss import SubsetLoss
from ...objective.subsets import Subset
from ...runtime.jobs import Partial, derived_seed
from ..registry import Registry

Progress = Callable[[int], None]
LOGIT_CHUNK_ELEMENTS = 2**23
"""Most elements of one chunk of logit-space Jacobians ``(tokens, V, n)`` held at a time."""


# ----------------------------------------------------------------------------- shared math


def sample_labels(probs: torch.Tensor, seed: int, sample: int, draw: int) -> torch.Tensor:
    """Labels ``y_t ~ probs[t]`` (``probs``: ``(T, V)``) for sample index ``sample``, draw ``draw``; ``(T,)`` on the CPU."""
    g = torch.Generator().manual_seed(derived_seed(seed, "labels", sample, draw))
    return torch.multinomial(probs.detach().to("cpu", torch.float64), 1, generator=g).squeeze(-1)


def label_gradients(c: torch.Tensor, p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token gradients ``g_t = C_t^T (p_t - e_{y_t})`` (``(T, n)``) of ``l_t`` at labels ``labels`` (``(T,)``)."""
    u = torch.bmm(p.unsqueeze(1), c).squeeze(1)
    return u - c[torch.arange(c.shape[0], device=c.device), labels.to(c.device)]


@dataclass(frozen=True)
class EntryLayout:
    """For each entry of ``x``: its linear layer (index into ``modules``), output row and input index."""

    modules: tuple[str, ...]
    layer: torch.Tensor  # (n,) long
    out_index: torch.Tensor  # (n,) long
    in_index: torch.Tensor  # (n,) long

    def same_layer(self) -> torch.Tensor:
        """``(n, n)`` bool: entries ``k, l`` belong to the same layer."""
        return self.layer[:, None] == self.layer[None, :]

    def same_row(self) -> torch.Tensor:
        """``(n, n)`` bool: same layer and same output row (a GPTQ/OBS block)."""
        return self.same_layer() & (self.out_index[:, None] == self.out_index[None, :])


def entry_layout(model: nn.Module, subset: Subset) -> EntryLayout:
    """The layout of ``subset``; every slice must be the weight of an ``nn.Linear`` or GPT-2 ``Conv1D`` (else :class:`UserError`).

    ``nn.Linear`` stores ``(out, in)``, ``Conv1D`` ``(in, out)`` (its input index is the first one).
    """
    modules: list[str] = []
    layer, out_idx, in_idx = [], [], []
    for s in subset.slices:
        mod_name = s.param_name[: -len(".weight")] if s.param_name.endswith(".weight") else None
        module = model.get_submodule(mod_name) if mod_name else None
        kind = type(module).__name__ if module is not None else None
        if kind not in ("Linear", "Conv1D") or module.weight.ndim != 2:
            raise UserError(
                f"--compare gptq/kfac need weights of linear layers; {s.param_name} is not one"
            )
        if mod_name not in modules:
            modules.append(mod_name)
        rows, cols = s.flat_index // module.weight.shape[1], s.flat_index % module.weight.shape[1]
        o, i = (cols, rows) if kind == "Conv1D" else (rows, cols)
        layer.append(torch.full_like(s.flat_index, modules.index(mod_name)))
        out_idx.append(o)
        in_idx.append(i)
    return EntryLayout(tuple(modules), torch.cat(layer), torch.cat(out_idx), torch.cat(in_idx))


def gather_columns(
    per_module: dict[str, torch.Tensor], layout: EntryLayout, index: torch.Tensor
) -> torch.Tensor:
    """``(positions, n)``: column ``k`` is ``per_module[layer of k][..., index[k]]`` flattened over positions (float64)."""
    cols = []
    for j, name in enumerate(layout.modules):
        t = per_module[name]
        cols.append((j, t.reshape(-1, t.shape[-1]).to(torch.float64)))
    n = len(layout.layer)
    out = torch.empty(cols[0][1].shape[0], n, dtype=torch.float64)
    for j, t in cols:
        sel = (layout.layer == j).nonzero().squeeze(-1)
        out[:, sel] = t[:, index[sel].to(t.device)].cpu()
    return out


def layer_inputs_and_output_grads(
    model: nn.Module,
    layout: EntryLayout,
    input_ids: torch.Tensor,
    draws: int,
    seed: int,
    first_sample: int,
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Inputs of the layout's layers (``(B, s, in)`` each) and, for each of ``draws`` sampled label sets, the
    gradients of the sampled-label summed NLL w.r.t. their outputs (``(B, s, out)`` each).

    Forward hooks record each input and add a zero tensor to each output, whose gradient is the gradient
    w.r.t. that output (the network's graph is unchanged). Row ``r`` of ``input_ids`` is sample ``first_sample + r``.
    """
    inputs: dict[str, torch.Tensor] = {}
    zeros: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(module, args, output):
            inputs[name] = args[0].detach()
            if draws:
                zeros[name] = torch.zeros_like(output, requires_grad=True)
                return output + zeros[name]
            return None

        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in layout.modules]
    try:
        with torch.set_grad_enabled(draws > 0):
            logits = model(input_ids=input_ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    grads: list[dict[str, torch.Tensor]] = []
    if draws:
        z = logits[:, :-1].reshape(-1, logits.shape[-1])
        probs = torch.softmax(z.detach().to(torch.float64), -1).view(
            input_ids.shape[0], -1, z.shape[-1]
        )
        names = list(zeros)
        for j in range(draws):
            y = torch.cat(
                [
                    sample_labels(probs[r], seed, first_sample + r, j)
                    for r in range(input_ids.shape[0])
                ]
            ).to(z.device)
            loss = F.cross_entropy(z, y, reduction="sum")
            gs = torch.autograd.grad(loss, [zeros[n] for n in names], retain_graph=j + 1 < draws)
            grads.append(dict(zip(names, gs)))
    return inputs, grads


def jacobian_columns(
    out: torch.Tensor, x: torch.Tensor, vectors: torch.Tensor, progress: Progress | None = None
) -> torch.Tensor:
    """``J v`` for the rows ``v`` of ``vectors`` (``(m, n)``), ``J = d out / d x`` (``out`` built from ``x`` with a graph).

    Double backward: ``J^T u`` is built once with ``create_graph`` for a dummy ``u``; ``J v`` is its
    derivative w.r.t. ``u`` in direction ``v``. Returns ``(m, *out.shape)``.
    """
    u = torch.zeros_like(out, requires_grad=True)
    (jt_u,) = torch.autograd.grad(out, x, grad_outputs=u, create_graph=True)
    cols = torch.empty(vectors.shape[0], *out.shape, dtype=out.dtype, device=out.device)
    for j, v in enumerate(vectors):
        (cols[j],) = torch.autograd.grad(
            jt_u, u, grad_outputs=v.to(x), retain_graph=j + 1 < len(vectors)
        )
        if progress is not None:
            progress(1)
    return cols


def logit_jacobian_chunks(
    jac: torch.Tensor, weight: torch.Tensor | None, max_elements: int = LOGIT_CHUNK_ELEMENTS
):
    """Yield ``(token slice, C)`` with ``C = W J_t`` (``(chunk, V, n)``, float64) from feature Jacobians ``jac`` (``(T, m, n)``).

    ``weight=None``: the features are the logits (``C = J_t``).
    """
    t, _, n = jac.shape
    v = jac.shape[1] if weight is None else weight.shape[0]
    step = max(1, max_elements // max(1, v * n))
    for a in range(0, t, step):
        j = jac[a : a + step].to(torch.float64)
        yield (
            slice(a, a + step),
            (j if weight is None else torch.matmul(weight.to(torch.float64), j)),
        )


# ----------------------------------------------------------------------------- what the approximations see


@dataclass
class BatchInputs:
    """One batch of the comparison job: the model, subset and summed NLL ``objective`` at ``x0``, the batch's
    token ids, its first sample's index, the seed and label draws, and the subset's layer layout (or ``None``)."""

    model: nn.Module
    subset: Subset
    objective: SubsetLoss
    x0: torch.Tensor
    batch: torch.Tensor
    first: int
    seed: int
    fisher_samples: int
    layout: EntryLayout | None
    jvp: JVPPolicy | None = None
    """How the logit Jacobian's columns ``J v`` are computed (the job's, decided once per process); ``None``: a
    fresh :class:`lib.objective.forward.JVPPolicy`."""


@dataclass
class JacobianUnit:
    """The logit Jacobian's view of one batch: ``p`` (``(T, V)`` float64 softmax at the predicted positions ``T``),
    ``true`` labels (``(T,)``), ``rows`` (the batch row of each position), ``per_row`` positions per sample, ``n``."""

    inputs: BatchInputs
    p: torch.Tensor
    true: torch.Tensor
    rows: torch.Tensor
    per_row: int
    n: int


class Accumulator(Protocol):
    """Sums of one approximation over the logit Jacobian's token chunks of one batch."""

    def add(self, tokens: slice, c: torch.Tensor, p: torch.Tensor) -> None:
        """Chunk ``c = J_t`` (``(chunk, V, n)``, float64) of the positions ``tokens``, ``p``: their softmax."""

    def result(self) -> Partial: ...


@dataclass
class LayerUnit:
    """The layer statistics of one batch: the layout, the layers' inputs and, per label draw, the output gradients;
    :meth:`input_gram` and :meth:`output_gram` are computed once and shared."""

    layout: EntryLayout
    inputs: dict[str, torch.Tensor]
    grads: list[dict[str, torch.Tensor]]
    _cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def input_gram(self) -> torch.Tensor:
        """``sum x x^T`` over positions of the entries' layer inputs (at their input indices), same-layer pairs only."""
        if "input" not in self._cache:
            xs = gather_columns(self.inputs, self.layout, self.layout.in_index)
            self._cache["input"] = (xs.T @ xs) * self.layout.same_layer()
        return self._cache["input"]

    def output_gram(self) -> torch.Tensor:
        """``sum delta delta^T`` over positions and draws of the sampled-label output gradients, same-layer pairs only."""
        if "output" not in self._cache:
            g = torch.zeros_like(self.input_gram())
            for d in self.grads:
                ds = gather_columns(d, self.layout, self.layout.out_index)
                g += ds.T @ ds
            self._cache["output"] = g * self.layout.same_layer()
        return self._cache["output"]


@dataclass
class MatrixContext:
    """What :meth:`Approximation.matrix` sees: the exact ``H`` (float64, normalized by ``N``), ``N = n_tokens``,
    ``P = positions``, the label draws and the subset's layout (``None`` without layer-based approximations)."""

    exact: torch.Tensor
    n_tokens: int
    positions: int
    fisher_samples: int
    layout: EntryLayout | None


# ----------------------------------------------------------------------------- sources


class Source:
    """An intermediate computed once per batch for every approximation that reads it."""

    name: ClassVar[str]
    order: ClassVar[int] = 100
    needs_layout: ClassVar[bool] = False

    def steps(self, n: int) -> int:
        """Progress steps per batch for a subset of ``n`` entries."""
        return 0

    def run(
        self, inputs: BatchInputs, users: list[Approximation], progress: Progress | None
    ) -> Partial:
        raise NotImplementedError


class LogitJacobian(Source):
    """``J_t`` of the softmax's inputs (the head's inputs with the fused head: ``J_t = W dh_t/dx``), one column per
    Jacobian-vector product (``n`` per batch), then the users' accumulators over token chunks of ``C = J_t``."""

    name = "logit_jacobian"
    order = 10

    def steps(self, n: int) -> int:
        return n

    def run(
        self, inputs: BatchInputs, users: list[Approximation], progress: Progress | None
    ) -> Partial:
        n, batch = inputs.subset.size, inputs.batch
        x = inputs.x0.detach().clone().requires_grad_(True)
        feats, weight, bias = inputs.objective.features(x, batch)
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        fn = lambda z: inputs.objective.features(z, batch)[0]  # noqa: E731 -- for forward-mode J v
        jvp = inputs.jvp if inputs.jvp is not None else JVPPolicy()
        jac = jvp.columns(fn, x, eye, lambda v: jacobian_columns(feats, x, v)).permute(
            1, 2, 0
        )  # (T, m, n)
        if progress is not None:
            progress(n)
        feats = feats.detach()
        logits = feats if weight is None else feats @ weight.T + (0 if bias is None else bias)
        p = torch.softmax(logits.to(torch.float64), -1)
        per_row = batch.shape[1] - 1
        unit = JacobianUnit(
            inputs, p, batch[:, 1:].reshape(-1), torch.arange(p.shape[0]) // per_row, per_row, n
        )
        accumulators = [u.jacobian_accumulator(unit) for u in users]
        for sl, c in logit_jacobian_chunks(jac, None if weight is None else weight.detach()):
            pc = p[sl].to(c.device)
            for acc in accumulators:
                acc.add(sl, c, pc)
        out: Partial = {}
        for acc in accumulators:
            out.update(acc.result())
        return out


class LayerStatistics(Source):
    """One forward with hooks on the subset's linear layers: their inputs, and with sampled labels
    (``fisher_samples`` draws, when a user needs them) the gradients w.r.t. their outputs."""

    name = "layer_statistics"
    order = 20
    needs_layout = True

    def run(
        self, inputs: BatchInputs, users: list[Approximation], progress: Progress | None
    ) -> Partial:
        draws = inputs.fisher_samples if any(u.output_grads for u in users) else 0
        found, grads = layer_inputs_and_output_grads(
            inputs.model, inputs.layout, inputs.batch, draws, inputs.seed, inputs.first
        )
        unit = LayerUnit(inputs.layout, found, grads)
        out: Partial = {}
        for u in users:
            out.update(u.layer_sums(unit))
        return out


LOGIT_JACOBIAN = LogitJacobian()
LAYER_STATISTICS = LayerStatistics()


# ----------------------------------------------------------------------------- approximations


class Approximation:
    """A curvature approximation. Subclasses (one per module, decorated with :func:`register`) set ``name``, ``order``
    (position in :data:`REGISTRY`), ``source`` (the :class:`Source` they read, or ``None``), ``sampled`` (they draw
    ``fisher_samples`` labels per position), ``output_grads`` (layer sources: they need the output gradients),
    ``cost`` and ``normalization`` (in words, for the JSON); and implement their source's hook and :meth:`matrix`."""

    name: ClassVar[str]
    order: ClassVar[int] = 100
    source: ClassVar[Source | None] = None
    sampled: ClassVar[bool] = False
    output_grads: ClassVar[bool] = False
    cost: ClassVar[str] = ""
    normalization: ClassVar[str] = ""

    def jacobian_accumulator(self, unit: JacobianUnit) -> Accumulator:
        """(:data:`LOGIT_JACOBIAN` users) A fresh accumulator of this batch's sums."""
        raise NotImplementedError

    def layer_sums(self, unit: LayerUnit) -> Partial:
        """(:data:`LAYER_STATISTICS` users) This batch's sums."""
        raise NotImplementedError

    def matrix(self, sums: Partial, ctx: MatrixContext) -> torch.Tensor:
        """The ``(n, n)`` float64 matrix from the summed partials."""
        raise NotImplementedError


REGISTRY: Registry[Approximation] = Registry("approximation")
"""Every ``--compare`` approximation by name (filled by :mod:`lib.estimators.approximations`)."""
register = REGISTRY.register


def sources(approximations: list[str]) -> list[tuple[Source, list[Approximation]]]:
    """The sources the approximations read, in source order, each with its users (in the order given)."""
    users: dict[str, tuple[Source, list[Approximation]]] = {}
    for a in REGISTRY.lookup(approximations):
        if a.source is not None:
            users.setdefault(a.source.name, (a.source, []))[1].append(a)
    return sorted(users.values(), key=lambda item: item[0].order)
