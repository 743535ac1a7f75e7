"""Text, tokenization and the paper's samples: sample ``i`` is tokens ``[i*seqlen, (i+1)*seqlen)``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .. import constants
from ..app.results import atomic_write_bytes
from ..errors import ParamError, UserError, literal
from .inputs import hub_offline_if_unreachable, tokenizer_fingerprint, warn
from .models import EMBEDDED, assets_dir, resolve_model_path

EMBEDDED_TEXT = assets_dir() / "shakespeare-heldout.txt"
WIKITEXT2 = constants.WIKITEXT2
DATASETS = ("auto", EMBEDDED, WIKITEXT2, "PATH")


def default_dataset(model_name: str) -> str:
    """``auto`` resolves to the embedded held-out text for the embedded model, WikiText-2 otherwise."""
    return EMBEDDED if model_name == EMBEDDED else WIKITEXT2


def load_text(dataset: str, cache_dir: str | None = None) -> str:
    r"""The raw text of ``dataset``: ``embedded``, ``wikitext2`` (test split of ``wikitext-2-raw-v1``
    joined with ``"\n\n"``, as the paper), or a path to a UTF-8 text file.

    Args:
        dataset: ``"embedded"``, ``"wikitext2"`` or a path to a UTF-8 text file.
        cache_dir: the Hugging Face datasets cache (WikiText-2 only).

    Returns:
        The whole text.

    Raises:
        ParamError: WikiText-2 cannot be loaded, or the file does not exist or is not UTF-8.
    """
    if dataset == EMBEDDED:
        return EMBEDDED_TEXT.read_text(encoding="utf-8")
    if dataset == WIKITEXT2:
        hub_offline_if_unreachable()
        try:
            from datasets import load_dataset

            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="test", cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 -- any failure here means the data cannot be reached
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            raise ParamError(
                "dataset",
                template="cannot load WikiText-2 (wikitext-2-raw-v1, test split) through `datasets`: "
                f"{literal(why)}. Without internet, set HF_DATASETS_OFFLINE=1 with a filled {{cache_dir}}, or "
                "pass {dataset} PATH to a local UTF-8 text file (or {dataset} embedded).",
            ) from None
        return "\n\n".join(ds["text"])
    path = Path(dataset)
    if not path.is_file():
        raise ParamError(
            "dataset",
            f"dataset {dataset!r} is neither 'embedded', 'wikitext2' nor an existing text file",
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ParamError("dataset", f"dataset {dataset} is not UTF-8 text: {e}") from None


def dataset_label(dataset: str) -> str:
    """A short name of ``dataset`` for titles: the file name of the bundled text or of a local file, or
    ``wikitext-2-raw-v1 test``."""
    if dataset == EMBEDDED:
        return EMBEDDED_TEXT.name
    if dataset == WIKITEXT2:
        return "wikitext-2-raw-v1 test"
    return Path(dataset).name


def text_sha256(text: str) -> str:
    """SHA-256 (hex) of the UTF-8 bytes of ``text``: which text a result was computed on."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
"""Files of which a local model directory needs at least one to have a tokenizer."""


