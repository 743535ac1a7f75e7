"""The README's guarantees (issue 12, part B): results are never overwritten, mixed or lost; interruptions
and hung workers stop the run in one line keeping finished work; runs that cannot fit are refused.

Faults are injected from the tests: subprocesses run a small wrapper (``WRAPPER``) that patches one
function to hang, or to SIGKILL the process at a chosen point, and the test sends signals."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from cases import (  # ARGS: 4 float64 units of the embedded model
    ARGS,
    ToyJob,
    _main,
)
from conftest import ROOT, subprocess_env

import hessian_diagonal
import single_layer_single_block
from lib.app import pipeline, preflight
from lib.app.diagonal_family import DiagonalFamily
from lib.app.exact_family import ExactFamily
from lib.app.results import sha256_file
from lib.app.spec import DiagonalSpec, ExactSpec
from lib.errors import RunError
from lib.hessian.diagonal import DiagonalJob
from lib.hessian.exact import ExactHessianJob
from lib.runtime import checkpoint as ckpt
from lib.runtime import parallel

DIAG = [
    "--hvps",
    "4",
    "--layer_name",
    "self_attn.v_proj",
    "--seqlen",
    "16",
    "--b",
    "2",
    "--dtype",
    "float64",
    "--no_progress",
    "--name",
    "d",
]
SCRIPTS = {
    "exact": (single_layer_single_block, ARGS, ExactHessianJob),
    "diagonal": (hessian_diagonal, DIAG, DiagonalJob),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The uninterrupted results of both scripts."""
    out = {}
    for kind, (script, args, _) in SCRIPTS.items():
        tmp = tmp_path_factory.mktemp(kind)
        meta = script.run([*args, "--output_dir", str(tmp)])
        out[kind] = torch.load(tmp / meta["files"]["tensor"])
    return out


@pytest.fixture
def count_units(monkeypatch) -> list[int]:
    """Units computed in this process, by either job."""
    calls: list[int] = []
    for cls in (ExactHessianJob, DiagonalJob):
        orig = cls.run_unit
        monkeypatch.setattr(
            cls,
            "run_unit",
            lambda self, k, progress=None, _o=orig: calls.append(k) or _o(self, k, progress),
        )
    return calls


# ----------------------------------------------------------------------------- 4: no silent overwrite; unique default names


@pytest.mark.parametrize("kind", SCRIPTS)
def test_a_finished_result_is_never_overwritten_without_overwrite(
    kind, tmp_path, reference, monkeypatch
):
    script, args, _ = SCRIPTS[kind]
    out = [*args, "--output_dir", str(tmp_path)]
    script.run(out)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(
        pipeline,
        "load_model",
        lambda *a, **k: (_ for _ in ()).throw(AssertionError("the model was loaded")),
    )
    code, err = _main(script, out)
    assert (
        code == 2
        and err
        == f"error: {tmp_path / ('h' if kind == 'exact' else 'd')}.json holds a finished result; pass --overwrite to replace it, --skip_existing to keep it (exit 0 when it holds this configuration), or choose another --name"
    )
    assert {
        p.name: p.read_bytes() for p in tmp_path.iterdir()
    } == before  # untouched, and no lock left behind
    monkeypatch.undo()
    meta = script.run([*out, "--overwrite"])
    assert torch.equal(torch.load(tmp_path / meta["files"]["tensor"]), reference[kind])


