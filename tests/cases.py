"""Shared test cases: flag sets, toy jobs, oracles and runners that several test files use (instead of importing
each other's modules)."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
import torch
from torch.func import functional_call

import single_layer_single_block
from lib.app import cli
from lib.model.models import EMBEDDED_MODEL_DIR
from lib.objective.loss import SubsetLoss

ARGS = [
    "--t",
    "3",
    "--seqlen",
    "16",
    "--b",
    "4",
    "--dtype",
    "float64",
    "--no_progress",
    "--name",
    "h",
]
"""Four units (samples) of a float64 exact Hessian on the embedded model: tiny, and bit-exact comparisons are meaningful."""


class ToyJob:
    """An additive job without a model: unit ``k`` is ``{"s": k * ones(3)}``; ``fail`` maps a unit to what goes wrong there."""

    model_input_bs = 1

    def __init__(self, n: int, fail: dict[int, str] | None = None):
        self.n, self.fail = n, fail or {}

    def setup(self, device):
        pass

    def num_units(self):
        return self.n

    def steps_per_unit(self):
        return 1

    def run_unit(self, k, progress=None):
        what = self.fail.get(k)
        if what in ("raise", "kill"):
            time.sleep(
                1.0
            )  # let the other worker finish its unit first (else 1 unit, not 2, may be saved)
        if what == "raise":
            raise RuntimeError(f"boom in unit {k}")
        if what == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if what == "stop":  # a hung worker
            os.kill(os.getpid(), signal.SIGSTOP)
        if what == "nan":
            return {"s": torch.full((3,), float("nan"))}
        if progress:
            progress(1)
        return {"s": torch.full((3,), float(k), dtype=torch.float64)}

    def config(self):
        return {"kind": "toy", "n": self.n}


def _stderr_of(script, argv: list[str]) -> tuple[int, list[str]]:
    """Run a script through :func:`lib.app.cli.main` in this process: ``(exit status, every stderr line)``; an exception
    that escaped gives ``(-1, [its repr])``."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            cli.main(script.run, argv)
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException as e:  # noqa: BLE001 -- e.g. a KeyboardInterrupt that escaped: report it, do not stop pytest
            return -1, [repr(e)]
    return code, err.getvalue().strip().splitlines()


def _main(script, argv: list[str]) -> tuple[int, str]:
    """Run a script through :func:`lib.app.cli.main` in this process: ``(exit status, last stderr line)``."""
    code, lines = _stderr_of(script, argv)
    return code, lines[-1] if lines else ""


def xdiag_by_definition(h: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """Epperly-Tropp-Webber's XDiag written out: mean_i diag(Q_i Q_i^T H) + w_i * (I - Q_i Q_i^T) H w_i."""
    s = omega.shape[1]
    y = h @ omega
    out = []
    for i in range(s):
        qi, _ = torch.linalg.qr(y[:, [j for j in range(s) if j != i]])
        p = qi @ qi.T
        out.append((p @ h).diagonal() + omega[:, i] * (y[:, i] - p @ y[:, i]))
    return torch.stack(out).mean(0)


def _logits_fn(model, sub, ids):
    """``x -> logits`` at the predicted positions, ``(N, V)``, through the plain model with the subset substituted."""
    obj = SubsetLoss(model, sub, fused_head=False)

    def logits(x):
        out = functional_call(
            model,
            obj.weights(x),
            args=(),
            kwargs={"input_ids": ids, "use_cache": False},
            tie_weights=False,
        )[0]
        return out[:, :-1].reshape(-1, out.shape[-1])

    return logits


INPUTS_FAST = ["--t", "2", "--seqlen", "16", "--b", "2", "--no_progress", "--dataset", "embedded"]
"""A tiny exact-script run on the embedded data (the input-check tests)."""


def _tiny_opt(path, vocab: int = 4096, seed: int = 0, tokenizer: bool = True):
    """A 2-block OPT with random weights saved to ``path``, with the embedded model's tokenizer (same vocabulary)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=32,
        max_position_embeddings=64,
        word_embed_proj_dim=16,
        vocab_size=vocab,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )
    OPTForCausalLM(cfg).save_pretrained(path)
    if tokenizer:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(EMBEDDED_MODEL_DIR / f, path / f)
    return path


def _fail(argv, capsys, script=single_layer_single_block) -> str:
    """Run a script in this process, expect exit status 2 with one ``error:`` line; return it."""
    with pytest.raises(SystemExit) as exc:
        cli.main(script.run, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def fake_hub(cache_dir, model_id: str, revisions: dict) -> dict[str, str]:
    """A Hugging Face hub cache under ``cache_dir`` holding ``model_id``'s ``revisions`` (``{name: model directory}``),
    as the hub library lays it out: ``models--ORG--NAME/snapshots/<commit>`` (here a link to the directory) and
    ``refs/<name>`` holding the commit. The commit is the SHA-1 of the directory's path: two names of one path share a
    commit (a tag on a branch's head); another path to the same files (a link) is another commit with the same
    weights. Calling it again moves a name. Returns ``{name: commit}``."""
    import hashlib
    from pathlib import Path

    repo = Path(cache_dir) / ("models--" + model_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "snapshots").mkdir(exist_ok=True)
    commits = {}
    for name, src in revisions.items():
        commit = hashlib.sha1(str(src).encode()).hexdigest()
        snap = repo / "snapshots" / commit
        if not os.path.lexists(snap):
            snap.symlink_to(Path(src).absolute())
        (repo / "refs" / name).write_text(commit)
        commits[name] = commit
    return commits


# hessian_sweep.py on two units of the bundled model, small and float64 (tests/test_sweep.py, test_sweep_ranks.py)
SWEEP_FLAGS = [
    "--dataset",
    "embedded",
    "--params",
    "*.layers.3.self_attn.q_proj.weight",
    "*.layers.3.fc2.weight",
    "--b",
    "2",
    "--seqlen",
    "16",
    "--dtype",
    "float64",
    "--max_probes",
    "20",
    "--quantities",
    "trace",
    "top",
    "--trace_estimator",
    "per_unit",  # auto chooses by measured seconds: two separate runs may choose differently
    "--name",
    "s",
    "--no_progress",
]
