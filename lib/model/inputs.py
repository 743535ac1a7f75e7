"""Guarantees on inputs: what the run computes on is the model and tokenizer it claims, checked once.

* :func:`model_fingerprint` -- SHA-256 over ``(name, dtype, shape, bytes)`` of every parameter and buffer
  in ``state_dict`` order (one digest per tensor, combined); :func:`check_finite_weights` names a NaN/Inf weight;
* :func:`config_fingerprint` / :func:`code_path` -- the configuration that changes the forward (``config.json``
  without its metadata) and the code that runs it (transformers and torch versions, class, attention);
* :func:`tokenizer_fingerprint` -- SHA-256 of the tokenizer's content (vocabulary, merges, special
  tokens, pre/post-processing), independent of where it was loaded from;
* :func:`check_loading_info` / :func:`check_causal_lm` -- refuse models with missing or mismatched
  weights and models that are not causal LMs with a trained output layer (no randomly initialised
  weight may enter a computation);
* :func:`hub_offline_if_unreachable` -- probe the Hugging Face hub once with a short timeout and switch
  the hub libraries to offline mode when it cannot be reached (no retries, one-line errors).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError

FIRST = 5
"""How many offending names a one-line message lists."""
HUB_PROBE_TIMEOUT_S = 3.0


def _first(names: Iterable[str]) -> str:
    names = sorted(str(n) for n in names)
    more = f" and {len(names) - FIRST} more" if len(names) > FIRST else ""
    return ", ".join(names[:FIRST]) + more


def warn(message: str) -> None:
    """One line ``warning: ...`` on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- fingerprints


def tensor_digest(name: str, t: torch.Tensor) -> bytes:
    """SHA-256 of ``name``, dtype, shape and the raw bytes of ``t`` (copied to the CPU, contiguous)."""
    h = hashlib.sha256(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
    if t.device.type == "meta":  # offloaded by a device_map: no data here
        h.update(b"meta")
    elif t.numel():
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        h.update(memoryview(data.numpy()))
    return h.digest()


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int, int] | None:
    """``(name, non-finite count, numel)`` of the first floating-point tensor holding NaN or Inf, or ``None``."""
    for name, t in tensors:
        if not t.is_floating_point() or t.device.type == "meta":
            continue
        # fast path: a NaN or Inf makes the sum non-finite, so a finite sum proves every entry finite
        total = t.detach().sum(dtype=torch.float32 if t.element_size() < 4 else None)
        if torch.isfinite(total):
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            return name, bad, t.numel()
    return None


def check_finite_weights(model: nn.Module) -> None:
    """Refuse (:class:`UserError`) a model with a NaN or Inf in a parameter or buffer, naming it."""
    bad = first_non_finite(model.state_dict(keep_vars=True).items())
    if bad is not None:
        name, count, numel = bad
        raise UserError(
            f"the model's weight {name} has {count} non-finite (NaN or Inf) values out of {numel}; the checkpoint is corrupt"
        )


def model_fingerprint(model: nn.Module, threads: int | None = None) -> str:
    """Content fingerprint of a model (64 hex digits): SHA-256 over the per-tensor digests
    (:func:`tensor_digest`) of every parameter and buffer, in ``state_dict`` order; a tensor shared under
    several names (tied embeddings) is read once. Tensors are hashed on ``threads`` threads (default: up to
    8, one per CPU; ``hashlib`` releases the GIL), so the cost is about one read of the weights."""
    from concurrent.futures import ThreadPoolExecutor

    tensors = list(model.state_dict(keep_vars=True).items())
    unique: dict[Any, torch.Tensor] = {}
    keys = []
    for name, t in tensors:
        key = (
            (str(t.device), t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            if t.device.type != "meta"
            else ("meta", name)
        )
        unique.setdefault(key, t)
        keys.append(key)
    workers = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = dict(zip(unique, pool.map(lambda t: tensor_digest("", t), unique.values())))
    total = hashlib.sha256()
    for (name, _), key in zip(tensors, keys):
        total.update(name.encode() + b"\0" + digests[key])
    return total.hexdigest()


CONFIG_FIELDS_OUTSIDE_THE_FORWARD = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "architectures",
        "dtype",
        "torch_dtype",
        "_commit_hash",
        "use_cache",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "id2label",
        "label2id",
        "problem_type",
        "finetuning_task",
        "task_specific_params",
        "tokenizer_class",
        "prefix",
        "initializer_range",
        "init_std",
    }
)
"""``config.json`` fields that do not change the model's forward on given weights: where it was loaded from,
the writer's version, output switches, label names, initialisation scales (the weights are loaded), and the
dtype (fingerprinted with the tensors). Every other field is part of the model's identity."""


def forward_config(model: nn.Module) -> dict[str, Any]:
    """The model's configuration as a dict (``config.to_dict()``) without :data:`CONFIG_FIELDS_OUTSIDE_THE_FORWARD`,
    at every nesting level."""

    def strip(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k not in CONFIG_FIELDS_OUTSIDE_THE_FORWARD}
        return d

    return strip(model.config.to_dict())