def test_default_names_differ_for_every_result_defining_flag():
    base = dict(
        model="embedded",
        t=8,
        b=16,
        seqlen=128,
        dataset="embedded",
        dtype="float32",
        method="rev-rev",
        seed=0,
        layer_name="self_attn.q_proj",
        block_index=0,
        output_dir="results",
        devices=None,
        no_progress=False,
    )
    name = lambda **kw: ExactFamily().default_name(
        ExactSpec.build("single_layer_single_block", **{**base, **kw})
    )  # noqa: E731
    ref = name()
    assert (
        ref.startswith("single_layer_single_block_embedded_self_attn.q_proj_block0_t8_b16_s128_")
        and ref == name()
    )
    for change in (
        {"dtype": "float64"},
        {"dataset": "other.txt"},
        {"method": "autograd"},
        {"model": "x/embedded"},
    ):
        assert name(**change) != ref, change
    for same in (
        {"seed": 5},
        {"output_dir": "elsewhere"},
        {"devices": "cpu,cpu"},
        {"no_progress": True},
    ):
        assert name(**same) == ref, (
            same
        )  # exact Hessians use no random numbers; where and how do not matter
    assert name(compare=("ggn",), seed=5) != name(
        compare=("ggn",)
    )  # --compare draws labels and perturbations
    whole = {
        k: v for k, v in base.items() if k not in ("t", "method")
    }  # no --t, --method for whole weights
    diag = lambda **kw: DiagonalFamily().default_name(
        DiagonalSpec.build(**{**whole, "hvps": 10, "estimator": ["xdiag"], **kw})
    )  # noqa: E731
    assert diag(seed=1) != diag(seed=0)  # random probes


# ----------------------------------------------------------------------------- 5: one run per output name


WRAPPER = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import lib.hessian.exact, lib.app.results
what = {what!r}
if what == "hang":  # unit 2 never finishes
    run_unit = lib.hessian.exact.ExactHessianJob.run_unit
    def hanging(self, k, progress=None):
        if k == 2:
            print("HANGING", file=sys.stderr, flush=True)
            time.sleep(600)
        return run_unit(self, k, progress)
    lib.hessian.exact.ExactHessianJob.run_unit = hanging
elif what == "kill_before_json":  # SIGKILL between the durable .pt and the .json
    write = lib.app.results.atomic_write_bytes
    def killing(path, fn):
        if path.suffix == ".json":
            os.kill(os.getpid(), signal.SIGKILL)
        return write(path, fn)
    lib.app.results.atomic_write_bytes = killing
import single_layer_single_block
from lib.app import cli
cli.main(single_layer_single_block.run, sys.argv[1:])
"""


def _start(tmp_path, what: str, *extra) -> subprocess.Popen:
    script = tmp_path / f"{what}.py"
    script.write_text(WRAPPER.format(root=str(ROOT), what=what))
    return subprocess.Popen(
        [sys.executable, str(script), *ARGS, "--output_dir", str(tmp_path), *extra],
        env=subprocess_env(),
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(proc: subprocess.Popen, marker: str, timeout: float = 180) -> str:
    """Read the child's stderr until ``marker`` appears."""
    seen = ""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} in: {seen[-2000:]}"
        line = proc.stderr.readline()
        assert line or proc.poll() is None, seen
        seen += line
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_is_one_line_with_its_exit_status_and_a_concurrent_run_is_refused(
    sig, tmp_path, no_model_load
):
    proc = _start(tmp_path, "hang", "--checkpoint_every", "1")
    try:
        _wait_for(proc, "HANGING")
        path = tmp_path / "h.ckpt"
        deadline = time.monotonic() + 30
        while not (path.exists() and ckpt.read(path)["prefix"] == 2):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # 5: a second run with the same name refuses at once, before loading the model, and changes nothing
        code, err = _main(
            single_layer_single_block, [*ARGS, "--output_dir", str(tmp_path), "--resume"]
        )
        assert (
            code == 2
            and err
            == f"error: another run (pid {proc.pid}) is writing {tmp_path / 'h'}.*; wait for it to finish or choose another --name"
        )
        assert proc.poll() is None and ckpt.read(path)["prefix"] == 2
        # 9: the signal stops it with one line, no traceback, the documented status, finished units kept
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    assert (
        err.strip().splitlines()[-1]
        == f"error: interrupted by {sig.name}; the 2 finished units of 4 are saved in {path} (rerun with --resume)"
    )
    assert ckpt.read(path)["prefix"] == 2
    assert not list(tmp_path.glob("h.*[!t]"))  # no result, no lock left: only h.ckpt


