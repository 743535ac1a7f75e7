"""Data-parallel runs (worker processes, torchrun) and checkpoint/resume: the result never depends on how it was run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch
from cases import ARGS, ToyJob  # noqa: F401  (ToyJob: the jobs that fail, picklable)
from conftest import ROOT, subprocess_env, torchrun

import single_layer_single_block
from lib.app import cli
from lib.errors import RunError, UserError
from lib.hessian.exact import ExactHessianJob
from lib.model.models import ModelSpec
from lib.runtime import checkpoint as ckpt
from lib.runtime import parallel
from lib.runtime.jobs import ModelJob, add_partials, run_serial


def _run(tmp, *extra) -> torch.Tensor:
    single_layer_single_block.run([*ARGS, "--output_dir", str(tmp), *extra])
    return torch.load(tmp / "h.pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> torch.Tensor:
    """The uninterrupted single-process result."""
    return _run(tmp_path_factory.mktemp("ref"))


# ----------------------------------------------------------------------------- pure checkpoint logic


def _partials(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "h": torch.randn(5, 5, generator=g, dtype=torch.float64)
            * 10.0 ** torch.randint(-8, 8, (5, 5), generator=g),
            "v": torch.randn((), generator=g, dtype=torch.float32),
        }
        for _ in range(n)
    ]


def test_run_state_sums_in_unit_order_whatever_the_arrival_order():
    parts = _partials(7)
    serial = None
    for p in parts:
        serial = add_partials(serial, p)
    state = ckpt.RunState(7)
    for k in [3, 1, 0, 6, 2, 5, 4]:
        state.add(k, parts[k])
        assert state.n_done == len(state.pending) + state.prefix
    assert state.complete and state.remaining() == []
    for name in serial:
        assert torch.equal(state.total()[name], serial[name])
    with pytest.raises(ValueError):
        state.add(3, parts[3])


def test_checkpoint_round_trip_refuses_torn_files_and_other_configurations(tmp_path):
    parts, config = _partials(5), {"kind": "x", "model": {"dtype": "float64"}, "method": "rev-rev"}
    state = ckpt.RunState(5)
    for k in [0, 1, 3]:
        state.add(k, parts[k])
    path = tmp_path / "x.ckpt"
    ckpt.save(path, state, config)
    back = ckpt.load(path, config, 5)
    assert (back.prefix, sorted(back.pending), back.remaining()) == (2, [3], [2, 4])
    assert all(torch.equal(back.prefix_sum[n], state.prefix_sum[n]) for n in parts[0])
    with pytest.raises(
        UserError, match=r"different configuration \(differs in: method, model.dtype\)"
    ):
        ckpt.load(path, {**config, "method": "autograd", "model": {"dtype": "float32"}}, 5)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        ckpt.load(path, config, 5)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(UserError, match="checksum mismatch"):
        ckpt.load(path, config, 5)
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]  # no temporary files left


def test_sigterm_is_deferred_while_a_unit_is_added():
    steps = []
    with pytest.raises(SystemExit) as exc, parallel._SIGNALS.installed():
        with parallel._SIGNALS.critical():
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("after the signal")
        steps.append("after the critical section")  # not reached
    assert exc.value.code == 128 + signal.SIGTERM and steps == ["after the signal"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize(
    "text,expected",
    [
        ("0", (0, 0.0)),
        ("7", (7, 0.0)),
        ("120s", (0, 120.0)),
        ("10m", (0, 600.0)),
        ("1.5h", (0, 5400.0)),
    ],
)
def test_parse_every(text, expected):
    assert ckpt.parse_every(text) == expected


# ----------------------------------------------------------------------------- jobs that fail (picklable: run in spawned workers)


def test_non_finite_unit_stops_with_its_sample_and_keeps_earlier_units(tmp_path):
    cfg = ckpt.CheckpointConfig(tmp_path / "t.ckpt", every_units=100)
    with pytest.raises(
        RunError,
        match=r"sample 2 \(unit 2\) gave NaN or Inf in s; the 2 finished units of 4 are saved in",
    ):
        parallel.run_job(ToyJob(4, {2: "nan"}), parallel.RunSettings([torch.device("cpu")], cfg))
    state = ckpt.load(cfg.path, ToyJob(4).config(), 4)
    assert state.prefix == 2 and not state.pending
    # resuming with the cause fixed finishes the run
    cfg.resume = True
    total = parallel.run_job(ToyJob(4), parallel.RunSettings([torch.device("cpu")], cfg))
    assert torch.equal(total["s"], torch.full((3,), 6.0, dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.parametrize(
    "what,message",
    [
        ("raise", r"worker \d \(cpu\) failed on sample 2 \(unit 2\): RuntimeError: boom in unit 2"),
        (
            "kill",
            r"worker \d \(cpu\) was killed by SIGKILL \(out of memory\?\) while computing sample 2 \(unit 2\)",
        ),
    ],
    ids=["raise", "sigkill"],
)
def test_a_failing_worker_stops_the_run_with_its_error_and_finished_units_are_kept(
    what, message, tmp_path
):
    cfg = ckpt.CheckpointConfig(tmp_path / "t.ckpt", every_units=100)
    job = ToyJob(4, {2: what})
    with pytest.raises(RunError, match=message + r"; the \d finished units of 4 are saved in"):
        parallel.run_job(job, parallel.RunSettings([torch.device("cpu"), torch.device("cpu")], cfg))
    state = ckpt.load(cfg.path, job.config(), 4)
    assert state.prefix >= 2 and 2 in state.remaining()


def test_distributed_rank_zero_stops_on_a_failed_unit_and_resumes(tmp_path, one_rank_env):
    """The torchrun path in one gloo rank: a failing unit stops every rank with its error; the checkpoint keeps the rest."""
    cfg = ckpt.CheckpointConfig(tmp_path / "t.ckpt", every_units=100)
    settings = parallel.RunSettings([torch.device("cpu")], cfg)
    with pytest.raises(
        RunError,
        match=r"rank 0 \(cpu\) failed on sample 3 \(unit 3\): RuntimeError: boom in unit 3; the 3 finished units of 5 are saved",
    ):
        parallel._run_distributed(ToyJob(5, {3: "raise"}), settings, (0, 0, 1))
    cfg.resume = True
    total = parallel._run_distributed(ToyJob(5), settings, (0, 0, 1))
    assert torch.equal(total["s"], torch.full((3,), 10.0, dtype=torch.float64))
    assert settings.stats["mode"] == "torchrun" and settings.stats["units_run"] == 2


# ----------------------------------------------------------------------------- a pool of workers kept between jobs

LOADS = [0]
"""Models loaded by this process through :class:`CountingSpec` (in a worker: by that worker)."""


@dataclass
class CountingSpec(ModelSpec):
    """A ModelSpec whose "model" is a seeded float64 ``Linear(4, 3)``, counting its loads in :data:`LOADS`."""

    def load(self, device="cpu"):
        LOADS[0] += 1
        torch.manual_seed(int(self.fingerprint))
        return torch.nn.Linear(4, 3, dtype=torch.float64).to(device)


class LinearJob(ModelJob):
    """Unit ``k`` = ``{"y": model(x_k) * scale, "loads": e_k * loads, "pid": e_k * pid}`` for the rows ``x_k`` of ``x``:
    the sums are ``model`` applied to all rows plus, per unit, the load count and pid of the process that ran it."""

    model_input_bs = 1

    def __init__(self, x, scale, spec):
        self.x, self.scale, self.spec = x, scale, spec

    def setup(self, device):
        self.ensure_model(device)

    def num_units(self):
        return self.x.shape[0]

    def steps_per_unit(self):
        return 1

    def run_unit(self, k, progress=None):
        e = torch.zeros(self.num_units(), dtype=torch.float64)
        e[k] = 1.0
        with torch.no_grad():
            y = self.model(self.x[k]) * self.scale
        time.sleep(0.05)  # both workers get units
        return {"y": y, "loads": e * LOADS[0], "pid": e * os.getpid()}

    def config(self):
        return {"kind": "linear", "scale": self.scale}


def _two_jobs():
    g = torch.Generator().manual_seed(1)
    spec = CountingSpec(fingerprint="7")
    return [
        LinearJob(torch.randn(6, 4, generator=g, dtype=torch.float64), 1.0, spec),
        LinearJob(torch.randn(5, 4, generator=g, dtype=torch.float64), -3.5, spec),
    ]


def _settings(pool, **kw):
    return parallel.RunSettings([torch.device("cpu"), torch.device("cpu")], pool=pool, **kw)


@pytest.mark.slow
def test_a_pool_runs_two_jobs_on_the_same_workers_loading_the_model_once_each():
    serial = [run_serial(job, torch.device("cpu"))["y"] for job in _two_jobs()]
    pids = set()
    with parallel.WorkerPool([torch.device("cpu")] * 2) as pool:
        for job, ref in zip(_two_jobs(), serial):
            settings = _settings(pool)
            sums = parallel.run_job(job, settings)
            assert torch.equal(sums["y"], ref)  # bitwise the in-process result
            assert torch.equal(
                sums["loads"], torch.ones_like(sums["loads"])
            )  # no worker loaded the model twice
            pids |= set(sums["pid"].tolist())
        procs = [w.proc for w in pool.workers]
        # every unit ran on the pool's two workers (which of them took how many units depends on timing)
        assert pool.started == 2 and pool.jobs == 2 and pids and pids <= {p.pid for p in procs}
        assert settings.stats["workers_spawned"] == 0 and settings.stats["pool_job"] == 2
    assert not any(p.is_alive() for p in procs) and pool.workers == []
    with pytest.raises(ValueError, match="closed"):
        parallel.run_job(_two_jobs()[0], _settings(pool))


@pytest.mark.slow
def test_a_pool_worker_killed_between_or_during_jobs_is_one_line_and_leaves_no_process(tmp_path):
    with parallel.WorkerPool([torch.device("cpu")] * 2) as pool:
        parallel.run_job(_two_jobs()[0], _settings(pool))
        procs = [w.proc for w in pool.workers]
        os.kill(procs[1].pid, signal.SIGKILL)
        procs[1].join()
        with pytest.raises(
            RunError,
            match=r"^worker 1 \(cpu\) was killed by SIGKILL \(out of memory\?\) while setting up$",
        ):
            parallel.run_job(_two_jobs()[1], _settings(pool))
        assert pool.workers == [] and not any(p.is_alive() for p in procs)
        # the next job spawns fresh workers; one killed during it is named with its sample, the finished units kept
        assert torch.equal(
            parallel.run_job(_two_jobs()[1], _settings(pool))["loads"],
            torch.ones(5, dtype=torch.float64),
        )
        procs = [w.proc for w in pool.workers]
        cfg = ckpt.CheckpointConfig(tmp_path / "t.ckpt", every_units=100)
        with pytest.raises(
            RunError,
            match=r"^worker \d \(cpu\) was killed by SIGKILL \(out of memory\?\) while computing sample 2 \(unit 2\); the \d finished units of 4 are saved in",
        ):
            parallel.run_job(ToyJob(4, {2: "kill"}), _settings(pool, checkpoint=cfg))
        assert pool.started == 4 and pool.workers == [] and not any(p.is_alive() for p in procs)


# ----------------------------------------------------------------------------- the exact Hessian, run in every way


@pytest.mark.slow
def test_two_cpu_workers_equal_one_process_bitwise(reference, tmp_path):
    meta = single_layer_single_block.run(
        [*ARGS, "--output_dir", str(tmp_path), "--devices", "cpu,cpu"]
    )
    assert meta["run"]["mode"] == "workers" and meta["run"]["workers"] == 2
    assert torch.equal(torch.load(tmp_path / "h.pt"), reference)
    # issue 19, item 11: the JSON records the chunk each worker used ("auto" and "measured": null said nothing before)
    used = meta["chunk"]["used"]
    workers = {"worker 0 (cpu)", "worker 1 (cpu)"}
    assert (
        used == meta["run"]["chunks"] and used and set(used) <= workers
    )  # each worker that computed a unit
    assert all(set(u) == {"3"} and u["3"] in (1, 2) for u in used.values())


@pytest.mark.slow
def test_diagonal_job_on_two_cpu_workers_equals_one_process_bitwise():
    diagonal = pytest.importorskip("lib.hessian.diagonal")
    from lib.model.data import load_samples
    from lib.model.models import ModelSpec
    from lib.runtime.jobs import run_serial

    spec = ModelSpec(dtype="float64")
    model = spec.load("cpu")
    name = "model.decoder.layers.1.self_attn.q_proj.bias"
    target = diagonal.Target(name, tuple(model.get_parameter(name).shape))
    plans = diagonal.plan_phase1([target], ("hutchinson", "xdiag", "empirical_fisher"), 4, seed=0)
    samples = load_samples("embedded", 16, 4)
    serial = run_serial(
        diagonal.DiagonalJob(plans, samples, spec=spec, model=model), torch.device("cpu")
    )
    settings = parallel.RunSettings([torch.device("cpu"), torch.device("cpu")])
    sums = parallel.run_job(diagonal.DiagonalJob(plans, samples, spec=spec, model=model), settings)
    assert settings.stats["workers"] == 2 and sums.keys() == serial.keys()
    assert all(torch.equal(sums[k], serial[k]) for k in serial)


@pytest.mark.slow
def test_torchrun_with_two_gloo_ranks_equals_one_process_bitwise(reference, tmp_path):
    proc = torchrun(
        ROOT / "single_layer_single_block.py",
        *ARGS,
        "--output_dir",
        str(tmp_path),
        "--device",
        "cpu",
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "h.pt"), reference)
    assert not (tmp_path / "h.ckpt").exists()


HANG_AT_UNIT_2 = """
import sys, time
sys.path.insert(0, {root!r})
import lib.hessian.exact as h
run_unit = h.ExactHessianJob.run_unit
def hanging(self, k, progress=None):
    if k == 2:
        time.sleep(600)
    return run_unit(self, k, progress)
