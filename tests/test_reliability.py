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
from test_guarantees import _env, _main

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
