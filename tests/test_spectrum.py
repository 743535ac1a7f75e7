"""Hessian spectrum: the one HVP operator, Lanczos / trace / SLQ against dense references, and the script."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import tiny_ids, tiny_model

import hessian_spectrum
import lib
from lib.app import cli
from lib.objective.subsets import params_subset
from lib.spectrum import algorithms as spectrum

F64 = torch.float64


def _dense(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigenvalues) Q^T`` with a seeded random orthogonal ``Q``."""
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(
        torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    )
    return (q * eigenvalues) @ q.T


# ----------------------------------------------------------------------------- pure functions on dense matrices


@pytest.mark.parametrize("which", spectrum.WHICH)
@pytest.mark.parametrize("block_size", [1, 3])
def test_lanczos_equals_eigvalsh_on_a_dense_matrix(which, block_size):
    g = torch.Generator().manual_seed(1)
    h = _dense(
        torch.cat(
            [
                torch.tensor([40.0, 25.0, 24.0, -18.0, -9.0], dtype=F64),
                torch.randn(195, generator=g, dtype=F64),
            ]
        )
    )
    ref = torch.linalg.eigvalsh(h)
    r = spectrum.lanczos(
        lambda v: h @ v, 200, 3, which, block_size, tol=1e-10, max_iter=150, seed=3
    )
    want = {
        "largest": ref[-3:].flip(0),
        "smallest": ref[:3],
        "both": torch.cat([ref[-3:].flip(0), ref[:3]]),
    }[which]
    assert bool(r.converged.all()) and r.passes < 150
    torch.testing.assert_close(r.eigenvalues, want, rtol=0, atol=1e-9 * 40)
    true_res = (h @ r.eigenvectors - r.eigenvectors * r.eigenvalues).norm(dim=0)
    torch.testing.assert_close(r.residuals, true_res, rtol=0, atol=1e-10 * 40)
    torch.testing.assert_close(
        r.eigenvectors.T @ r.eigenvectors, torch.eye(len(want), dtype=F64), rtol=0, atol=1e-10
    )
    assert r.hvps == r.passes * block_size


def test_lanczos_reports_unconverged_pairs_honestly():
    h = _dense(torch.linspace(1, 2, 300, dtype=F64))  # no gap: 5 passes cannot converge
    r = spectrum.lanczos(lambda v: h @ v, 300, 3, tol=1e-10, max_iter=5)
    assert r.passes == 5 and not bool(r.converged.any())
    true_res = (h @ r.eigenvectors - r.eigenvectors * r.eigenvalues).norm(dim=0)
    torch.testing.assert_close(r.residuals, true_res, rtol=1e-8, atol=1e-12)


def test_full_reorthogonalization_leaves_no_ghost_eigenvalues():
    """Many steps past convergence of an outlier: plain Lanczos would repeat it ("ghosts"); here it appears once."""
    ev = torch.cat([torch.tensor([100.0], dtype=F64), torch.linspace(0, 1, 399, dtype=F64)])
    h = _dense(ev, seed=5)
    r = spectrum.lanczos(
        lambda v: h @ v, 400, 3, tol=1e-12, max_iter=120, seed=0
    )  # the bulk keeps it running
    assert r.passes == 120
    assert int((r.ritz_values > 2).sum()) == 1
    assert float(r.ritz_values[-1]) == pytest.approx(100.0, rel=1e-12)


