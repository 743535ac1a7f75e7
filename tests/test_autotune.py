"""Chunk by measurement (lib.products.autotune): the choice on synthetic timers, and that auto equals chunk 1."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_ids, tiny_model

from lib.hessian.diagonal import DiagonalJob, Target, plan_phase1
from lib.hessian.exact import ExactHessianJob
from lib.objective import subsets
from lib.products.autotune import candidates, tune_chunk
from lib.runtime.jobs import run_serial


class FakeDevice:
    """``compute`` that costs ``cost(chunk)`` seconds per column on an injected clock and records its columns."""

    def __init__(self, cost, shrink_above: int | None = None):
        self.now, self.cost, self.shrink_above, self.calls = 0.0, cost, shrink_above, []

    def clock(self) -> float:
        return self.now

    def compute(self, start: int, stop: int, chunk: int) -> int:
        if self.shrink_above is not None and chunk > self.shrink_above:
            chunk = self.shrink_above  # as after a CUDA out-of-memory halving
        self.calls.append((start, stop, chunk))
        self.now += self.cost(chunk) * (stop - start)
        return chunk


def test_candidates_are_powers_of_two_up_to_the_limit():
    assert candidates(0) == [1] and candidates(1) == [1] and candidates(20) == [1, 2, 4, 8, 16]


COST = {1: 1.0, 2: 1.1, 4: 0.5, 8: 0.3, 16: 0.32, 32: 0.4, 64: 0.5, 128: 0.2}
"""Seconds per column: slower at 2 (batching overhead), fastest at 8, slower from 16 on (then 128, never reached)."""


def test_goes_past_a_slower_candidate_and_stops_on_the_time_budget():
    dev = FakeDevice(COST.get)
    t = tune_chunk(dev.compute, 400, 1024, clock=dev.clock)
    assert t.chunk == 8 and sorted(t.seconds_per_column) == [1, 2, 4, 8, 16]
    assert t.seconds_per_column[2] == pytest.approx(1.1)
    # consecutive columns from 0, each computed once (3 calls per candidate up to 8); the caller continues at t.done
    assert [(a, b) for a, b, _ in dev.calls] == [
        (0, 1),
        (1, 2),
        (2, 3),
        (3, 5),
        (5, 7),
        (7, 9),
        (9, 13),
        (13, 17),
        (17, 21),
        (21, 29),
        (29, 37),
        (37, 45),
        (45, 61),
    ]
    assert t.done == 61


def test_a_longer_run_affords_more_candidates_until_two_are_slower():
    dev = FakeDevice(COST.get)
    t = tune_chunk(dev.compute, 400, 1024, total=4000, clock=dev.clock)
    assert t.chunk == 8 and sorted(t.seconds_per_column) == [
        1,
        2,
        4,
        8,
        16,
        32,
        64,
    ]  # 32 and 64 both > 1.15x: stop


def test_the_fastest_per_call_counts_and_the_clock_is_injected():
    slow_first = iter(
        [5.0] + [1.0] * 100
    )  # one slow call (load, a one-time cost) does not disqualify chunk 1
    dev = FakeDevice(lambda c: next(slow_first) if c == 1 else 1.5)
    t = tune_chunk(dev.compute, 400, 1024, clock=dev.clock)
    assert (
        t.chunk == 1
        and t.seconds_per_column[1] == 1.0
        and sorted(t.seconds_per_column) == [1, 2, 4]
    )


def test_a_larger_chunk_must_be_more_than_a_few_percent_faster():
    """Within 5 % of the fastest, the smallest chunk wins (less memory; such differences are timing noise)."""
    dev = FakeDevice({1: 1.0, 2: 0.99, 4: 0.97, 8: 1.2, 16: 1.3}.get)
    assert tune_chunk(dev.compute, 400, 1024, clock=dev.clock).chunk == 1
    dev = FakeDevice({1: 1.0, 2: 0.99, 4: 0.9, 8: 1.2, 16: 1.3}.get)
    assert tune_chunk(dev.compute, 400, 1024, clock=dev.clock).chunk == 4
    dev = FakeDevice({1: 1.0, 2: 0.99, 4: 0.97, 8: 1.2, 16: 1.3}.get)
    assert tune_chunk(dev.compute, 400, 1024, clock=dev.clock, margin=0.0).chunk == 4


def test_respects_the_limit_and_the_columns_available():
    dev = FakeDevice(lambda c: 1.0 / c)
    assert tune_chunk(dev.compute, 1000, 8, clock=dev.clock).chunk == 8  # memory bound
    dev = FakeDevice(lambda c: 1.0 / c)
    t = tune_chunk(dev.compute, 40, 1024, clock=dev.clock)
    assert (t.chunk, t.done) == (
        8,
        29,
    )  # 8 measured once (three calls do not fit), 16 does not fit at all
    dev = FakeDevice(lambda c: 1.0)
    t = tune_chunk(dev.compute, 3, 1024, clock=dev.clock)
    assert (t.chunk, t.done) == (1, 3)


def test_stops_when_the_computation_had_to_shrink_its_chunk():
    dev = FakeDevice(lambda c: 1.0 / c, shrink_above=4)
    t = tune_chunk(dev.compute, 1000, 1024, clock=dev.clock)
    assert max(t.seconds_per_column) == 8 and dev.calls[-1][2] == 4 and len(dev.calls) == 10


def test_auto_chunk_equals_chunk_one_on_a_tiny_model():
    model = tiny_model("opt")
    subset = subsets.random_subset(model, ["model.decoder.layers.0.fc1.weight"], 40, seed=0)
    ids = tiny_ids(b=2)
    auto = ExactHessianJob(subset, ids, model=model)
    one = ExactHessianJob(subset, ids, model=model, chunk=1)
    h_auto, h_one = (
        run_serial(auto, torch.device("cpu"))["hessian_sum"],
        run_serial(one, torch.device("cpu"))["hessian_sum"],
    )
    measured = auto.chunk_report()["measured"]
    assert measured["measured_columns"] >= 4 and len(measured["seconds_per_column"]) >= 2
    assert float((h_auto - h_one).abs().max() / h_one.abs().max()) < 1e-13


def test_auto_probe_batch_equals_probe_batch_one():
    model = tiny_model("llama")
    name = "model.layers.0.mlp.up_proj.weight"
    plans = plan_phase1(
        [Target(name, tuple(model.get_parameter(name).shape))], ("hutchinson",), 24, seed=0
    )
    auto = DiagonalJob(plans, tiny_ids(), model=model)
    one = DiagonalJob(plans, tiny_ids(), model=model, chunk=1)
    a, b = run_serial(auto, torch.device("cpu")), run_serial(one, torch.device("cpu"))
    assert auto.chunk_report()["measured"]["512"]["measured_columns"] >= 4
    assert torch.allclose(a[f"{name}|zhz"], b[f"{name}|zhz"], rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_the_scripts_record_the_measured_chunk_in_their_json(tmp_path):
    import json

    import hessian_diagonal
    import single_layer_single_block

    fast = ["--seqlen", "16", "--b", "2", "--no_progress", "--output_dir", str(tmp_path)]
    meta = single_layer_single_block.run(["--t", "24", "--name", "h", *fast])
    chunk = json.loads((tmp_path / "h.json").read_text())["chunk"]
    assert (
        chunk == meta["chunk"]
        and chunk["chunk"] == "auto"
        and chunk["measured"]["chunk"] in (1, 2, 4, 8)
    )
    assert sum(1 for _ in chunk["measured"]["seconds_per_column"]) >= 2
    assert single_layer_single_block.run(["--t", "24", "--name", "g", "--chunk", "3", *fast])[
        "chunk"
    ] == {"chunk": 3, "measured": False}
    meta = hessian_diagonal.run(["--hvps", "32", "--layer_name", "fc2", "--name", "d", *fast])
    measured = meta["chunk"]["1"]["measured"]
    assert list(measured) == ["65536"] and measured["65536"]["measured_columns"] >= 4


def test_hvp_products_covers_the_range_and_halves_on_out_of_memory(monkeypatch):
    """The one out-of-memory policy (lib.products.operator.hvp_products): a chunk that does not fit is halved and
    redone; ``start`` continues a block; a chunk of 1 that does not fit is raised."""
    from lib.products import operator

    done = []

    def fake_rows(g, x, v):
        if v.shape[0] > 3:
            raise torch.OutOfMemoryError("fake")
        return 2 * v

    monkeypatch.setattr(operator, "hvp_rows", fake_rows)
    x = torch.zeros(5, dtype=torch.float64)
    rows = lambda a, b: torch.arange(a, b, dtype=torch.float64)[:, None].expand(b - a, 5)  # noqa: E731
    sink = lambda a, v, hv: done.append((a, a + len(v), bool(torch.equal(hv, 2 * v))))  # noqa: E731
    assert operator.hvp_products(None, x, rows, 13, sink, 8, start=2) == 2  # 8 -> 4 -> 2 fits
    assert done == [
        (2, 4, True),
        (4, 6, True),
        (6, 8, True),
        (8, 10, True),
        (10, 12, True),
        (12, 13, True),
    ]
    monkeypatch.setattr(
        operator, "hvp_rows", lambda g, x, v: (_ for _ in ()).throw(torch.OutOfMemoryError("fake"))
    )
    with pytest.raises(torch.OutOfMemoryError):
        operator.hvp_products(None, x, rows, 4, sink, 1)


def test_model_input_bs_auto_rule():
    """Auto batches samples only for long jobs, up to the activation budget, dividing b; deterministic; given values pass."""
    from conftest import tiny_model

    from lib.products.autotune import AUTO_ELEMENTS, samples_per_forward

    model = tiny_model("opt", torch.float32)  # hidden 16, ~10k parameters
    cpu = torch.device("cpu")
    assert samples_per_forward(3, model, 12, 8, 10, cpu) == (3, "given")
    bs, why = samples_per_forward("auto", model, 12, 8, 10, cpu)
    assert bs == 1 and "short job" in why
    long_job = dict(products=10**6, device=cpu)
    bs, why = samples_per_forward("auto", model, 12, 128, **long_job)
    assert (
        bs == 12 and bs * 128 * 16 <= AUTO_ELEMENTS["cpu"] and "dividing b=12" in why
    )  # 12 * 128 * 16 = 24576
    assert (
        samples_per_forward("auto", model, 12, 1024, **long_job)[0] == 4
    )  # 4 * 1024 * 16 = 65536; 6 would exceed
    assert samples_per_forward("auto", model, 7, 1024, **long_job)[0] == 1  # 7 is prime
    # on a GPU (the rule reads only the device type): the report's 2048-token OPT-125M samples one at a time (one
    # filled an H200), its 128-token ones 16 at a time
    from transformers import OPTConfig, OPTForCausalLM

    with torch.device("meta"):
        opt125m = OPTForCausalLM(OPTConfig())
    gpu = dict(products=768, device=torch.device("cuda"))
    assert samples_per_forward("auto", opt125m, 140, 2048, **gpu)[0] == 1
    assert samples_per_forward("auto", opt125m, 16, 128, **gpu)[0] == 16
    assert (
        samples_per_forward("auto", model, 12, 8192, **long_job)[0] == 1
    )  # one sample is over the budget: still 1
    assert samples_per_forward("auto", model, 12, 128, per_sample_units=True, **long_job)[0] == 1
    assert samples_per_forward("auto", model, 12, 128, **long_job) == samples_per_forward(
        "auto", model, 12, 128, **long_job
    )


def test_model_input_bs_auto_in_the_scripts(tmp_path, capsys):
    import json

    import single_layer_single_block
    from lib.app import cli

    fast = [
        "--t",
        "2",
        "--seqlen",
        "16",
        "--b",
        "2",
        "--no_progress",
        "--output_dir",
        str(tmp_path),
    ]
    meta = single_layer_single_block.run([*fast, "--name", "a"])
    js = json.loads((tmp_path / "a.json").read_text())
    assert (
        js["model_input_bs_choice"]["chosen"] == 1
        and js["model_input_bs_choice"]["requested"] == "auto"
    )
    assert (
        "short job" in js["model_input_bs_choice"]["why"]
        and meta["model_input_bs_choice"]["chosen"] == 1
    )
    assert (
        js["config"]["data"]["model_input_bs"] == "auto"
    )  # the config rebuilds the run; the value used: above
    meta = single_layer_single_block.run([*fast, "--name", "b", "--model_input_bs", "2"])
    assert meta["model_input_bs_choice"] == {"requested": 2, "chosen": 2, "why": "given"}
    with pytest.raises(SystemExit) as exc:
        cli.main(single_layer_single_block.run, [*fast, "--model_input_bs", "many"])
    assert (
        exc.value.code == 2
        and "invalid value 'many': give auto or a number of samples" in capsys.readouterr().err
    )
