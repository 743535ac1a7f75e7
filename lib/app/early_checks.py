"""Checks of a run's subset against the model's weight names and shapes, before torch is imported.

A wrong ``--layer_name``, ``--block_index``, ``--num_blocks``, ``--num_layers`` or ``--t`` is refused from the
``config.json`` and the safetensors headers of the weights on disk (a JSON header per file: names, shapes), in
well under a second, instead of after importing torch and transformers and building the model (seconds to
tens of seconds). Only architectures whose block layout is known here (:data:`LINEAR_LAYERS`) are checked, and
only when the headers confirm that layout; anything else is left to the checks on the module tree
(:mod:`lib.objective.subsets`), which use the same messages (the ``*_error`` functions below).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from .. import constants
from ..errors import ParamError, UserError
from ..paths import resolve_model_path
from .suggest import did_you_mean

LINEAR_LAYERS: dict[str, tuple[str, ...]] = {
    "opt": (
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.q_proj",
        "self_attn.out_proj",
        "fc1",
        "fc2",
    ),
    "llama": (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
    "gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
}
"""The linear layers of one block in module order (what :func:`lib.model.models.linear_layers` lists), by the
config's ``model_type``; a test keeps them equal to the module trees."""
LINEAR_LAYERS["qwen2"] = LINEAR_LAYERS["mistral"] = LINEAR_LAYERS["llama"]
BLOCKS = {
    "opt": "decoder.layers",
    "llama": "layers",
    "qwen2": "layers",
    "mistral": "layers",
    "gpt2": "h",
}
"""The dotted path of the block list inside the checkpoint's names (after an optional ``model.`` or
``transformer.`` prefix)."""
TRANSPOSED = {"gpt2"}
"""Architectures whose linear weights are stored ``(in, out)`` (GPT-2's ``Conv1D``)."""


# ----------------------------------------------------------------------------- messages (shared with lib.objective.subsets)


def block_index_error(index: int, n_blocks: int) -> ParamError:
    return ParamError(
        "block_index",
        f"block_index {index} is out of range: the model has {n_blocks} blocks (0..{n_blocks - 1})",
    )


def num_blocks_error(n: int, total: int) -> ParamError:
    return ParamError(
        "num_blocks",
        f"num_blocks {n} is out of range: the model has {total} blocks (use 1..{total})",
    )


def layer_name_error(name: str, layers: list[str]) -> ParamError:
    return ParamError(
        "layer_name",
        f"unknown layer_name {name!r}{did_you_mean(name, layers)}; the linear layers of a block are: "
        f"{', '.join(layers)}",
    )


def num_layers_error(n: int, block: int, layers: list[str]) -> ParamError:
    return ParamError(
        "num_layers",
        f"num_layers {n} is out of range: block {block} has {len(layers)} linear layers ({', '.join(layers)})",
    )


def row_length_error(t: int, layer: str, row_len: int) -> ParamError:
    return ParamError("t", f"t {t} is larger than a row of {layer} ({row_len} entries)")


# ----------------------------------------------------------------------------- the weights on disk


def model_directory(model: str, cache_dir: str | None) -> Path | None:
    """The folder holding ``model``'s ``config.json`` and weights: the bundled model, a local folder, or the
    Hugging Face cache's snapshot of a hub id (the revision ``main``, as ``from_pretrained`` would read it);
    ``None`` when there is none on disk."""
    path = Path(resolve_model_path(model))
    if path.is_dir():
        return path
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model, "config.json", cache_dir=cache_dir)
    except ValueError:  # not a valid hub id
        return None
    return Path(found).parent if isinstance(found, str) else None


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a ``.safetensors`` file: ``{name: {"dtype", "shape", "data_offsets"}}``."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file")
        return json.loads(f.read(size))