def config_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the canonical JSON of :func:`forward_config`: e.g. the activation function,
    the norm placement, the RoPE settings. Independent of where the files are."""
    return hashlib.sha256(
        json.dumps(forward_config(model), sort_keys=True, default=str).encode()
    ).hexdigest()[:16]


def code_path(model: nn.Module) -> str:
    """The code that evaluates the model: the installed transformers and torch versions, the model class and its
    attention implementation (e.g. ``transformers 5.24.0, torch 2.13.0, OPTForCausalLM, attention eager``)."""
    import transformers

    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    versions = f"transformers {transformers.__version__}, torch {torch.__version__}"
    return f"{versions}, {type(model).__name__}, attention {impl}"


def fingerprints(model: nn.Module, tokenizer) -> dict[str, str]:
    """The run's input identity: ``model`` (:func:`model_fingerprint`, the tensors), ``model_config``
    (:func:`config_fingerprint`), ``code`` (:func:`code_path`) and ``tokenizer`` (:func:`tokenizer_fingerprint`)."""
    return {
        "model": model_fingerprint(model),
        "model_config": config_fingerprint(model),
        "code": code_path(model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }


def tokenizer_fingerprint(tokenizer) -> str:
    """Content fingerprint of a tokenizer (16 hex digits): its class, vocabulary, special tokens and, for
    fast tokenizers, the whole ``tokenizer.json`` (normalizer, pre-tokenizer, model, post-processor)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    for flag in ("add_bos_token", "add_eos_token", "add_prefix_space", "do_lower_case"):
        h.update(f"{flag}={getattr(tokenizer, flag, None)}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- samples


def check_token_ids(samples: torch.Tensor, model: nn.Module, tokenizer_name: str) -> None:
    """Refuse (:class:`UserError`) samples holding a token id the model's input embedding has no row for
    (``id >= num_embeddings`` or negative): a tokenizer that does not belong to the model."""
    emb = model.get_input_embeddings()
    rows = getattr(emb, "num_embeddings", None) or emb.weight.shape[0]
    if samples.numel() and (int(samples.max()) >= rows or int(samples.min()) < 0):
        bad = int(samples.max()) if int(samples.max()) >= rows else int(samples.min())
        count = int(((samples >= rows) | (samples < 0)).sum())
        raise UserError(
            f"the tokenizer of {tokenizer_name!r} gives token id {bad} ({count} of the {samples.numel()} sample tokens "
            f"out of range) but the model's vocabulary has {rows} entries (ids 0..{rows - 1}): "
            "the tokenizer does not belong to the model"
        )


# ----------------------------------------------------------------------------- weights


def check_loading_info(name: str, info: dict[str, Any]) -> None:
    """Refuse missing or mismatched weights (they would be randomly initialised); warn about unused ones.

    ``info`` is what ``from_pretrained(..., output_loading_info=True)`` reports.
    """
    missing = info.get("missing_keys") or ()
    if missing:
        raise UserError(
            f"model {name!r} lacks {len(missing)} weight(s) that would be randomly initialised: {_first(missing)}; use a complete checkpoint"
        )
    mismatched = info.get("mismatched_keys") or ()
    if mismatched:
        names = [m[0] if isinstance(m, (tuple, list)) else m for m in mismatched]
        raise UserError(
            f"model {name!r} has {len(names)} weight(s) whose shape does not match its config.json: {_first(names)}; use a checkpoint that matches its config"
        )
    unexpected = info.get("unexpected_keys") or ()
    if unexpected:
        warn(
            f"model {name!r}: {len(unexpected)} weight(s) of the checkpoint are not used by {info.get('model_class', 'the model')} and are ignored: {_first(unexpected)}"
        )


def causal_lm_classes() -> set[str]:
    """Class names ``AutoModelForCausalLM`` builds (values of its mapping)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out: set[str] = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        out.update([v] if isinstance(v, str) else v)
    return out


def check_causal_lm(name: str, model: nn.Module) -> None:
    """Refuse a model that is not a causal LM with an output layer: its ``config.json`` must list a causal-LM
    architecture (when it lists any), and the model must have output embeddings (loaded or tied, which
    :func:`check_loading_info` ensures)."""
    archs = list(getattr(model.config, "architectures", None) or [])
    if archs and not set(archs) & (causal_lm_classes() | {type(model).__name__}):
        raise UserError(
            f"model {name!r} is not a causal language model: its config.json lists {', '.join(archs)}; "
            f"loading it as {type(model).__name__} would use an untrained or wrong output layer. Use a causal LM (e.g. *ForCausalLM)"
        )
    if model.get_output_embeddings() is None:
        raise UserError(f"model {name!r} ({type(model).__name__}) has no output layer (LM head)")


def read_local_config(path: Path) -> None:
    """Refuse a local model directory whose ``config.json`` is missing or not valid JSON, with the reason."""
    cfg = path / "config.json"
    if not cfg.is_file():
        raise UserError(
            f"model directory {path} has no config.json; pass a directory saved with save_pretrained (config.json and the weights)"
        )
    try:
        json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{cfg} is corrupt: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- the hub


_HUB_CHECKED = False


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether offline mode is on for the hub (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set true)."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(
        os.environ.get("TRANSFORMERS_OFFLINE")
    )


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub endpoint (``HF_ENDPOINT``) answers an HTTP request within ``timeout`` seconds (any status)."""
    import urllib.error
    import urllib.request

    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/api/whoami-v2"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False
    return True


def set_hub_offline() -> None:
    """Offline mode for ``huggingface_hub``, ``transformers`` and ``datasets`` (already imported or not)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:
        cfg = sys.modules["datasets.config"]
        cfg.HF_HUB_OFFLINE = cfg.HF_DATASETS_OFFLINE = True


def hub_offline_if_unreachable() -> None:
    """Once per process, unless offline mode is already on: probe the hub and, if it cannot be reached, switch
    to offline mode, so that loading from the hub fails at once (or uses the cache) instead of retrying."""
    global _HUB_CHECKED
    if _HUB_CHECKED or hub_offline():
        return
    _HUB_CHECKED = True
    if not hub_reachable():
        set_hub_offline()