# ----------------------------------------------------------------------------- 6: a foreign checkpoint is never deleted or ignored


@pytest.mark.parametrize("every", ["0", "1", "120s"])
def test_a_checkpoint_of_another_run_is_refused_for_every_checkpoint_every(
    every, tmp_path, no_model_load
):
    foreign = tmp_path / "h.ckpt"
    foreign.write_bytes(b"another run's checkpoint")
    code, err = _main(
        single_layer_single_block,
        [*ARGS, "--output_dir", str(tmp_path), "--checkpoint_every", every],
    )
    assert (
        code == 2
        and err
        == f"error: checkpoint {foreign} exists from an earlier run; pass --resume to continue it, or delete it to start over"
    )
    assert foreign.read_bytes() == b"another run's checkpoint" and sorted(
        p.name for p in tmp_path.iterdir()
    ) == ["h.ckpt"]


def test_finish_removes_only_a_checkpoint_the_run_wrote_or_resumed(tmp_path):
    path = tmp_path / "x.ckpt"
    path.write_bytes(b"x")
    ckpt.finish(ckpt.CheckpointConfig(path, every_units=0, every_s=0))
    assert path.exists()
    ckpt.finish(ckpt.CheckpointConfig(path, owned=True))
    assert not path.exists()


# ----------------------------------------------------------------------------- 7: output problems before the model; a failed save loses nothing


@pytest.mark.parametrize(
    "where,message",
    [
        ("file", r"--output_dir '.*/afile' is a file, not a directory"),
        ("name_sep", r"--name 'sub/h' is not a plain file name"),
        ("name_dots", r"--name '\.\.' is not a plain file name"),
        (
            "inside_file",
            r"--output_dir '.*/afile/sub' is not a writable directory \(Not a directory\)",
        ),
    ],
)
@pytest.mark.parametrize("kind", SCRIPTS)
def test_bad_output_locations_are_refused_before_the_model_is_loaded(
    kind, where, message, tmp_path, no_model_load
):
    script, args, _ = SCRIPTS[kind]
    (tmp_path / "afile").write_text("x")
    out = {"file": tmp_path / "afile", "inside_file": tmp_path / "afile" / "sub"}.get(
        where, tmp_path
    )
    name = {"name_sep": "sub/h", "name_dots": ".."}.get(where, "h")
    code, err = _main(script, [*args, "--output_dir", str(out), "--name", name])
    assert code == 2 and re.fullmatch("error: " + message + ".*", err), err
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


@pytest.mark.parametrize("kind", SCRIPTS)
def test_a_failed_save_keeps_the_finished_sums_and_resume_writes_without_recomputing(
    kind, tmp_path, reference, monkeypatch, count_units
):
    script, args, _ = SCRIPTS[kind]
    import lib.app.results

    def disk_full(path, fn):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(lib.app.results, "atomic_write_bytes", disk_full)
        code, err = _main(
            script, [*args, "--output_dir", str(tmp_path)]
        )  # default --checkpoint_every 120s: no checkpoint yet
    stem = "h" if kind == "exact" else "d"
    ckpts = ", ".join(
        str(tmp_path / f)
        for f in ([f"{stem}.ckpt"] if kind == "exact" else [f"{stem}.ckpt", f"{stem}.phase2.ckpt"])
    )
    assert (
        code == 1
        and err
        == f"error: could not write the results (OSError: [Errno 28] No space left on device); every unit is computed and saved in {ckpts}: fix the cause and rerun with --resume (and the same flags) to write the outputs without recomputing"
    )
    n = len(count_units)
    assert n > 0
    meta = script.run([*args, "--output_dir", str(tmp_path), "--resume"])
    assert len(count_units) == n  # nothing recomputed
    assert torch.equal(torch.load(tmp_path / meta["files"]["tensor"]), reference[kind])
    assert not list(tmp_path.glob("*.ckpt")) and not list(tmp_path.glob("*.lock"))


