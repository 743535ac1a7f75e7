"""The thread policy (:mod:`lib.runtime.threads`) as a pure function, its overrides, and its record in a run's JSON."""

from __future__ import annotations

import json

import pytest
import torch

from lib.app.cli import flag_message
from lib.errors import ParamError
from lib.runtime import threads


@pytest.mark.parametrize(
    "cpus,quota,load,processes,expected",
    [
        (2, None, 0.0, 1, 2),  # quiet: every core
        (2, None, 0.1, 1, 2),  # kernel noise is not load
        (2, None, 2.0, 1, 1),  # two busy processes beside it: one thread, not a collapse
        (2, None, 1.0, 1, 1),  # one busy process: the one free core
        (2, None, 7.3, 1, 1),  # overloaded: never fewer than one
        (16, None, 4.0, 1, 12),
        (16, 4.0, 0.0, 1, 4),  # the cgroup quota, not the affinity mask
        (16, 2.5, 0.0, 1, 2),  # a fractional quota rounds down
        (4, 0.5, 0.0, 1, 1),  # a quota under one CPU still runs
        (8, None, 0.0, 2, 4),  # two local processes share the CPUs
        (8, None, 3.0, 2, 2),
        (2, None, 0.0, 2, 1),  # --devices cpu,cpu on 2 cores: one each
        (2, None, 0.0, 4, 1),  # more processes than CPUs: one each
    ],
)
def test_policy(cpus, quota, load, processes, expected):
    n, why = threads.policy(cpus, quota, load, processes)
    assert n == expected
    assert f"load {load:.1f}" in why and str(cpus) in why
    assert ("quota" in why) == (quota is not None and quota < cpus)


def test_policy_never_asks_for_more_than_is_free():
    for cpus in (1, 2, 3, 8, 64):
        for load in (0.0, 0.5, 1.0, 1.7, 3.0, 10.0):
            for processes in (1, 2, 3):
                n, _ = threads.policy(cpus, None, load, processes)
                assert 1 <= n <= max(1, cpus // processes)
                assert n == 1 or n * processes <= cpus - load + threads.SLACK * processes


def test_requested_and_environment_override_the_policy(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose(None).to_json() == {"n": 3, "why": "OMP_NUM_THREADS", "processes": 1}
    assert threads.choose(5).n == 5 and threads.choose(5).why == "--threads"
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 2)
    monkeypatch.setattr(threads, "cgroup_quota", lambda: None)
    monkeypatch.setattr(threads, "current_load", lambda: 2.0)
    assert threads.choose(None).n == 1 and threads.choose(None).why == "load 2.0 on 2 cpus"
    monkeypatch.setattr(threads, "current_load", lambda: 0.0)
    assert threads.choose(None).n == 2
    assert threads.choose(None, processes=2).n == 1


def test_apply_sets_torch_and_refuses_zero(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_CHOICE", None)
    assert threads.report() is None
    try:
        threads.apply(1)
        assert torch.get_num_threads() == 1  # what WorkerPool gives each worker
        assert threads.report() == {"n": 1, "why": "--threads", "processes": 1}
        with pytest.raises(ParamError, match="^threads must be at least 1, got 0") as e:
            threads.apply(0)
        assert flag_message(e.value) == "--threads must be at least 1, got 0"
    finally:
        torch.set_num_threads(before)


def test_local_processes_from_devices_or_torchrun(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert threads.local_processes(1) == 1 and threads.local_processes(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.local_processes(1) == 4


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "cpu.cfs_period_us").write_text("100000\n")
    assert threads._cgroup_quota_v1(tmp_path) == 1.5
    (tmp_path / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads._cgroup_quota_v1(tmp_path) is None
    assert threads._cgroup_quota_v1(tmp_path / "missing") is None


def test_current_load_is_a_nonnegative_number():
    assert threads.current_load(samples=2, interval_s=0.0) >= 0.0


def test_the_choice_is_in_the_json(tmp_path):
    import single_layer_single_block

    before = torch.get_num_threads()
    try:
        meta = single_layer_single_block.run(
            [
                "--t",
                "2",
                "--seqlen",
                "16",
                "--b",
                "1",
                "--no_progress",
                "--threads",
                "1",
                "--output_dir",
                str(tmp_path),
            ]
        )
    finally:
        torch.set_num_threads(before)
    js = json.loads((tmp_path / meta["files"]["json"]).read_text())
    assert js["threads"] == {"n": 1, "why": "--threads", "processes": 1}
    assert js["config"]["run"]["threads"] == 1
