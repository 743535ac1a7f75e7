"""Shared tiny models (random weights, built from configs; no download) for the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the top-level scripts and lib/
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # several test processes share the cores: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))

from lib.model.models import prepare_model  # noqa: E402

ARCHS = ("opt", "llama", "gpt2")
VOCAB = 64
LAYER = {"opt": "self_attn.q_proj", "llama": "self_attn.k_proj", "gpt2": "attn.c_attn"}
"""A layer per architecture (Llama's k_proj is the GQA-shared one; GPT-2's is a transposed Conv1D)."""


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "slow: takes more than about 5 s (subprocesses, several runs)"
    )


def pytest_collection_modifyitems(config, items) -> None:
    """The slow tests first (in their order), so that the test processes do not end waiting on one long test."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def tiny_model(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0, attn: str = "eager"):
    """A 2-block causal LM of ``arch`` with random weights (hidden 16, vocab 64, 32 positions)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    if arch == "opt":
        model = OPTForCausalLM(
            OPTConfig(
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                ffn_dim=32,
                max_position_embeddings=32,
                word_embed_proj_dim=16,
                **common,
            )
        )
    elif arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=32,
                **common,
            )
        )
    elif arch == "qwen2":  # Llama-family with q/k/v biases
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(
            Qwen2Config(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=32,
                **common,
            )
        )
    elif arch == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(
            MistralConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=4,
                max_position_embeddings=32,
                **common,
            )
        )
    elif arch == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, **common)
        )
    else:
        raise ValueError(arch)
    model.config._attn_implementation = attn
    return prepare_model(model.to(dtype))


def tiny_ids(b: int = 2, seqlen: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (b, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded (refusals must come before)."""
    from lib.app import pipeline

    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_model", boom)


@pytest.fixture
def one_rank_env(monkeypatch) -> None:
    """The environment of a one-rank torchrun job (gloo on a free local port)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }.items():
        monkeypatch.setenv(key, value)


def subprocess_env() -> dict[str, str]:
    """The environment of a script run as a subprocess: this process's thread count (so that its units are bitwise
    this process's) and the hub offline."""
    n = str(torch.get_num_threads())
    return {
        **os.environ,
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def torchrun(script, *args, cwd, timeout: float = 600) -> subprocess.CompletedProcess:
    """``script args`` under torchrun with 2 local ranks (gloo on the CPU), output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*cmd, str(script), *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=cwd,
        timeout=timeout,
    )