h.ExactHessianJob.run_unit = hanging
import single_layer_single_block
from lib.app import cli
cli.main(single_layer_single_block.run, sys.argv[1:])
"""


@pytest.mark.slow
def test_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(
    reference, tmp_path, monkeypatch
):
    script = tmp_path / "hang.py"
    script.write_text(HANG_AT_UNIT_2.format(root=str(ROOT)))
    path = tmp_path / "h.ckpt"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            *ARGS,
            "--output_dir",
            str(tmp_path),
            "--checkpoint_every",
            "1",
        ],
        env=subprocess_env(),
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (path.exists() and ckpt.read(path)["prefix"] == 2):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint after 2 units"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "h.pt").exists()

    calls = []
    run_unit = ExactHessianJob.run_unit
    monkeypatch.setattr(
        ExactHessianJob,
        "run_unit",
        lambda self, k, progress=None: calls.append(k) or run_unit(self, k, progress),
    )
    with pytest.raises(SystemExit) as exc:  # not resuming would overwrite the checkpoint: refused
        cli.main(single_layer_single_block.run, [*ARGS, "--output_dir", str(tmp_path)])
    assert exc.value.code == 2 and calls == []
    assert torch.equal(_run(tmp_path, "--resume"), reference)
    assert calls == [2, 3]  # nothing finished is recomputed
    assert not path.exists()  # removed once the results are saved


def test_resume_refuses_a_changed_flag_and_a_truncated_checkpoint(reference, tmp_path, capsys):
    assert torch.equal(_run(tmp_path, "--keep_checkpoint", "--checkpoint_every", "1"), reference)
    path = tmp_path / "h.ckpt"
    assert ckpt.read(path)["prefix"] == 4  # the complete run, kept
    assert torch.equal(
        _run(tmp_path, "--resume", "--keep_checkpoint", "--overwrite"), reference
    )  # complete: nothing to compute

    def error(*extra) -> str:
        with pytest.raises(SystemExit) as exc:
            cli.main(
                single_layer_single_block.run,
                [*ARGS, "--output_dir", str(tmp_path), "--overwrite", *extra],
            )
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        return err[-1]

    assert (
        error("--resume", "--method", "autograd")
        == f"error: checkpoint {path} was written by a run with a different configuration (differs in: method); rerun with the original flags, or delete it to start over"
    )
    assert "differs in: samples_sha256, samples_shape" in error("--resume", "--seqlen", "17")
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    assert (
        error("--resume")
        == f"error: checkpoint {path} is truncated or corrupt ({len(data) - 100 - 48} of {len(data) - 48} payload bytes); delete it to start over"
    )


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--devices", "cpu,"], "--devices 'cpu,' has an empty entry"),
        (["--devices", "cpu,tpu:9"], "invalid --devices entry 'tpu:9'"),
        (["--checkpoint_every", "1.5"], "--checkpoint_every '1.5' is neither a number of units"),
        (["--devices", "cpu,cpu", "--device_map", "auto"], "--device_map"),
    ],
)
def test_run_flag_errors(extra, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(single_layer_single_block.run, [*ARGS, "--output_dir", str(tmp_path), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err, err
    assert not list(tmp_path.iterdir())


def test_torchrun_ranks_take_their_gpu_and_a_rank_without_one_is_refused_in_one_line(monkeypatch):
    """Seen on an H200: under torchrun with one rank, ``--device cuda`` reached ``torch.cuda.set_device`` without an
    index (ValueError); with two ranks on one GPU, rank 1 died on 'invalid device ordinal' deep in the run."""
    from types import SimpleNamespace

    from lib.app.pipeline import run_devices
    from lib.errors import ParamError
    from lib.model.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    spec = SimpleNamespace(run=SimpleNamespace(devices=None, device="cuda"))
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    assert run_devices(spec) == [torch.device("cuda", 0)]
    for k, v in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(
        UserError, match=r"local rank 1 runs on cuda:1, but this machine has 1 CUDA"
    ):
        run_devices(spec)
    with pytest.raises(ParamError, match=r"cuda:1 requested but this machine has 1 CUDA device"):
        resolve_device("cuda:1")
