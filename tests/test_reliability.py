"""Issue 19: thirteen ways a result could still be mixed, overwritten or lost, each closed and checked with the
fault injected from the test (a wrapper script or a patched function in the test, a resource limit, a signal);
the library has no test hooks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
import hessian_diagonal
import single_layer_single_block
from lib import checkpoint as ckpt
from lib import parallel
from test_guarantees import ARGS, _env, _main, no_model_load  # noqa: F401 -- a fixture

@pytest.fixture(scope="module")
def reference_exact(tmp_path_factory) -> torch.Tensor:
    """The uninterrupted result of ``single_layer_single_block.py`` with :data:`test_guarantees.ARGS`."""
    tmp = tmp_path_factory.mktemp("reference")
    meta = single_layer_single_block.run([*ARGS, "--output_dir", str(tmp)])
    return torch.load(tmp / meta["files"]["tensor"])


DIAG_BF16 = ["--vhp_samples", "4", "--layer_name", "self_attn.v_proj", "--seqlen", "16", "--b", "2", "--dtype", "bfloat16", "--probe_batch", "1", "--no_progress", "--name", "d"]


# ----------------------------------------------------------------------------- 7: bfloat16 diagonal


def test_bfloat16_diagonal_runs_and_resumes_after_phase_one(tmp_path, monkeypatch):
    """XDiag in bfloat16: phase 2 hashes the bfloat16 basis (crashed at ``.numpy()``); a run stopped after phase 1
    resumes from the phase-1 checkpoint and gives the uninterrupted result bitwise."""
    meta = hessian_diagonal.run([*DIAG_BF16, "--output_dir", str(tmp_path / "ref")])
    reference = torch.load(tmp_path / "ref" / meta["files"]["tensor"])
    assert reference.dtype == torch.bfloat16 and bool(torch.isfinite(reference.float()).all())
    run_job = parallel.run_job

    def stop_in_phase_two(job, settings):
        if getattr(job, "phase", None) == "2":
            raise KeyboardInterrupt
        return run_job(job, settings)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(parallel, "run_job", stop_in_phase_two)
        code, err = _main(hessian_diagonal, [*DIAG_BF16, "--output_dir", str(out)])
    assert code == 130 and err.startswith("error: interrupted by SIGINT"), err
    assert ckpt.read(out / "d.ckpt")["prefix"] == 2  # phase 1 is complete and kept
    meta = hessian_diagonal.run([*DIAG_BF16, "--output_dir", str(out), "--resume"])
    assert torch.equal(torch.load(out / meta["files"]["tensor"]), reference)


# ----------------------------------------------------------------------------- 10: the write probe on a full disk; non-finite timeouts


def _file_size_limit(limit: int):
    """A context in which this process may write files of at most ``limit`` bytes (``RLIMIT_FSIZE``, soft limit,
    SIGXFSZ ignored): a write past it fails with ``EFBIG`` like a write to a full disk. Restored on exit."""
    import contextlib
    import resource

    @contextlib.contextmanager
    def ctx():
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old)

    return ctx()


def test_a_full_output_disk_is_refused_without_leaving_the_write_probe(tmp_path, no_model_load):
    with _file_size_limit(1):
        code, err = _main(single_layer_single_block, [*ARGS, "--output_dir", str(tmp_path)])
    assert code == 2 and err == f"error: --output_dir {str(tmp_path)!r} is not a writable directory (File too large); choose another --output_dir"
    assert list(tmp_path.iterdir()) == []  # no .write-probe-<pid>


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_unit_timeout_is_refused(value, tmp_path, no_model_load):
    code, err = _main(single_layer_single_block, [*ARGS, "--output_dir", str(tmp_path), "--unit_timeout", value])
    assert code == 2 and err == f"error: --unit_timeout must be a finite number of seconds (0 = automatic), got {float(value)}"


# ----------------------------------------------------------------------------- 6: token ids beyond the model's vocabulary


@pytest.mark.parametrize("devices", [[], ["--devices", "cpu,cpu"]], ids=["in-process", "workers"])
def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_computing(devices, tmp_path, monkeypatch):
    from test_inputs import FAST, _tiny_opt

    model_dir = _tiny_opt(tmp_path / "m", vocab=64)  # the embedded 4096-token tokenizer
    monkeypatch.setattr(parallel, "_run_on_pool", lambda *a: (_ for _ in ()).throw(AssertionError("workers were started")))
    code, err = _main(single_layer_single_block, ["--model", str(model_dir), *FAST, "--output_dir", str(tmp_path / "out"), *devices])
    assert code == 2 and re.fullmatch(rf"error: the tokenizer of '{re.escape(str(model_dir))}' gives token id \d+ \(\d+ of the 32 sample tokens out of range\) but the model's vocabulary has 64 entries \(ids 0\.\.63\): the tokenizer does not belong to the model", err), err
    assert not (tmp_path / "out").exists()  # nothing written (the directory the run created is removed again)


# ----------------------------------------------------------------------------- 1: the model's configuration and code are part of its identity


def test_resume_refuses_a_model_whose_configuration_changed_after_a_kill(tmp_path, capsys):
    import shutil

    from test_inputs import FAST, _fail, _tiny_opt
    from lib.models import load_model

    model_dir = _tiny_opt(tmp_path / "m")
    assert json.loads((model_dir / "config.json").read_text())["activation_function"] == "relu"
    argv = ["--model", str(model_dir), *FAST, "--output_dir", str(tmp_path / "out"), "--name", "r", "--checkpoint_every", "1"]
    meta = single_layer_single_block.run([*argv, "--keep_checkpoint"])
    for f in ("r.pt", "r.json"):  # as if killed before the results were written
        (tmp_path / "out" / f).unlink()
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "activation_function": "gelu", "_name_or_path": "elsewhere"}))
    capsys.readouterr()
    err = _fail([*argv, "--resume"], capsys)  # exit 0 before: 2 relu units mixed with 2 gelu units
    assert not (tmp_path / "out" / "r.pt").exists()
    from lib.inputs import code_path, config_fingerprint

    old, new = meta["fingerprints"]["model_config"], config_fingerprint(load_model(str(model_dir)))
    assert err == f"error: checkpoint {tmp_path / 'out' / 'r.ckpt'} was written for other inputs: the model's configuration (config.json) changed (fingerprint {old[:12]}.. -> {new[:12]}..); restore the original files, or delete it to start over"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    model = load_model(str(model_dir))
    assert old == config_fingerprint(model) == config_fingerprint(load_model(str(shutil.copytree(model_dir, tmp_path / "moved"))))
    assert meta["fingerprints"]["code"] == code_path(model) and code_path(model).startswith("transformers ")


def test_a_worker_refuses_a_model_whose_configuration_or_code_differs(tmp_path):
    from test_inputs import _tiny_opt
    from lib.errors import UserError
    from lib.inputs import code_path, config_fingerprint
    from lib.models import ModelSpec, load_model

    model_dir = _tiny_opt(tmp_path / "m")
    model = load_model(str(model_dir))
    ModelSpec(str(model_dir), config_fingerprint=config_fingerprint(model), code=code_path(model)).load()  # the same: accepted
    with pytest.raises(UserError, match=r"\(configuration 000000000000 -> [0-9a-f]{12}\): its files changed during the run"):
        ModelSpec(str(model_dir), config_fingerprint="0" * 16).load()
    with pytest.raises(UserError, match=r"\(code transformers 0\.0 -> transformers .*, attention eager\)"):
        ModelSpec(str(model_dir), code="transformers 0.0").load()


# ----------------------------------------------------------------------------- 2: a full disk between two checkpoints


def _stderr_of(script, argv: list[str]) -> tuple[int, list[str]]:
    """Run a script through :func:`lib.cli.main` in this process: ``(exit status, every stderr line)``."""
    import contextlib
    import io

    from lib import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            cli.main(script.run, argv)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue().strip().splitlines()


def test_a_disk_full_after_the_first_checkpoint_is_one_line_that_counts_what_the_file_holds(tmp_path, monkeypatch, reference_exact):
    save = ckpt.save
    limited = []

    def fill_the_disk_after_the_first(path, state, config):
        save(path, state, config)
        if not limited:  # from now on every file write past 64 bytes fails (EFBIG), like a full disk
            limited.append(_file_size_limit(64))
            limited[0].__enter__()

    monkeypatch.setattr(ckpt, "save", fill_the_disk_after_the_first)
    try:
        code, lines = _stderr_of(single_layer_single_block, [*ARGS, "--output_dir", str(tmp_path), "--checkpoint_every", "1"])
    finally:
        if limited:
            limited[0].__exit__(None, None, None)
    path = tmp_path / "h.ckpt"
    assert code == 1 and lines == [f"error: could not write the checkpoint {path} (OSError: [Errno 27] File too large); the 1 finished unit of 4 is saved in {path} (rerun with --resume)"]
    assert ckpt.read(path)["prefix"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["h.ckpt"]  # no temporary file, no lock
    monkeypatch.undo()
    meta = single_layer_single_block.run([*ARGS, "--output_dir", str(tmp_path), "--resume"])
    assert torch.equal(torch.load(tmp_path / meta["files"]["tensor"]), reference_exact)
