"""Library calls settle threads and ``model_input_bs`` as the scripts do (issue 27 item 1): the thread policy once
per process, never over a caller's choice, and ``model_input_bs="auto"`` by the scripts' rule, bitwise equal
results."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

import lib
from lib.errors import ParamError
from lib.products import autotune
from lib.runtime import threads


@pytest.fixture
def fresh(monkeypatch):
    """A process that has not chosen its threads yet (restored afterwards); the policy sees 2 CPUs, load 2."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_CHOICE", None)
    monkeypatch.setattr(threads, "_LIBRARY_DONE", False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.LIBRARY_ENV, raising=False)
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 2)
    monkeypatch.setattr(threads, "cgroup_quota", lambda: None)
    monkeypatch.setattr(threads, "current_load", lambda: 2.0)
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "torch_default_threads", lambda: 2)  # 2: torch's own start value
    yield
    torch.set_num_threads(before)


def test_the_policy_applies_once_and_then_leaves_the_threads_alone(fresh):
    choice = threads.for_library()
    assert (
        torch.get_num_threads() == 1 and choice is not None and choice.why == "load 2.0 on 2 cpus"
    )
    torch.set_num_threads(2)  # the caller's later choice
    assert threads.for_library() is choice and torch.get_num_threads() == 2


def test_a_callers_set_num_threads_is_kept(fresh):
    torch.set_num_threads(1)
    threads.torch_default_threads = lambda: 2  # torch started with 2: 1 was set by the caller
    assert threads.for_library() is None and torch.get_num_threads() == 1
    threads._LIBRARY_DONE = False
    torch.set_num_threads(2)  # now as torch started: the policy decides (load 2 on 2 CPUs: one)
    assert threads.for_library().n == 1 and torch.get_num_threads() == 1


def test_the_variable_and_set_threads_override(fresh, monkeypatch):
    monkeypatch.setenv(threads.LIBRARY_ENV, "2")
    torch.set_num_threads(1)  # the variable wins over a caller's set_num_threads
    assert threads.for_library().to_json() == {"n": 2, "why": threads.LIBRARY_ENV, "processes": 1}
    assert torch.get_num_threads() == 2
    threads._LIBRARY_DONE, threads._CHOICE = False, None
    monkeypatch.setenv(threads.LIBRARY_ENV, "zero")
    with pytest.raises(ParamError, match="LLM_HESSIAN_THREADS must be an integer"):
        threads.for_library()
    assert lib.set_threads(1).why == "lib.set_threads" and torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert threads.for_library().n == 1 and torch.get_num_threads() == 2  # decided: left alone
    assert lib.set_threads("auto").n == 1 and torch.get_num_threads() == 1  # the policy, now
    with pytest.raises(ParamError, match="at least 1"):
        lib.set_threads(0)


def test_a_scripts_choice_is_not_changed(fresh):
    threads.apply(2)
    assert threads.for_library().why == "--threads" and torch.get_num_threads() == 2