def test_trace_estimators_are_unbiased_over_seeds():
    h = _dense(torch.randn(40, generator=torch.Generator().manual_seed(2), dtype=F64) + 0.5)
    h = h + 0.3 * torch.ones(40, 40, dtype=F64)  # off-diagonal mass, so Hutchinson has variance
    mm, tr = (lambda v: h @ v), float(h.trace())
    for est in (spectrum.hutchinson_trace, spectrum.hutchpp_trace):
        vals = torch.tensor([est(mm, 40, 9, seed=s).estimate for s in range(400)], dtype=F64)
        assert vals.std() > 1e-3  # a random estimator, not the exact trace
        assert abs(float(vals.mean()) - tr) < 4 * float(vals.std()) / math.sqrt(400)
    one = spectrum.hutchinson_trace(mm, 40, 9, seed=0)
    assert one.hvps == 9 and one.passes == 1 and one.stderr > 0


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    h = _dense(1.0 / torch.arange(1, 201, dtype=F64) ** 2)
    mm, tr = (lambda v: h @ v), float(h.trace())
    err = {
        est: sum((est(mm, 200, 30, seed=s).estimate - tr) ** 2 for s in range(100))
        for est in (spectrum.hutchinson_trace, spectrum.hutchpp_trace)
    }
    assert err[spectrum.hutchpp_trace] < 0.1 * err[spectrum.hutchinson_trace]
    assert spectrum.hutchpp_trace(mm, 200, 30).hvps == 30


def test_slq_weights_sum_to_one_and_moments_match_traces():
    ev = torch.cat(
        [
            torch.tensor([12.0, 8.0], dtype=F64),
            torch.randn(148, generator=torch.Generator().manual_seed(4), dtype=F64),
        ]
    )
    h = _dense(ev)
    d = spectrum.slq(lambda v: h @ v, 150, num_probes=16, steps=12, seed=5, grid_points=2000)
    torch.testing.assert_close(
        torch.nansum(d.ritz_weights, 1), torch.ones(16, dtype=F64), rtol=0, atol=1e-12
    )
    assert d.passes == 12 and d.hvps == 16 * 12
    for m in range(3):
        est, se = d.moment(m)
        exact = float((ev**m).mean())
        assert abs(est - exact) <= max(4 * se, 1e-12), (m, est, exact, se)
    assert abs(float(torch.trapezoid(d.values, d.grid)) - 1) < 1e-3
    assert float(d.ritz_values[:, -1].max()) == pytest.approx(
        12.0, rel=1e-8
    )  # the outlier is found by every probe


def test_slq_breakdown_on_few_distinct_eigenvalues_is_exact():
    ev = torch.tensor([3.0, 3.0, 1.0, 1.0, 1.0, -2.0] * 5, dtype=F64)
    h = _dense(ev)
    d = spectrum.slq(lambda v: h @ v, 30, num_probes=3, steps=10, seed=0)
    assert d.passes == 3  # three distinct eigenvalues: invariant after 3 steps
    torch.testing.assert_close(
        torch.nansum(d.ritz_weights * d.ritz_values**2, 1).mean(), (ev**2).mean(), rtol=0.5, atol=0
    )


# ----------------------------------------------------------------------------- the operator on tiny float64 models

PARAM = {
    "gpt2": "transformer.h.0.attn.c_proj.weight",
    "opt": "model.decoder.layers.0.self_attn.q_proj.weight",
    "llama": "model.layers.0.self_attn.k_proj.weight",
}