def weight_shapes(directory: Path) -> dict[str, tuple[int, ...]] | None:
    """``{name: shape}`` of every stored weight (one file or an index of shards); ``None`` without safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        for key, info in safetensors_header(directory / name).items():
            if key != "__metadata__":
                shapes[key] = tuple(info["shape"])
    return shapes


# ----------------------------------------------------------------------------- the layout


class Layout:
    """Blocks and linear layers of a known architecture, confirmed by the stored weights."""

    def __init__(self, model_type: str, n_blocks: int, shapes: dict[str, tuple[int, ...]]):
        self.model_type, self.n_blocks, self.layers = (
            model_type,
            n_blocks,
            list(LINEAR_LAYERS[model_type]),
        )
        self.shapes = shapes

    def row_length(self, block: int, layer: str) -> int | None:
        shape = self.shapes.get(f"{BLOCKS[self.model_type]}.{block}.{layer}.weight")
        if shape is None or len(shape) != 2:
            return None
        return shape[0] if self.model_type in TRANSPOSED else shape[1]


def layout(model: str, cache_dir: str | None) -> Layout | None:
    """The layout of ``model`` from its files on disk, or ``None`` when it cannot be read or confirmed: an
    unknown ``model_type``, no safetensors, a block count or a layer that the stored names do not show."""
    directory = model_directory(model, cache_dir)
    if directory is None or not (directory / "config.json").is_file():
        return None
    try:
        config = json.loads((directory / "config.json").read_text())
        shapes = weight_shapes(directory)
    except (OSError, ValueError, KeyError):
        return None
    model_type, n_blocks = (
        config.get("model_type"),
        config.get("num_hidden_layers", config.get("n_layer")),
    )
    if model_type not in LINEAR_LAYERS or not isinstance(n_blocks, int) or not shapes:
        return None
    blocks = BLOCKS[model_type]
    stripped: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        for prefix in ("model.", "transformer.", ""):
            if key.startswith(prefix + blocks + "."):
                stripped[key[len(prefix) :]] = shape
                break
    expected = {
        f"{blocks}.{b}.{layer}.weight"
        for b in range(n_blocks)
        for layer in LINEAR_LAYERS[model_type]
    }
    if (
        not expected <= set(stripped)
        or f"{blocks}.{n_blocks}.{LINEAR_LAYERS[model_type][0]}.weight" in stripped
    ):
        return None
    return Layout(model_type, n_blocks, stripped)


def check_subset(
    found: Layout,
    layer_name: str | None = None,
    block_index: int | None = None,
    num_blocks: int | None = None,
    num_layers: int | None = None,
    t: int | None = None,
) -> None:
    """Raise the :class:`ParamError` that :mod:`lib.objective.subsets` would raise for these subset fields (``None``:
    not given); the same order of checks: the block, the layer, the blocks, the layers, then ``t``."""
    if block_index is not None and not 0 <= block_index < found.n_blocks:
        raise block_index_error(block_index, found.n_blocks)
    if layer_name is not None and layer_name not in found.layers:
        raise layer_name_error(layer_name, found.layers)
    if num_blocks is not None and not 1 <= num_blocks <= found.n_blocks:
        raise num_blocks_error(num_blocks, found.n_blocks)
    if num_layers is not None and not 1 <= num_layers <= len(found.layers):
        raise num_layers_error(num_layers, 0, found.layers)
    if t is None or t < 1:
        return
    layers = (
        [layer_name] if layer_name is not None else found.layers[: num_layers or len(found.layers)]
    )
    for layer in layers:
        row = found.row_length(block_index or 0, layer)
        if row is not None and t > row:
            raise row_length_error(t, layer, row)


# ----------------------------------------------------------------------------- data, sequence length, outputs

WIKITEXT2 = constants.WIKITEXT2
SPECIAL_TOKENS_SLACK = 16
"""Tokens a tokenizer may add to a text beyond one per byte (BOS/EOS, a sentencepiece dummy prefix)."""


def max_positions(config: dict[str, Any]) -> int | None:
    """The longest sequence of a ``config.json`` (its ``text_config`` if nested), as :func:`lib.model.models.max_positions`."""
    cfg = config.get("text_config") or config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def config_positions(model: str, cache_dir: str | None) -> int | None:
    """:func:`max_positions` of ``model``'s ``config.json`` on disk, ``None`` when there is none or it cannot tell."""
    directory = model_directory(model, cache_dir)
    if directory is None:
        return None
    try:
        return max_positions(json.loads((directory / "config.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return None


def text_file(dataset: str, model: str) -> Path | None:
    """The text file that ``dataset`` names (``auto``: the bundled text for the bundled model), ``None`` for
    WikiText-2 (loaded through ``datasets``); :class:`ParamError` (the message of :func:`lib.model.data.load_text`) when
    it names no file."""
    from ..paths import EMBEDDED, assets_dir

    if dataset == "auto":
        dataset = EMBEDDED if model == EMBEDDED else WIKITEXT2
    if dataset == WIKITEXT2:
        return None
    if dataset == EMBEDDED:
        return assets_dir() / "shakespeare-heldout.txt"
    if not Path(dataset).is_file():
        raise ParamError(
            "dataset",
            f"dataset {dataset!r} is neither 'embedded', 'wikitext2' nor an existing text file",
        )
    return Path(dataset)


def check_data(
    model: str,
    cache_dir: str | None,
    dataset: str,
    seqlen: int | None,
    b: int | None,
    default_seqlen: int,
) -> None:
    """Refuse, from the config and the text file's size alone, what :func:`lib.app.pipeline.inspect` would refuse after
    tokenizing: ``seqlen`` below 2 or past the config's positions, ``b`` below 1, a ``dataset`` file that does not
    exist, and a ``b`` that the text cannot hold even at one token per byte (a byte-level tokenizer never gives more
    tokens than bytes; :data:`SPECIAL_TOKENS_SLACK` more for special tokens). Raises :class:`ParamError`."""
    limit = config_positions(model, cache_dir)
    if seqlen is not None and seqlen < 2:
        raise ParamError("seqlen", f"seqlen must be at least 2 (one predicted token), got {seqlen}")
    if seqlen is not None and limit is not None and seqlen > limit:
        raise ParamError(
            "seqlen", f"seqlen {seqlen} exceeds the model's maximum sequence length {limit}"
        )
    if b is not None and b < 1:
        raise ParamError("b", f"b must be at least 1, got {b}")
    path = text_file(dataset, model)
    if path is None or b is None:
        return
    if seqlen is None:
        seqlen = min(default_seqlen, limit or default_seqlen)
    try:
        most = path.stat().st_size + SPECIAL_TOKENS_SLACK
    except OSError:
        return
    if b * seqlen > most:
        raise ParamError(
            "b",
            f"b {b} needs {b * seqlen} tokens but the text {path.name} ({most - SPECIAL_TOKENS_SLACK} bytes) "
            f"has at most {most} tokens: at most {most // seqlen} samples of seqlen {seqlen} exist",
        )


def finished_default(out: Path, script: str, digest: str) -> Path | None:
    """The finished result of this configuration under its default name in ``out``, if any: a
    ``<script>_..._<digest>.json`` (every default name is ``<script>_<readable fields>_<spec digest>``) whose
    ``script`` and ``spec_digest`` are this run's."""
    try:
        candidates = sorted(out.glob(f"{script}_*_{digest}.json"))
    except OSError:
        return None
    for js in candidates:
        try:
            meta = json.loads(js.read_text())
        except (OSError, ValueError):
            continue
        if (
            isinstance(meta, dict)
            and meta.get("script") == script
            and meta.get("spec_digest") == digest
        ):
            return js
    return None


def check_outputs(
    output_dir: str,
    name: str | None,
    overwrite: bool,
    skip_existing: bool,
    script: str | None = None,
    digest: str | None = None,
) -> None:
    """Refuse what :func:`lib.app.outputs.claim` would refuse (the same messages): an explicit ``--name`` that is not a
    plain file name, an ``--output_dir`` that is a file, a finished result of an explicit ``--name`` without
    ``--overwrite`` or ``--skip_existing``, and this configuration's finished result under its default name
    (``script`` and ``digest``: :func:`finished_default`)."""
    from ..errors import UserError

    out = Path(output_dir)
    if name is not None and (
        not name or name in (".", "..") or "/" in name or "\0" in name or name.startswith(".")
    ):
        raise UserError(
            f"--name {name!r} is not a plain file name (no '/', not '.', '..' or a hidden name); use --output_dir for the folder"
        )
    if out.exists() and not out.is_dir():
        raise UserError(
            f"--output_dir {str(out)!r} is a file, not a directory; choose another --output_dir"
        )
    if overwrite or skip_existing:
        return
    if name is None:
        found = finished_default(out, script, digest) if script and digest else None
        if found is None:
            return
        finished = found
    else:
        finished = out / f"{name}.json"
        try:
            if not finished.is_file():
                return
        except OSError:  # e.g. a name too long for the file system: the claim says so
            return
    raise UserError(
        f"{finished} holds a finished result; pass --overwrite to replace it, --skip_existing to keep it "
        f"(exit 0 when it holds this configuration), or choose another --name"
    )


def finite_difference_check(
    method: str | None, fd_step: float | None, richardson: bool, dtype: str
) -> None:
    """The command line's check of the finite-difference flags (moved from :mod:`lib.products.finite_difference`: the
    library names parameters, not flags). Refuses settings that cannot work (:class:`lib.errors.UserError`, one line): ``--method
    autograd`` (the paper's reference has no finite-difference form) and a step that underflows ``dtype``."""
    if method == "autograd":
        raise UserError(
            "--hvp finite_difference replaces the double backward, but --method autograd is the paper's "
            "torch.autograd.functional.hessian, which has no finite-difference form; use --method rev-rev (the default) "
            "or --hvp exact"
        )
    import torch

    from ..products.finite_difference import default_relative_step, underflow_message

    torch_dtype = getattr(torch, dtype)
    h = fd_step if fd_step is not None else default_relative_step(torch_dtype, richardson)
    msg = underflow_message(h, torch_dtype)
    if msg is not None:
        raise UserError(f"--fd_step: {msg}")