def test_torch_default_threads_from_the_environment_or_the_cores(monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.torch_default_threads() == 3
    for cpu, siblings in [
        (0, "0,2"),
        (1, "1,3"),
        (2, "0,2"),
        (3, "1,3"),
    ]:  # 2 cores, 2 threads each
        (tmp_path / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{cpu}" / "topology" / "core_cpus_list").write_text(siblings + "\n")
    (tmp_path / "cpufreq").mkdir()
    assert threads.physical_cores(tmp_path) == 2


@pytest.mark.parametrize("call", ["exact_hessian", "HessianOperator", "hessian_diagonal"])
def test_each_heavy_call_chooses_the_threads(fresh, call):
    model = tiny_model("opt")
    subset = lib.single_layer_single_block(model, "self_attn.q_proj", 0, 2)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    if call == "exact_hessian":
        lib.exact_hessian(model, subset, ids, chunk=1)
    elif call == "HessianOperator":
        lib.HessianOperator(model, subset, ids)
    else:
        name = "model.decoder.layers.0.self_attn.q_proj.weight"
        target = lib.Target(name, tuple(model.get_parameter(name).shape))
        lib.hessian_diagonal(model, [target], ids, hvps=2, chunk=1)
    assert threads.report() == {"n": 1, "why": "load 2.0 on 2 cpus", "processes": 1}
    assert torch.get_num_threads() == 1


def test_the_library_defaults_are_the_scripts_bitwise(tmp_path, monkeypatch):
    """``model_input_bs`` auto resolves by the scripts' rule (made to batch here: no minimum job length), so the
    library's default call equals the script's tensor bitwise for the same settings (chunk, threads)."""
    import single_layer_single_block

    monkeypatch.setattr(autotune, "AUTO_MIN_SECONDS", 0.0)
    before = torch.get_num_threads()
    try:
        meta = single_layer_single_block.run(
            ["--t", "4", "--b", "4", "--seqlen", "16", "--chunk", "2", "--threads", "1"]
            + ["--no_progress", "--output_dir", str(tmp_path), "--name", "h"]
        )
        js = json.loads((tmp_path / meta["files"]["json"]).read_text())
        assert js["model_input_bs_choice"]["chosen"] == 4  # batched: the default is not 1
        model = lib.load_model("embedded")
        subset = lib.single_layer_single_block(model, "self_attn.q_proj", block_index=0, t=4)
        samples = lib.load_samples("embedded", seqlen=16, b=4)
        default = lib.exact_hessian(model, subset, samples, chunk=2).hessian
        given = lib.exact_hessian(model, subset, samples, model_input_bs=4, chunk=2).hessian
    finally:
        torch.set_num_threads(before)
    script = torch.load(tmp_path / meta["files"]["tensor"])
    assert torch.equal(default, script) and torch.equal(given, script)


def test_hessian_diagonal_resolves_auto_as_the_diagonal_script(monkeypatch):
    """The diagonal script's rule counts one product per sample (``Family.products_per_sample``)."""
    seen = []
    monkeypatch.setattr(autotune, "AUTO_MIN_SECONDS", 0.0)
    import lib.hessian.diagonal as diagonal

    real = diagonal.DiagonalJob.__init__

    def spy(self, plans, samples, **kw):
        seen.append(kw["model_input_bs"])
        real(self, plans, samples, **kw)

    monkeypatch.setattr(diagonal.DiagonalJob, "__init__", spy)
    model = tiny_model("opt")
    name = "model.decoder.layers.0.fc1.weight"
    ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(0))
    lib.hessian_diagonal(model, [lib.Target(name, (32, 16))], ids, hvps=2, chunk=1)
    expected, _ = autotune.samples_per_forward("auto", model, 4, 6, 1, torch.device("cpu"))
    assert seen and set(seen) == {expected} and expected == 4  # each phase


def test_hessian_operator_resolves_auto_as_the_spectrum_script(tmp_path):
    """The same rule and the same estimate (``why`` quotes it): n products per sample, as the script counts."""
    import hessian_spectrum

    before = torch.get_num_threads()
    try:
        meta = hessian_spectrum.run(
            ["--t", "6", "--b", "2", "--seqlen", "8", "--top_k", "1", "--threads", "1"]
            + ["--no_progress", "--output_dir", str(tmp_path)]
        )
        model = lib.load_model("embedded")
        subset = lib.single_layer_single_block(model, "self_attn.q_proj", block_index=0, t=6)
        H = lib.HessianOperator(model, subset, lib.load_samples("embedded", seqlen=8, b=2))
    finally:
        torch.set_num_threads(before)
    js = json.loads((tmp_path / meta["files"]["json"]).read_text())["model_input_bs_choice"]
    assert (H.model_input_bs, H.model_input_bs_why) == (js["chosen"], js["why"])


def test_the_chunk_defaults_are_the_scripts(monkeypatch):
    """The scripts' ``--chunk 0`` (measured) is the library's ``None``."""
    import inspect

    from lib.app import cli

    spec = cli.parse("single_layer_single_block", [], "")
    assert spec.compute.chunk == 0
    assert cli.parse("hessian_diagonal", [], "").compute.chunk == 0
    assert inspect.signature(lib.exact_hessian).parameters["chunk"].default is None
    assert inspect.signature(lib.HessianOperator).parameters["chunk"].default is None
    assert inspect.signature(lib.hessian_diagonal).parameters["chunk"].default is None
    for call in (lib.exact_hessian, lib.HessianOperator, lib.hessian_diagonal):
        assert inspect.signature(call).parameters["model_input_bs"].default == "auto"