def test_ctrl_c_while_writing_the_results_says_they_are_in_the_checkpoint(tmp_path, monkeypatch):
    import lib.app.results

    def interrupted(path, fn):
        raise KeyboardInterrupt

    monkeypatch.setattr(lib.app.results, "atomic_write_bytes", interrupted)
    code, err = _main(single_layer_single_block, [*ARGS, "--output_dir", str(tmp_path)])
    assert (
        code == 130
        and err
        == f"error: interrupted by SIGINT while writing the results; every unit is computed and saved in {tmp_path / 'h.ckpt'}: fix the cause and rerun with --resume (and the same flags) to write the outputs without recomputing"
    )


# ----------------------------------------------------------------------------- 8: the result pair


@pytest.mark.slow
def test_a_kill_between_tensor_and_json_never_leaves_a_mismatched_pair(
    tmp_path, reference, count_units
):
    (tmp_path / "h.pt").write_bytes(
        b"an older result"
    )  # of the same name, replaced with --overwrite
    (tmp_path / "h.json").write_text("{}")
    proc = _start(tmp_path, "kill_before_json", "--overwrite")
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not (
        tmp_path / "h.json"
    ).exists()  # the old sidecar is gone before the new tensor is written
    assert torch.equal(torch.load(tmp_path / "h.pt"), reference["exact"])
    assert ckpt.read(tmp_path / "h.ckpt")["prefix"] == 4  # the complete sums, kept
    meta = single_layer_single_block.run([*ARGS, "--output_dir", str(tmp_path), "--resume"])
    assert count_units == []
    js = json.loads((tmp_path / "h.json").read_text())
    assert js["tensor_sha256"] == sha256_file(tmp_path / "h.pt") == meta["tensor_sha256"]
    assert not (tmp_path / "h.ckpt").exists()


# ----------------------------------------------------------------------------- 10: a hung worker


@pytest.mark.slow
def test_a_stopped_worker_is_detected_named_and_finished_units_are_kept(tmp_path):
    cfg = ckpt.CheckpointConfig(tmp_path / "t.ckpt", every_units=100)
    settings = parallel.RunSettings(
        [torch.device("cpu"), torch.device("cpu")], cfg, unit_timeout=2.0
    )
    t0 = time.monotonic()
    with pytest.raises(
        RunError,
        match=r"^worker \d \(cpu\) has computed sample 2 \(unit 2\) for \ds, over --unit_timeout 2s; it was stopped as hung; the 3 finished units of 4 are saved in .*t\.ckpt \(rerun with --resume\)$",
    ):
        parallel.run_job(ToyJob(4, {2: "stop"}), settings)
    assert time.monotonic() - t0 < 60
    state = ckpt.load(cfg.path, ToyJob(4).config(), 4)
    assert state.remaining() == [2]
    cfg.resume = True
    assert torch.equal(
        parallel.run_job(ToyJob(4), parallel.RunSettings([torch.device("cpu")], cfg))["s"],
        torch.full((3,), 6.0, dtype=torch.float64),
    )


def test_automatic_hung_limit_is_ten_medians_and_at_least_five_minutes():
    w = parallel._Worker(0, torch.device("cpu"), None, None, unit=7, started=time.monotonic() - 400)
    assert parallel._hung_worker([w], [], 0) is None  # no unit finished yet: no median
    assert parallel._hung_worker([w], [1.0, 2.0, 50.0], 0) is not None  # 400s > max(300, 10 * 2)
    assert parallel._hung_worker([w], [30.0, 45.0, 50.0], 0) is None  # 400s < 10 * 45
    w.started = time.monotonic() - 200
    assert parallel._hung_worker([w], [1.0], 0) is None  # under the 5-minute floor
    assert parallel._hung_worker([w], [], 100.0)[1] == "--unit_timeout 100s"


