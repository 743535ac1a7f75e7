"""Loading Hugging Face causal LMs for Hessian work and discovering their blocks and linear layers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ParamError, UserError
from ..paths import (  # noqa: E402,F401  (re-exported)
    EMBEDDED,
    EMBEDDED_MODEL_DIR,
    ROOT,
    assets_dir,
    resolve_model_path,
)
from .inputs import (
    check_causal_lm,
    check_finite_weights,
    check_loading_info,
    code_path,
    config_fingerprint,
    hub_offline_if_unreachable,
    model_fingerprint,
    read_local_config,
)
from .precision import KEEP_DTYPE_ATTENTION, keep_float64

ATTENTION_WITH_DOUBLE_BACKWARD = ("eager", "sdpa")
"""``eager`` attention, or ``sdpa`` run under the math backend, support second derivatives."""


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the current CUDA device if there is one, else the CPU; otherwise ``torch.device(device)``.

    Raises :class:`ParamError` (``device``) for a string that is not a device, or CUDA without CUDA."""
    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ParamError(
            "device",
            f"invalid device {device!r}: give a torch device such as cpu, cuda, cuda:1 or mps",
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParamError("device", f"device {device} requested but CUDA is not available; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ParamError(
            "device",
            f"device {device} requested but this machine has {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})",
        )
    return dev


def _offline_hint(name: str) -> str:
    return (
        f"cannot load model {name!r}. If it is a hub id, the Hugging Face hub is unreachable or the model is "
        "not in --cache_dir: download it once on a machine with internet, then run with HF_HUB_OFFLINE=1, "
        "or pass a local directory with --model PATH (a folder holding config.json and the weights)."
    )


def _check_attention(attn_implementation: str) -> None:
    if attn_implementation not in ATTENTION_WITH_DOUBLE_BACKWARD:
        raise UserError(
            f"attention {attn_implementation!r} has no double backward, which exact Hessians need; "
            f"use one of {', '.join(ATTENTION_WITH_DOUBLE_BACKWARD)} (eager is the default)"
        )


def _model_path(name: str) -> tuple[str, bool]:
    """``(path or hub id, whether it is a local directory)``, the local ``config.json`` checked, the hub probed."""
    path = resolve_model_path(name)
    if name == EMBEDDED and not Path(path, "config.json").is_file():
        raise UserError(
            f"the embedded model is missing at {path}; rebuild it with tools/train_embedded_model.py"
        )
    local = Path(path).is_dir()
    if local:
        read_local_config(Path(path))
    else:
        hub_offline_if_unreachable()
    return path, local


def _load_failure(
    name: str, path: str, local: bool, attn_implementation: str, e: Exception
) -> UserError:
    """One line for a model that cannot be loaded (hub unreachable, not cached, bad path, unknown architecture, corrupt file)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "attn" in msg.lower() or "attention" in msg.lower():
        return UserError(f"model {name!r} cannot use {attn_implementation} attention: {msg}")
    if local:
        return UserError(f"cannot load model directory {path} ({type(e).__name__}: {msg})")
    return UserError(f"{_offline_hint(name)} ({type(e).__name__}: {msg})")


def model_skeleton(
    name: str,
    cache_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    revision: str | None = None,
) -> nn.Module | None:
    """The model's module tree on the ``meta`` device, built from its config alone: every module, parameter name
    and shape, no weight read or allocated (milliseconds, where loading a large model takes seconds). ``revision``:
    the hub revision whose config is read (None: the default).

    Refuses (:class:`UserError`) what :func:`load_model` would refuse before reading weights: a missing or
    corrupt config, an unknown model, attention without a double backward, a model that is not a causal LM.
    Returns ``None`` when the architecture cannot be built on the meta device (the checks then wait for the weights).
    """
    _check_attention(attn_implementation)
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path, local = _model_path(name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        try:
            config = AutoConfig.from_pretrained(
                path, cache_dir=cache_dir, **({} if revision is None else {"revision": revision})
            )
        except Exception as e:  # noqa: BLE001 -- unreachable, not cached, bad path, unknown architecture
            if not local and not isinstance(e, (OSError, ValueError, KeyError)):
                raise
            raise _load_failure(name, path, local, attn_implementation, e) from None
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(
                    config, attn_implementation=attn_implementation, dtype=dtype
                )
        except ValueError as e:
            if "attn" in str(e).lower() or "attention" in str(e).lower():
                raise _load_failure(name, path, local, attn_implementation, e) from None
            return None
        except Exception:  # noqa: BLE001 -- an architecture that needs real tensors to build: check after loading
            return None
    finally:
        hf_logging.set_verbosity(verbosity)
    check_causal_lm(name, model)
    return model


def load_model(
    name: str,
    cache_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    attn_implementation: str = "eager",
    device_map: str | dict | None = None,
    revision: str | None = None,
) -> nn.Module:
    """Load ``AutoModelForCausalLM`` in eval mode with all parameters frozen (``requires_grad=False``).

    ``revision``: a Hugging Face revision (branch, tag or commit, e.g. Pythia's ``step1000``) of a hub model.

    Attention must have a double backward: ``eager`` (default) or ``sdpa`` (evaluated with the math
    backend, see :func:`attention_context`); flash attention is refused.

    Args:
        name: ``"embedded"`` (the bundled tiny model), a Hugging Face model id or a local model directory.
        cache_dir: the Hugging Face cache.
        dtype: the parameters' dtype (``torch.float64`` keeps every step in float64, :func:`prepare_model`).
        device: where the model goes (ignored with ``device_map``).
        attn_implementation: ``"eager"`` or ``"sdpa"``.
        device_map: a Hugging Face strategy (``"auto"``, ...), a dict or a JSON object string mapping modules
            to devices or ``"disk"`` (:func:`parse_device_map`); ``None``: the whole model on ``device``.
        revision: a hub revision (branch, tag or commit); ``None``: the default.

    Returns:
        The model, in eval mode with frozen parameters.

    Raises:
        UserError: an unsupported attention, a model that cannot be loaded, is not a causal LM, loads with
            missing or mismatched weights, or has non-finite weights.
        ParamError: a malformed ``device_map``.
    """
    _check_attention(attn_implementation)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our own progress bar and one-line errors
    path, local = _model_path(name)
    kwargs = dict(
        cache_dir=cache_dir,
        dtype=dtype,
        attn_implementation=attn_implementation,
        output_loading_info=True,
        ignore_mismatched_sizes=True,
    )
    if revision is not None:
        kwargs["revision"] = revision
    if device_map is not None:
        kwargs["device_map"] = parse_device_map(device_map)
        if isinstance(kwargs["device_map"], dict) and "disk" in kwargs["device_map"].values():
            kwargs["offload_folder"] = str(
                offload_folder(name, cache_dir, dtype, kwargs["device_map"])
            )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report: we check it ourselves and say what matters in one line
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (
        Exception
    ) as e:  # hub unreachable, not cached, bad path, unknown architecture, corrupt weight file
        if not local and not isinstance(e, (OSError, ValueError, KeyError)):
            raise
        raise _load_failure(name, path, local, attn_implementation, e) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if getattr(
        model.config, "_attn_implementation", attn_implementation
    ) != attn_implementation and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(
            attn_implementation
        )  # a saved config's "attn_implementation" (the embedded model's) overrides the request
    check_loading_info(name, {**info, "model_class": type(model).__name__})
    check_causal_lm(name, model)
    check_finite_weights(model)
    if device_map is None:
        model.to(device)
    return prepare_model(model)


def parse_device_map(device_map: str | dict) -> str | dict:
    """``--device_map``: a Hugging Face strategy (``auto``, ``balanced``, ...) or a JSON object ``{"module": "cuda:0" | "cpu" |
    "disk", ...}`` (modules on ``disk`` are offloaded by accelerate and loaded layer by layer during the forward)."""
    if isinstance(device_map, str) and device_map.lstrip().startswith("{"):
        import json

        try:
            parsed = json.loads(device_map)
        except json.JSONDecodeError as e:
            raise ParamError(
                "device_map",
                f"device_map {device_map!r} is not a valid JSON object ({e.msg} at character {e.pos})",
            ) from None
        if not isinstance(parsed, dict) or not all(
            isinstance(v, (str, int)) for v in parsed.values()
        ):
            raise ParamError(
                "device_map",
                f'device_map {device_map!r} must map module names to devices, e.g. \'{{"model.decoder.layers.1": "disk"}}\'',
            )
        return parsed
    return device_map


def offload_folder(name: str, cache_dir: str | None, dtype: torch.dtype, device_map: dict) -> Path:
    """Where accelerate keeps the modules a ``device_map`` puts on ``disk``: ``<cache_dir>/offload/<digest of model, dtype and map>``."""
    import hashlib
    import json

    key = hashlib.sha256(
        json.dumps([resolve_model_path(name), str(dtype), device_map], sort_keys=True).encode()
    ).hexdigest()[:16]
    return Path(cache_dir or ".") / "offload" / key


def offloaded_parameters(model: nn.Module, names: list[str]) -> list[str]:
    """The ``names`` whose parameters a ``device_map`` offloaded (kept on the meta device, loaded only inside the forward)."""
    return [n for n in names if model.get_parameter(n).is_meta]


def prepare_model(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode, freeze its parameters and check its attention kernel; returns it.

    A float64 model is made float64 in every step (:func:`lib.model.precision.keep_float64`).

    Args:
        model: a Hugging Face causal LM.

    Returns:
        The same model object, prepared in place.

    Raises:
        UserError: its attention implementation has no double backward.
    """
    model.eval()
    model.requires_grad_(False)
    impl = getattr(model.config, "_attn_implementation", "eager")
    if impl not in (*ATTENTION_WITH_DOUBLE_BACKWARD, KEEP_DTYPE_ATTENTION):
        raise UserError(
            f"the model uses {impl!r} attention, which has no double backward; load it with "
            "attn_implementation='eager'"
        )
    return keep_float64(model)


def attention_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """Context in which the model's forward is twice differentiable (SDPA forced to its math kernel)."""
    if getattr(model.config, "_attn_implementation", "eager") == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def text_config(model: nn.Module):
    """The language-model part of the config (multimodal configs nest it)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def max_positions(model: nn.Module) -> int | None:
    """Longest sequence the model accepts (``max_position_embeddings`` or GPT-2's ``n_positions``)."""
    cfg = text_config(model)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: ``(qualified name, ModuleList)``.

    Found generically as the largest ``nn.ModuleList`` holding ``num_hidden_layers`` modules
    (``model.decoder.layers`` for OPT, ``model.layers`` for Llama/Qwen2/Mistral, ``transformer.h`` for GPT-2).

    Args:
        model: a causal LM.

    Returns:
        ``(name, blocks)``: the ``ModuleList``'s qualified name and the list itself.

    Raises:
        UserError: no such ``ModuleList``.
    """
    n = getattr(text_config(model), "num_hidden_layers", None)
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and (n is None or len(module) == n)
        ):
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise UserError(f"cannot find the transformer blocks of {type(model).__name__}")
    return best[1], best[2]


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D`` (a linear layer whose weight is stored as ``(in, out)``)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_layers(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear layers of a block in module order, with names relative to the block (e.g. ``self_attn.q_proj``).

    Args:
        block: one transformer block (an element of :func:`find_blocks`'s list).

    Returns:
        ``[(name, module), ...]`` for each ``nn.Linear`` or GPT-2 ``Conv1D`` in it.
    """
    return [(name, m) for name, m in block.named_modules() if name and is_linear(m)]


def iter_named_linear(model: nn.Module) -> Iterator[tuple[int, str, str, nn.Module]]:
    """``(block_index, layer_name, qualified_module_name, module)`` for every linear layer of every block."""
    prefix, blocks = find_blocks(model)
    for b, block in enumerate(blocks):
        for lname, m in linear_layers(block):
            yield b, lname, f"{prefix}.{b}.{lname}", m


@dataclass
class ModelSpec:
    """How to load a model, picklable so that worker processes can load their own copy."""

    name: str = EMBEDDED
    cache_dir: str | None = None
    dtype: str = "float32"
    attn_implementation: str = "eager"
    device_map: str | None = None

    fingerprint: str | None = None
    """:func:`lib.model.inputs.model_fingerprint` of the model the run uses; every process checks its copy against it."""
    tokenizer_fingerprint: str | None = None
    """:func:`lib.model.inputs.tokenizer_fingerprint` of the tokenizer that made the samples."""
    config_fingerprint: str | None = None
    """:func:`lib.model.inputs.config_fingerprint`: the configuration that changes the forward."""
    code: str | None = None
    """:func:`lib.model.inputs.code_path`: transformers and torch versions, model class, attention implementation."""
    matmul_precision: str = "highest"
    """``torch.set_float32_matmul_precision`` of every process that loads this spec (``--matmul_precision``)."""
    revision: str | None = None
    """The hub revision of ``name`` to load (``from_pretrained(revision=...)``), best a commit hash
    (:func:`lib.model.revisions.resolve_commit`) so that every process reads the same snapshot; None: the default."""

    def identity(self) -> dict[str, str | None]:
        """What determines the numbers (for checkpoint validation): not where the weights are cached or placed
        (the matmul precision only when lowered, the revision only when given, so that default runs keep their
        identity)."""
        keys = ("name", "dtype", "attn_implementation", "fingerprint", "tokenizer_fingerprint")
        keys += ("config_fingerprint", "code")
        if self.matmul_precision != "highest":
            keys += ("matmul_precision",)
        if self.revision is not None:
            keys += ("revision",)
        return {k: getattr(self, k) for k in keys}

    def load(self, device: torch.device | str = "cpu") -> nn.Module:
        """Load the model, with this process's float32 matmul precision set to :attr:`matmul_precision`; with a
        ``fingerprint``, refuse a copy whose content differs from it."""
        torch.set_float32_matmul_precision(self.matmul_precision)
        model = load_model(
            self.name,
            self.cache_dir,
            getattr(torch, self.dtype),
            device,
            self.attn_implementation,
            self.device_map,
            self.revision,
        )
        checks = (
            ("fingerprint", model_fingerprint, "fingerprint"),
            ("config_fingerprint", config_fingerprint, "configuration"),
            ("code", code_path, "code"),
        )
        for attr, measure, what in checks:
            want = getattr(self, attr)
            if want is None:
                continue
            got = measure(model)
            if got != want:
                shown = (want, got) if attr == "code" else (want[:12], got[:12])
                at = "" if self.revision is None else f" at revision {self.revision}"
                raise UserError(
                    f"this process loaded a different model {self.name!r}{at} than the run started with "
                    f"({what} {shown[0]} -> {shown[1]}): its files changed during the run; rerun"
                )
        return model