def test_operator_eigenvalues_equal_eigvalsh(arch):
    model, ids = tiny_model(arch), tiny_ids(2, 8)
    subset = params_subset(model, [PARAM[arch]])
    h = lib.exact_hessian(model, subset, ids).hessian
    op = lib.HessianOperator(model, subset, ids, keep_graphs=False)
    v = torch.randn(subset.size, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    tol = 1e-8 if arch == "gpt2" else 1e-6  # OPT and Llama run their attention softmax in float32
    hv = h @ v
    torch.testing.assert_close(op @ v, hv, rtol=0, atol=tol * float(hv.abs().max()))
    ref = torch.linalg.eigvalsh(h)
    norm = float(ref.abs().max())
    r = spectrum.lanczos(op.matmat, subset.size, 3, "both", tol=1e-9, max_iter=subset.size, seed=1)
    torch.testing.assert_close(
        r.eigenvalues, torch.cat([ref[-3:].flip(0), ref[:3]]), rtol=0, atol=tol * norm
    )
    true_res = (h @ r.eigenvectors - r.eigenvectors * r.eigenvalues).norm(dim=0)
    torch.testing.assert_close(r.residuals, true_res, rtol=0, atol=tol * norm)
    assert op.passes == r.passes + 1 and op.hvps == r.hvps + 2
    for mode in (True, "auto"):  # the second product reuses the graphs: bitwise the same products
        kept = lib.HessianOperator(model, subset, ids, keep_graphs=mode)
        for _ in range(2):
            assert torch.equal(kept @ v, op @ v)
        assert len(kept.graphs.graphs) == 2 and kept.report()["keep_graphs"]["kept"]
    assert op.report()["keep_graphs"]["kept"] is False and not op.graphs.graphs


def test_keep_graphs_decision_on_numbers():
    """auto keeps the graphs when the ones still to build fit in the fraction of the free memory; on/off force it."""
    from lib.products.operator import keep_all_graphs

    assert keep_all_graphs("auto", 5, 100, 1600, fraction=0.25)  # 4 more x 100 <= 400
    assert not keep_all_graphs("auto", 6, 100, 1600, fraction=0.25)  # 500 > 400
    assert keep_all_graphs("auto", 1, 10**12, 0)  # the one graph is built already
    assert keep_all_graphs(True, 10**6, 10**12, 0) and not keep_all_graphs(False, 1, 0, 10**12)
    with pytest.raises(ValueError):
        keep_all_graphs("yes", 1, 0, 0)


def test_graph_bytes_count_saved_storages_once():
    """The CPU measurement sums the unique storages a graph saves (a parameter's excluded), plus the outputs."""
    from lib.products.operator import graph_bytes_measured

    w = torch.randn(50, 40, dtype=F64)
    x = torch.randn(40, dtype=F64, requires_grad=True)

    def build():
        y = (w @ x).exp()
        return (y * y).sum()

    out, nbytes = graph_bytes_measured(build, torch.device("cpu"), {w.untyped_storage().data_ptr()})
    # saved: w by mv (excluded), y by exp and twice by mul (once: 50 float64); output: the scalar sum
    assert nbytes == (50 + 1) * 8 and out.requires_grad
    assert graph_bytes_measured(build, torch.device("cpu"), set())[1] == (50 * 40 + 50 + 1) * 8


def test_operator_block_products_measure_the_chunk():
    """A block of >= TUNE_MIN_PRODUCTS vectors measures the chunk (recorded); the products stay those of chunk 1."""
    from lib.products.operator import TUNE_MIN_PRODUCTS

    model, ids = tiny_model("gpt2"), tiny_ids(2, 8)
    subset = params_subset(model, [PARAM["gpt2"]])
    v = torch.randn(
        subset.size, TUNE_MIN_PRODUCTS + 2, generator=torch.Generator().manual_seed(2), dtype=F64
    )
    auto, one = (
        lib.HessianOperator(model, subset, ids),
        lib.HessianOperator(model, subset, ids, chunk=1),
    )
    torch.testing.assert_close(auto @ v, one @ v, rtol=1e-12, atol=1e-14)
    measured = auto.report()["chunk"]["measured"][str(subset.size)]
    assert measured["measured_columns"] >= 3 and measured["chunk"] >= 1
    assert one.report()["chunk"] == {"chunk": 1, "measured": False}


def test_operator_views_and_params_equal_paper_flags():
    """``--params`` (the whole weight) restricted to row 0's first 16 entries is the paper subset's operator."""
    model, ids = tiny_model("opt"), tiny_ids(2, 8)
    whole = lib.HessianOperator(model, params_subset(model, [PARAM["opt"]]), ids)
    row = lib.HessianOperator(
        model, lib.single_layer_single_block(model, "self_attn.q_proj", 0, 16), ids
    )
    v = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    padded = torch.zeros(whole.shape[0], 3, dtype=F64)
    padded[:16] = v  # q_proj is nn.Linear: row 0's first 16 weights are flat entries 0..15
    torch.testing.assert_close((whole @ padded)[:16], row @ v, rtol=1e-10, atol=1e-14)
    sp = row.to_scipy()
    torch.testing.assert_close(
        torch.from_numpy(sp @ v[:, 0].numpy()), row.matvec(v[:, 0]), rtol=0, atol=0
    )


def test_params_glob_matching_nothing_is_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(hessian_spectrum.run, ["--params", "model.nope.*", "--output_dir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matches no parameter" in err[0] and "model.decoder" in err[0]


# ----------------------------------------------------------------------------- the script (embedded model, float64)

ARGS = [
    "--seqlen",
    "16",
    "--b",
    "2",
    "--dtype",
    "float64",
    "--no_progress",
    "--name",
    "s",
    "--t",
    "32",
    "--top_k",
    "2",
    "--tol",
    "1e-9",
    "--seed",
    "1",
]
UNTIL_INVARIANT = [
    *ARGS,
    "--exact_below",
    "0",
    "--tol",
    "1e-15",
    "--max_iter",
    "32",
    "--seqlen",
    "24",
]
"""Lanczos that runs until an invariant subspace (the kill-and-resume tests)."""


def _pt(tmp, *extra) -> tuple[dict, dict]:
    hessian_spectrum.run([*ARGS, "--output_dir", str(tmp), *extra])
    return torch.load(tmp / "s.pt"), json.loads((tmp / "s.json").read_text())


@pytest.mark.slow
def test_script_exact_and_iterative_paths_agree(tmp_path):
    exact, je = _pt(tmp_path / "e", "--which", "both", "--density")
    it, ji = _pt(
        tmp_path / "i",
        "--which",
        "both",
        "--exact_below",
        "0",
        "--max_iter",
        "32",
        "--trace",
        "--density",
        "--lanczos_steps",
        "8",
        "--slq_probes",
        "2",
    )
    assert je["path"] == "exact" and ji["path"] == "iterative"
    norm = float(exact["all_eigenvalues"].abs().max())
    torch.testing.assert_close(
        it["eigenvalues"], exact["eigenvalues"], rtol=0, atol=1e-6 * norm
    )  # OPT: float32 attention softmax
    assert all(ji["converged"]) and len(ji["residuals"]) == 4
    assert set(ji["trace"]) == {"hutchinson", "hutch++"} and {"estimate", "stderr", "hvps"} <= set(
        ji["trace"]["hutchinson"]
    )
    assert (
        abs(ji["trace"]["hutch++"]["estimate"] - je["trace"]["exact"])
        < 5 * ji["trace"]["hutch++"]["stderr"] + 1e-12
    )
    assert {"grid", "values", "ritz_values", "ritz_weights"} <= set(ji["density"])
    assert ji["passes"] == ji["lanczos"]["passes"] + 3 + 8 and ji["figures"]


@pytest.mark.slow
def test_script_resume_is_bitwise_and_two_workers_equal_one(tmp_path):
    """A run stopped after its first pass (computed by 2 worker processes) and resumed in one process equals
    the uninterrupted one-process run bit for bit: the recorded pass is replayed, the rest computed."""
    run = [
        "--exact_below",
        "0",
        "--max_iter",
        "10",
        "--density",
        "--lanczos_steps",
        "3",
        "--slq_probes",
        "2",
    ]
    full, _ = _pt(tmp_path / "full", *run, "--keep_graphs", "on")
    # a run stopped after 1 pass leaves its pass log (kept here by --keep_checkpoint)
    _pt(
        tmp_path / "cut",
        "--exact_below",
        "0",
        "--max_iter",
        "1",
        "--keep_checkpoint",
        "--devices",
        "cpu,cpu",
    )
    assert len(list((tmp_path / "cut" / "s.passes").glob("pass_*.pt"))) == 1
    resumed, jr = _pt(tmp_path / "cut", *run, "--resume", "--overwrite")
    assert (
        jr["replayed_passes"] == 1
        and jr["passes"] == 13
        and not (tmp_path / "cut" / "s.passes").exists()
    )
    assert (
        jr["keep_graphs"]["kept"] and jr["keep_graphs"]["graph_bytes"] > 0
    )  # auto: the 2 tiny graphs fit
    assert set(full) == set(resumed)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    # all 13 passes on one pool of 2 workers (spawned once, models kept): bitwise the one-process run
    two, j2 = _pt(
        tmp_path / "two",
        "--exact_below",
        "0",
        "--max_iter",
        "10",
        "--density",
        "--lanczos_steps",
        "3",
        "--slq_probes",
        "2",
        "--devices",
        "cpu,cpu",
    )
    assert j2["workers"] == {"spawned": 2, "passes_run": 13} and jr["workers"] == {
        "spawned": 0,
        "passes_run": 0,
    }
    assert set(two) == set(full) and all(torch.equal(full[k], two[k]) for k in full)
    with pytest.raises(lib.UserError, match="--resume"):  # an old pass log is never silently reused
        _pt(
            tmp_path / "cut",
            "--exact_below",
            "0",
            "--max_iter",
            "2",
            "--keep_checkpoint",
            "--overwrite",
        )
        _pt(tmp_path / "cut", "--exact_below", "0", "--max_iter", "2", "--overwrite")


@pytest.mark.slow
def test_script_killed_mid_lanczos_resumes_bitwise(tmp_path):
    """SIGKILL while Lanczos runs (after its 4th pass is recorded), then --resume: bitwise the uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT, subprocess_env

    flags = UNTIL_INVARIANT
    full, jf = _pt(tmp_path / "full", *flags)
    env = subprocess_env()
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "hessian_spectrum.py"), *flags, "--output_dir", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while (
        not (out / "s.passes" / "pass_00004.pt").exists()
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "s.pt").exists(), (
        "the run finished before it could be killed"
    )
    resumed, j = _pt(out, *flags, "--resume")
    assert j["replayed_passes"] >= 4 and j["passes"] == jf["passes"] > j["replayed_passes"]
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_script_keeps_the_output_guarantees(tmp_path, monkeypatch):
    """Like the other scripts: a finished result is not replaced without --overwrite (refused before the model
    is loaded), the JSON carries the input fingerprints, and the seed (random start vectors and probes) is
    part of the default name."""
    from lib.app import pipeline
    from lib.app.spectrum_family import FAMILY

    _, js = _pt(tmp_path, "--max_iter", "4")
    assert (
        set(js["fingerprints"]) == {"model", "model_config", "code", "tokenizer"}
        and len(js["tensor_sha256"]) == 64
    )
    monkeypatch.setattr(
        pipeline,
        "load_model",
        lambda *a, **k: (_ for _ in ()).throw(AssertionError("the model was loaded")),
    )
    with pytest.raises(lib.UserError, match="holds a finished result; pass --overwrite"):
        _pt(tmp_path, "--max_iter", "4")
    names = set()
    for seed in ("1", "2"):
        names.add(FAMILY.default_name(hessian_spectrum.command.spec(["--seed", seed])))
    assert len(names) == 2


def _state(pid: int) -> str | None:
    """The process state letter of ``pid`` (``"Z"``: a zombie), ``None`` when there is no such process (Linux ``/proc``)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _children(pid: int) -> set[int]:
    """Pids of the live processes whose parent is ``pid``."""
    from pathlib import Path

    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


@pytest.mark.slow
def test_script_interrupted_during_pooled_passes_stops_every_worker(tmp_path):
    """SIGTERM while a --devices cpu,cpu run is between or inside its passes: exit 143 in one line, and the pool's
    worker processes (spawned once, alive across passes) are all gone."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT, subprocess_env

    env = subprocess_env()
    out = tmp_path / "run"
    flags = [*UNTIL_INVARIANT, "--devices", "cpu,cpu"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "hessian_spectrum.py"), *flags, "--output_dir", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while (
            not (out / "s.passes" / "pass_00002.pt").exists()
            and proc.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        workers = _children(proc.pid)
        assert proc.poll() is None and len(workers) >= 2, (
            "the run finished before it could be interrupted"
        )
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted by SIGTERM"), err
    assert re.search(  # inside a pass, or between two (the algorithms' arithmetic, a pass file being written)
        r"\((pass \d+|between passes)\); the \d+ finished pass(es before it are| before it is|es are| is) saved in",
        last,
    ), err
    deadline = time.monotonic() + 10
    while [p for p in workers if _state(p) not in (None, "Z")] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if _state(p) not in (None, "Z")], (
        f"worker processes left behind: {workers}"
    )
