"""Text, tokenization and the paper's samples: sample ``i`` is tokens ``[i*seqlen, (i+1)*seqlen)``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .errors import UserError
from .models import EMBEDDED, ROOT, resolve_model_path

EMBEDDED_TEXT = ROOT / "assets" / "shakespeare-heldout.txt"
WIKITEXT2 = "wikitext2"
DATASETS = ("auto", EMBEDDED, WIKITEXT2, "PATH")


def default_dataset(model_name: str) -> str:
    """``auto`` resolves to the embedded held-out text for the embedded model, WikiText-2 otherwise."""
    return EMBEDDED if model_name == EMBEDDED else WIKITEXT2


def load_text(dataset: str, cache_dir: str | None = None) -> str:
    """The raw text of ``dataset``: ``embedded``, ``wikitext2`` (test split of ``wikitext-2-raw-v1``
    joined with ``"\\n\\n"``, as the paper), or a path to a UTF-8 text file."""
    if dataset == EMBEDDED:
        return EMBEDDED_TEXT.read_text(encoding="utf-8")
    if dataset == WIKITEXT2:
        try:
            from datasets import load_dataset

            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="test", cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 -- any failure here means the data cannot be reached
            raise UserError(
                "cannot load WikiText-2 (wikitext-2-raw-v1, test split) through `datasets`: "
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}. "
                "Without internet, set HF_DATASETS_OFFLINE=1 with a filled --cache_dir, or pass "
                "--dataset PATH to a local UTF-8 text file (or --dataset embedded)."
            ) from None
        return "\n\n".join(ds["text"])
    path = Path(dataset)
    if not path.is_file():
        raise UserError(f"--dataset {dataset!r} is neither 'embedded', 'wikitext2' nor an existing text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--dataset {dataset} is not UTF-8 text: {e}") from None


def load_tokenizer(model_name: str, cache_dir: str | None = None):
    """``AutoTokenizer.from_pretrained`` for the model (the embedded model ships its own)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(model_name), cache_dir=cache_dir)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load the tokenizer of {model_name!r} ({type(e).__name__}); without internet pass "
            "--model PATH to a local model directory or set HF_HUB_OFFLINE=1 with a filled --cache_dir"
        ) from None


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(f"{type(tokenizer).__name__}:{tokenizer.name_or_path}:{len(tokenizer)}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    return h.hexdigest()[:16]


def tokenize(tokenizer, text: str, cache_dir: str | None = None) -> torch.Tensor:
    """``tokenizer(text).input_ids`` as a 1-D int64 tensor (the tokenizer's default call, as the paper).

    With ``cache_dir`` the ids are cached in ``<cache_dir>/tokenized/`` keyed by the text and the
    tokenizer, so a second run does not re-tokenize.
    """
    key = hashlib.sha256(text.encode()).hexdigest()[:16] + "-" + _tokenizer_fingerprint(tokenizer)
    cache = Path(cache_dir, "tokenized", f"{key}.pt") if cache_dir else None
    if cache is not None and cache.is_file():
        return torch.load(cache)
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # silence "sequence longer than the maximum" (we cut it ourselves)
    try:
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save(ids, tmp)
        os.replace(tmp, cache)
    return ids


def make_samples(tokens: torch.Tensor, seqlen: int, b: int) -> torch.Tensor:
    """The first ``b`` samples, sample ``i`` = ``tokens[i*seqlen:(i+1)*seqlen]``; shape ``(b, seqlen)``."""
    if seqlen < 2:
        raise UserError(f"--seqlen must be at least 2 (one predicted token), got {seqlen}")
    if b < 1:
        raise UserError(f"--b must be at least 1, got {b}")
    available = tokens.numel() // seqlen
    if available < b:
        raise UserError(f"--b {b} needs {b * seqlen} tokens but the text has {tokens.numel()}: only {available} samples of seqlen {seqlen} exist")
    return tokens[: b * seqlen].view(b, seqlen).clone()


def check_seqlen(seqlen: int, limit: int | None) -> None:
    """Refuse sequences longer than the model's position limit."""
    if limit is not None and seqlen > limit:
        raise UserError(f"--seqlen {seqlen} exceeds the model's maximum sequence length {limit}")


def load_samples(model_name: str, seqlen: int, b: int, dataset: str = "auto", cache_dir: str | None = None) -> torch.Tensor:
    """Tokenize ``dataset`` with the model's tokenizer and return the first ``b`` samples, ``(b, seqlen)``."""
    if dataset == "auto":
        dataset = default_dataset(model_name)
    tokens = tokenize(load_tokenizer(model_name, cache_dir), load_text(dataset, cache_dir), cache_dir)
    return make_samples(tokens, seqlen, b)
