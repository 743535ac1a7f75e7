"""Flat subsets ``x`` of a model's weights: which entries, in which order.

A :class:`Subset` is an ordered list of :class:`ParamSlice` (a parameter name and flat indices into
that parameter). The flat vector ``x`` is the concatenation of the slices, so row ``k`` of the
Hessian corresponds to ``Subset.entries(model)[k]``.

The paper's subsets take the first ``t`` entries of *row 0* of a linear layer's weight, i.e. the
weights feeding output unit 0: ``weight[0, :t]`` for ``nn.Linear`` (stored ``(out, in)``) and
``weight[:t, 0]`` for GPT-2's ``Conv1D`` (stored ``(in, out)``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..app.early_checks import (
    block_index_error,
    layer_name_error,
    num_blocks_error,
    num_layers_error,
    row_length_error,
)
from ..app.suggest import glob_suggestion
from ..deprecation import renamed_keywords
from ..errors import ParamError
from ..model.models import find_blocks, linear_layers


@dataclass(frozen=True)
class ParamSlice:
    """Entries ``param.view(-1)[flat_index]`` of the parameter called ``param_name``."""

    param_name: str
    flat_index: torch.Tensor  # (n,) int64

    def __len__(self) -> int:
        return int(self.flat_index.numel())


@dataclass(frozen=True)
class Subset:
    """An ordered union of parameter slices; ``x`` is their concatenation (length ``size``)."""

    slices: tuple[ParamSlice, ...]
    description: str = ""

    @property
    def size(self) -> int:
        return sum(len(s) for s in self.slices)

    @property
    def param_names(self) -> list[str]:
        return [s.param_name for s in self.slices]

    def gather(self, model: nn.Module) -> torch.Tensor:
        """``x0``: the current values of the selected entries, shape ``(size,)``."""
        parts = [
            model.get_parameter(s.param_name)
            .detach()
            .reshape(-1)[s.flat_index.to(model.get_parameter(s.param_name).device)]
            for s in self.slices
        ]
        devices = {p.device for p in parts}
        if len(devices) > 1:  # a model split over devices: gather on the first one
            parts = [p.to(parts[0].device) for p in parts]
        return torch.cat(parts)

    def entries(self, model: nn.Module) -> list[list]:
        """One ``[param_name, *index]`` per flat position, indices into the stored parameter tensor."""
        out: list[list] = []
        for s in self.slices:
            shape = model.get_parameter(s.param_name).shape
            idx = torch.unravel_index(s.flat_index, shape)
            rows = torch.stack(idx, dim=1).tolist() if len(shape) else [[] for _ in range(len(s))]
            out.extend([s.param_name, *r] for r in rows)
        return out


def _check_block(model: nn.Module, block_index: int) -> tuple[str, nn.Module]:
    prefix, blocks = find_blocks(model)
    if not 0 <= block_index < len(blocks):
        raise block_index_error(block_index, len(blocks))
    return f"{prefix}.{block_index}", blocks[block_index]


def layer_module(model: nn.Module, block_index: int, layer_name: str) -> tuple[str, nn.Module]:
    """``(qualified weight name, module)`` of linear layer ``layer_name`` in block ``block_index``; validated."""
    block_name, block = _check_block(model, block_index)
    layers = dict(linear_layers(block))
    if layer_name not in layers:
        raise layer_name_error(layer_name, list(layers))
    return f"{block_name}.{layer_name}.weight", layers[layer_name]


def row0_slice(model: nn.Module, block_index: int, layer_name: str, t: int) -> ParamSlice:
    """The first ``t`` weights of output unit 0 of ``layer_name`` in block ``block_index``."""
    param_name, module = layer_module(model, block_index, layer_name)
    weight = module.weight
    conv1d = type(module).__name__ == "Conv1D"
    row_len = weight.shape[0] if conv1d else weight.shape[1]
    if t < 1:
        raise ParamError("t", f"t must be at least 1, got {t}")
    if t > row_len:
        raise row_length_error(t, layer_name, row_len)
    n_out = weight.shape[1] if conv1d else weight.shape[0]
    flat = torch.arange(t) * n_out if conv1d else torch.arange(t)
    return ParamSlice(param_name, flat)


def output_units_index(module: nn.Module, units: int) -> torch.Tensor:
    """Flat indices into ``module.weight`` of all weights of output units ``0..units-1``, in storage order.

    ``weight[:units, :]`` for ``nn.Linear`` (stored ``(out, in)``); ``weight[:, :units]`` for GPT-2's
    ``Conv1D`` (stored ``(in, out)``).
    """
    weight = module.weight
    if type(module).__name__ == "Conv1D":
        n_in, n_out = weight.shape
        return (torch.arange(n_in)[:, None] * n_out + torch.arange(units)[None, :]).reshape(-1)
    return torch.arange(units * weight.shape[1])


def num_output_units(module: nn.Module) -> int:
    """Output units of a linear layer (rows of ``nn.Linear.weight``, columns of ``Conv1D.weight``)."""
    w = module.weight
    return w.shape[1] if type(module).__name__ == "Conv1D" else w.shape[0]


def whole_parameter(model: nn.Module, param_name: str, description: str = "") -> Subset:
    """All entries of one parameter in storage (flat) order, so ``x`` is ``param.reshape(-1)``."""
    numel = model.get_parameter(param_name).numel()
    return Subset(
        (ParamSlice(param_name, torch.arange(numel)),),
        description or f"all {numel} entries of {param_name}",
    )


def num_blocks(model: nn.Module) -> int:
    """Number of transformer blocks."""
    return len(find_blocks(model)[1])


def layer_names(model: nn.Module, block_index: int) -> list[str]:
    """Names of the linear layers of one block, in module order."""
    return [name for name, _ in linear_layers(_check_block(model, block_index)[1])]


def blocks_text(n_blocks: int) -> str:
    """``block 0`` for one block, else ``blocks 0..N-1``."""
    return "block 0" if n_blocks == 1 else f"blocks 0..{n_blocks - 1}"


def _check_num_blocks(model: nn.Module, n: int) -> None:
    total = num_blocks(model)
    if not 1 <= n <= total:
        raise num_blocks_error(n, total)


def single_layer_single_block(
    model: nn.Module, layer_name: str, block_index: int, t: int
) -> Subset:
    """Paper Sec. 4.1: ``x = w_{0,:t}`` of one layer of one block.

    Args:
        model: a causal LM (its blocks found by :func:`lib.model.models.find_blocks`).
        layer_name: a linear layer's name relative to the block, e.g. ``self_attn.q_proj``.
        block_index: the block, ``0 <= block_index < num_blocks``.
        t: how many leading entries of the weight's row 0 (1 to the row's length).

    Returns:
        The subset of ``t`` entries: ``x`` has shape ``(t,)`` and the Hessian ``(t, t)``.

    Raises:
        ParamError: ``block_index``, ``layer_name`` or ``t`` does not fit the model.
    """
    s = row0_slice(model, block_index, layer_name, t)
    return Subset((s,), f"first {t} weights of row 0 of {layer_name} in block {block_index}")


@renamed_keywords(n_blocks="num_blocks")
def single_layer_several_blocks(
    model: nn.Module, layer_name: str, num_blocks: int, t: int
) -> Subset:
    """Paper Sec. 4.3: the same layer in blocks ``0..num_blocks-1``, block-major.

    Args:
        model: a causal LM.
        layer_name: a linear layer's name relative to the block, e.g. ``self_attn.q_proj``.
        num_blocks: how many leading blocks, ``1 <= num_blocks <=`` the model's blocks (old keyword ``n_blocks``).
        t: leading entries of row 0 of the layer's weight in each block.

    Returns:
        The subset of ``num_blocks * t`` entries (``x``: ``(num_blocks * t,)``), block 0's first.

    Raises:
        ParamError: ``num_blocks``, ``layer_name`` or ``t`` does not fit the model.
    """
    _check_num_blocks(model, num_blocks)
    slices = tuple(row0_slice(model, b, layer_name, t) for b in range(num_blocks))
    return Subset(
        slices, f"first {t} weights of row 0 of {layer_name} in {blocks_text(num_blocks)}"
    )


@renamed_keywords(n_layers="num_layers", n_blocks="num_blocks")
def several_layers_several_blocks(
    model: nn.Module, num_layers: int, num_blocks: int, t: int
) -> Subset:
    """Paper Sec. 4.2/4.4: for each block ``0..num_blocks-1``, its first ``num_layers`` linear layers (module order).

    Args:
        model: a causal LM.
        num_layers: linear layers per block (module order, :func:`lib.model.models.linear_layers`), at least 1
            (old keyword ``n_layers``).
        num_blocks: how many leading blocks (old keyword ``n_blocks``).
        t: leading entries of row 0 of each chosen layer's weight.

    Returns:
        The subset of ``num_blocks * num_layers * t`` entries, block-major, then layer by layer.

    Raises:
        ParamError: ``num_blocks``, ``num_layers`` or ``t`` does not fit the model.
    """
    _check_num_blocks(model, num_blocks)
    slices: list[ParamSlice] = []
    for b in range(num_blocks):
        names = layer_names(model, b)
        if not 1 <= num_layers <= len(names):
            raise num_layers_error(num_layers, b, names)
        slices.extend(row0_slice(model, b, name, t) for name in names[:num_layers])
    return Subset(
        tuple(slices),
        f"first {t} weights of row 0 of the first {num_layers} linear layers in {blocks_text(num_blocks)}",
    )


def from_indices(
    model: nn.Module,
    param_name: str,
    indices: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
) -> ParamSlice:
    """A slice of any parameter from flat indices ``[k, ...]`` or multi-indices ``[[i, j], ...]``.

    Args:
        model: the model that holds the parameter.
        param_name: the parameter's qualified name (``model.get_parameter``).
        indices: flat indices, shape ``(m,)``, or multi-indices, shape ``(m, param.ndim)`` (a contiguous
            parameter), as int sequences or an integer tensor.

    Returns:
        The slice, with flat int64 indices of shape ``(m,)`` in the order given.

    Raises:
        ParamError: an unknown ``param_name``; ``indices`` out of range, duplicated or with the wrong number
            of columns.
    """
    try:
        param = model.get_parameter(param_name)
    except AttributeError:
        raise ParamError("param_name", f"unknown parameter param_name {param_name!r}") from None
    idx = torch.as_tensor(indices, dtype=torch.long)
    if idx.ndim == 2:
        strides = torch.tensor(param.stride(), dtype=torch.long) if param.is_contiguous() else None
        if strides is None or idx.shape[1] != param.ndim:
            raise ParamError(
                "indices", f"indices: multi-indices for {param_name} must have {param.ndim} columns"
            )
        idx = (idx * strides).sum(1)
    if idx.numel() and (idx.min() < 0 or idx.max() >= param.numel()):
        raise ParamError(
            "indices", f"indices out of range for {param_name} with {param.numel()} entries"
        )
    if torch.unique(idx).numel() != idx.numel():
        raise ParamError("indices", f"indices for {param_name} contain duplicates")
    return ParamSlice(param_name, idx.reshape(-1))


def random_subset(
    model: nn.Module, param_names: Sequence[str], size_per_param: int, seed: int = 0
) -> Subset:
    """``size_per_param`` distinct uniformly random entries of each named parameter (sorted), reproducible by ``seed``.

    Args:
        model: the model that holds the parameters.
        param_names: qualified parameter names, in the order of ``x``.
        size_per_param: entries drawn from each parameter (at most its number of entries).
        seed: seed of the CPU generator (one generator across the parameters, in order).

    Returns:
        The subset of ``len(param_names) * size_per_param`` entries.

    Raises:
        ParamError: ``size_per_param`` exceeds a parameter's size.
    """
    gen = torch.Generator().manual_seed(seed)
    slices = []
    for name in param_names:
        numel = model.get_parameter(name).numel()
        if size_per_param > numel:
            raise ParamError(
                "size_per_param",
                f"size_per_param {size_per_param}: cannot pick so many entries of {name}, which has {numel}",
            )
        idx = torch.randperm(numel, generator=gen)[:size_per_param].sort().values
        slices.append(ParamSlice(name, idx))
    return Subset(
        tuple(slices),
        f"{size_per_param} random entries of each of {len(slices)} parameters (seed {seed})",
    )


def make_subset(*slices: ParamSlice, description: str = "") -> Subset:
    """Combine arbitrary slices into a subset (they must not overlap).

    Args:
        *slices: the slices, in the order of ``x`` (e.g. from :func:`from_indices`).
        description: a label for titles and JSON.

    Returns:
        The subset; ``x`` has ``sum(len(s) for s in slices)`` entries.

    Raises:
        ParamError: two slices of one parameter share an entry.
    """
    seen: dict[str, set[int]] = {}
    for s in slices:
        prev = seen.setdefault(s.param_name, set())
        cur = set(s.flat_index.tolist())
        if prev & cur:
            raise ParamError("slices", f"slices of {s.param_name} overlap")
        prev |= cur
    return Subset(tuple(slices), description)


def params_subset(model: nn.Module, globs: Sequence[str]) -> Subset:
    """Every entry of each parameter whose name matches a shell-style glob (``'*'``: all), in the model's parameter order.

    A glob that matches nothing is refused (:class:`~lib.errors.ParamError`) with a few real names. A name that is
    a tied alias (``lm_head.weight`` of a model whose head is tied to its input embedding) selects the one
    parameter under its first name.
    """
    names = [n for n, _ in model.named_parameters()]
    first = {id(p): n for n, p in model.named_parameters()}
    canonical = {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    chosen: set[str] = set()
    for pattern in globs:
        hits = {canonical[n] for n in fnmatch.filter(list(canonical), pattern)}
        if not hits:
            raise ParamError(
                "globs",
                f"globs {pattern!r} matches no parameter{glob_suggestion(pattern, names)}; names look like: {', '.join(names[:2] + names[-2:])}",
            )
        chosen.update(hits)
    slices = tuple(whole_parameter(model, n).slices[0] for n in names if n in chosen)
    total = sum(len(s) for s in slices)
    return Subset(
        slices, f"all {total} entries of {len(slices)} parameter(s) matching {' '.join(globs)}"
    )