def test_unit_timeout_flag_is_validated(tmp_path):
    code, err = _main(
        single_layer_single_block, [*ARGS, "--output_dir", str(tmp_path), "--unit_timeout", "-1"]
    )
    assert code == 2 and err == "error: --unit_timeout must be >= 0 seconds, got -1.0"


# ----------------------------------------------------------------------------- 15: resources


@pytest.mark.slow
def test_checkpoint_size_estimate_matches_the_files(tmp_path):
    argv = [
        "--hvps",
        "6",
        "--estimator",
        "hutchinson",
        "xdiag",
        "empirical_fisher",
        "--track_rows",
        "1",
        "--seqlen",
        "16",
        "--b",
        "2",
        "--no_progress",
        "--name",
        "e",
        "--output_dir",
        str(tmp_path),
        "--keep_checkpoint",
    ]
    seen = []
    orig = preflight.check
    with pytest.MonkeyPatch.context() as m:
        m.setattr(preflight, "check", lambda est, *a: seen.append(est) or orig(est, *a))
        hessian_diagonal.run(argv)
    size = sum(p.stat().st_size for p in tmp_path.glob("e*.ckpt"))
    assert len(seen) == 1 and 0.9 * size <= seen[0].checkpoint <= 1.1 * size, (
        seen[0].checkpoint,
        size,
    )


@pytest.mark.parametrize("kind", SCRIPTS)
def test_a_run_that_does_not_fit_in_memory_is_refused_before_computing(
    kind, tmp_path, monkeypatch, count_units
):
    script, args, _ = SCRIPTS[kind]
    monkeypatch.setattr(preflight, "available_host_bytes", lambda: 10)
    code, err = _main(script, [*args, "--output_dir", str(tmp_path)])
    assert code == 2 and count_units == []
    if kind == "exact":
        assert (
            err
            == "error: this run needs about 0.4 kB of host memory (0.0 kB available): the exact Hessian has 3^2 = 9 entries; use a smaller --t (or fewer blocks or layers), or --checkpoint_every 0 (no checkpoint file)"
        )
    else:
        assert re.fullmatch(
            r"error: this run needs about [\d.]+ MB of host memory \(0\.0 kB available\): XDiag keeps K/2 = 2 vectors of each weight's size \(16,384 entries in 1 weight\(s\)\); use --estimator hutchinson .*--hvps.*",
            err,
        ), err
    assert not list(tmp_path.iterdir())


def test_all_layers_xdiag_estimate_on_the_embedded_model():
    """The issue's case: --all_layers --vhp_samples 200 on the embedded model wrote a 635 MB phase-1 checkpoint."""
    from lib.hessian.diagonal import Target, plan_phase1
    from lib.model.models import iter_named_linear, load_model

    model = load_model("embedded")
    targets = [
        Target(f"{name}.weight", tuple(mod.weight.shape))
        for _, _, name, mod in iter_named_linear(model)
    ]
    est = preflight.diagonal_estimate(plan_phase1(targets, ["xdiag"], 200, 0), 4)
    assert sum(t.numel for t in targets) == 786432
    assert (
        est.checkpoint == 2 * 100 * 786432 * 8 + 786432 * 8
    )  # phase 1 (sketch + zhz) and phase 2 (H Q), float64
    with (
        pytest.raises(
            Exception, match=r"this run needs about 4\.\d+ GB of host memory \(1\.00 GB available\)"
        ),
        pytest.MonkeyPatch.context() as m,
    ):
        m.setattr(preflight, "available_host_bytes", lambda: 10**9)
        preflight.check(est, [torch.device("cpu")], ".", False, "fewer weights")


def test_a_refused_run_leaves_no_output_directory_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(
        preflight, "available_host_bytes", lambda: 10
    )  # refused after the claim, before computing
    out = tmp_path / "new" / "dir"
    code, _ = _main(single_layer_single_block, [*ARGS, "--output_dir", str(out)])
    assert code == 2 and not (tmp_path / "new").exists()