def load_tokenizer(model_name: str, cache_dir: str | None = None, revision: str | None = None):
    """``AutoTokenizer.from_pretrained`` for the model (the embedded model ships its own); refuses a model
    directory without tokenizer files and a tokenizer with an empty vocabulary.

    Args:
        model_name: ``"embedded"``, a Hugging Face model id or a local model directory.
        cache_dir: the Hugging Face cache.
        revision: the hub revision of ``model_name`` (a branch, tag or commit); ``None``: the default.

    Returns:
        The tokenizer (a ``transformers`` ``PreTrainedTokenizerBase``).

    Raises:
        ParamError: the tokenizer cannot be loaded (e.g. offline without a cache).
        UserError: a model directory without tokenizer files, or an empty vocabulary.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(model_name)
    if Path(path).is_dir() and not any(Path(path, f).is_file() for f in TOKENIZER_FILES):
        raise UserError(
            f"model directory {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer next to the model (tokenizer.save_pretrained)"
        )
    if not Path(path).is_dir():
        hub_offline_if_unreachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, cache_dir=cache_dir, **({} if revision is None else {"revision": revision})
        )
    except (OSError, ValueError) as e:
        raise ParamError(
            "model",
            template=f"cannot load the tokenizer of {literal(repr(model_name))} ({type(e).__name__}); without "
            "internet pass {model} PATH to a local model directory or set HF_HUB_OFFLINE=1 with a filled "
            "{cache_dir}",
        ) from None
    if len(tokenizer) < 2:
        raise UserError(
            f"the tokenizer of {model_name!r} has an empty vocabulary ({len(tokenizer)} tokens); its tokenizer files are missing or broken"
        )
    return tokenizer


def _ids_checksum(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()


def _read_token_cache(path: Path) -> torch.Tensor | None:
    """The cached ids, or ``None`` when the file is unreadable or fails its checksum (it is then rebuilt)."""
    try:
        entry = torch.load(path, weights_only=True)
        ids = entry["ids"]
        if entry["sha256"] == _ids_checksum(ids) and ids.dtype == torch.long and ids.dim() == 1:
            return ids
    except Exception:  # noqa: BLE001 -- any damage means: tokenize again
        pass
    warn(f"the tokenized-text cache {path} is corrupt; tokenizing again")
    return None


def tokenize(tokenizer, text: str, cache_dir: str | None = None) -> torch.Tensor:
    """``tokenizer(text).input_ids`` as a 1-D int64 tensor (the tokenizer's default call, as the paper).

    With ``cache_dir`` the ids are cached in ``<cache_dir>/tokenized/`` keyed by the text and the
    tokenizer's content, with their SHA-256, so a second run does not re-tokenize and a damaged cache
    file is detected and rebuilt. A cache that cannot be written (a full disk) is one warning line: the
    run goes on without it.

    Args:
        tokenizer: a ``transformers`` tokenizer (:func:`load_tokenizer`).
        text: the text to tokenize.
        cache_dir: where the ``tokenized/`` cache lives; ``None``: no cache.

    Returns:
        The token ids, int64, shape ``(N,)``.
    """
    key = hashlib.sha256(text.encode()).hexdigest()[:16] + "-" + tokenizer_fingerprint(tokenizer)
    cache = Path(cache_dir, "tokenized", f"{key}.pt") if cache_dir else None
    if cache is not None and cache.is_file():
        ids = _read_token_cache(cache)
        if ids is not None:
            return ids
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # silence "sequence longer than the maximum" (we cut it ourselves)
    try:
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(
                cache, lambda p: torch.save({"ids": ids, "sha256": _ids_checksum(ids)}, p)
            )
        except (OSError, RuntimeError) as e:  # torch.save raises RuntimeError on a full disk
            why = (
                getattr(e, "strerror", None)
                or (str(e).strip().splitlines() or [type(e).__name__])[0]
            )
            warn(
                f"could not write the tokenized-text cache in --cache_dir {cache_dir} ({why}); "
                "going on without it"
            )
    return ids


def make_samples(tokens: torch.Tensor, seqlen: int, b: int) -> torch.Tensor:
    """The first ``b`` samples, sample ``i`` = ``tokens[i*seqlen:(i+1)*seqlen]``; shape ``(b, seqlen)``.

    Args:
        tokens: token ids, int64, shape ``(N,)`` with ``N >= b * seqlen``.
        seqlen: tokens per sample, at least 2.
        b: number of samples, at least 1.

    Returns:
        A new ``(b, seqlen)`` int64 tensor of token ids (a copy).

    Raises:
        ParamError: ``seqlen < 2``, ``b < 1``, or too few tokens for ``b`` samples.
    """
    if seqlen < 2:
        raise ParamError("seqlen", f"seqlen must be at least 2 (one predicted token), got {seqlen}")
    if b < 1:
        raise ParamError("b", f"b must be at least 1, got {b}")
    available = tokens.numel() // seqlen
    if available < b:
        raise ParamError(
            "b",
            f"b {b} needs {b * seqlen} tokens but the text has {tokens.numel()}: only {available} samples of seqlen {seqlen} exist",
        )
    return tokens[: b * seqlen].view(b, seqlen).clone()


def check_seqlen(seqlen: int, limit: int | None) -> None:
    """Refuse sequences longer than the model's position limit."""
    if limit is not None and seqlen > limit:
        raise ParamError(
            "seqlen", f"seqlen {seqlen} exceeds the model's maximum sequence length {limit}"
        )


def load_samples(
    model_name: str, seqlen: int, b: int, dataset: str = "auto", cache_dir: str | None = None
) -> torch.Tensor:
    """Tokenize ``dataset`` with the model's tokenizer and return the first ``b`` samples, ``(b, seqlen)``.

    Args:
        model_name: ``"embedded"``, a Hugging Face model id or a local model directory (its tokenizer).
        seqlen: tokens per sample, at least 2.
        b: number of samples, at least 1.
        dataset: ``"auto"`` (the embedded text for the embedded model, WikiText-2 otherwise), ``"embedded"``,
            ``"wikitext2"`` or a path to a UTF-8 text file.
        cache_dir: the Hugging Face cache, also holding the tokenized-text cache.

    Returns:
        The token ids, int64, shape ``(b, seqlen)``.

    Raises:
        ParamError: the data or tokenizer cannot be loaded, or the text is too short (:func:`make_samples`).
        UserError: the model directory has no tokenizer, or its vocabulary is empty.
    """
    if dataset == "auto":
        dataset = default_dataset(model_name)
    tokens = tokenize(
        load_tokenizer(model_name, cache_dir), load_text(dataset, cache_dir), cache_dir
    )
    return make_samples(tokens, seqlen, b)
