"""Issue 25: ranks that disagree, flags at their extremes, a full cache disk, the spectrum's pass log in the disk
pre-flight and in the interrupt message, orphaned workers during start-up, and the unclear cases."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import ROOT, subprocess_env, torchrun

import single_layer_single_block
from lib.app import cli
from lib.commands import COMMANDS
from lib.runtime import ranks

FAST = ["--t", "2", "--seqlen", "16", "--b", "2", "--no_progress", "--dataset", "embedded"]


def _fail(argv, capsys, script=single_layer_single_block, code: int = 2) -> list[str]:
    """Run a script in this process, expect exit status ``code``; return its stderr lines."""
    with pytest.raises(SystemExit) as exc:
        cli.main(script.run, argv)
    assert exc.value.code == code
    return capsys.readouterr().err.strip().splitlines()


# ----------------------------------------------------------------------------- 1: ranks agree at start-up


@pytest.fixture
def copied_model(tmp_path):
    """A copy of the embedded model in another directory (same weights, another --model)."""
    from lib.model.models import EMBEDDED_MODEL_DIR

    path = tmp_path / "copy"
    shutil.copytree(EMBEDDED_MODEL_DIR, path)
    return path


@pytest.mark.parametrize(
    "script, base, change, field",
    [
        ("single_layer_single_block", FAST, ["--b", "4"], "--b"),
        (
            "single_layer_single_block",
            FAST,
            ["--layer_name", "self_attn.k_proj"],
            "--layer_name",
        ),
        (
            "hessian_spectrum",
            [*FAST, "--hvp", "finite_difference"],
            ["--fd_step", "1e-3"],
            "--fd_step",
        ),
        ("single_layer_single_block", FAST, ["--model", "MODEL_COPY"], "--model"),
    ],
)
def test_ranks_with_different_flags_are_named_in_one_line(
    script, base, change, field, copied_model
):
    change = [str(copied_model) if a == "MODEL_COPY" else a for a in change]
    command = COMMANDS[script]
    rank0 = ranks.identity(command.spec(base))
    rank1 = ranks.identity(command.spec([*base, *change]))
    assert ranks.first_difference([rank0, rank0]) is None
    message = ranks.first_difference([rank0, rank1])
    assert message is not None and f"{field} is " in message and "on rank 1" in message, message
    assert "\n" not in message


def test_ranks_that_disagree_refuse_before_a_weight_loads(
    monkeypatch, capsys, no_model_load, tmp_path
):
    """The pipeline gathers every rank's identity after reading the config, tokenizer and text, before the weights:
    a rank with another --b stops both ranks (exit 2), rank 0 prints the one line, rank 1 nothing."""
    from lib.runtime import parallel

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(parallel, "init_process_group", lambda device: False)
    other = {}

    def gather(ident):
        other.update(ident, **{"--b": 4})
        return [ident, other]

    monkeypatch.setattr(ranks, "_all_gather", gather)
    out = ["--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    lines = _fail([*FAST, *out], capsys)
    assert len(lines) == 1 and "--b is 4 on rank 1 but 2 on rank 0" in lines[0], lines
    assert "dataset text" in other and "model config" in other and "tokenizer" in other
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(
        ranks, "_all_gather", lambda ident: [{**ident, "--b": 4}, ident]
    )  # rank 1's view
    assert _fail([*FAST, *out], capsys) == []
    assert not list((tmp_path / "out").glob("*.json"))


WRAP = """
import os, sys
sys.path.insert(0, {root!r})
from lib.app import cli
from lib.commands import COMMANDS
argv = sys.argv[1:]
cut = argv.index("--rank1")
argv = argv[:cut] + (argv[cut + 1:] if os.environ["RANK"] == "1" else [])
cli.main(COMMANDS[{script!r}].run, argv)
"""


@pytest.mark.slow
def test_two_gloo_ranks_started_with_different_flags_refuse_in_one_line(tmp_path):
    wrap = tmp_path / "wrap.py"
    wrap.write_text(WRAP.format(root=str(ROOT), script="single_layer_single_block"))
    out = tmp_path / "out"
    proc = torchrun(
        wrap,
        *FAST,
        "--device",
        "cpu",
        "--output_dir",
        str(out),
        "--rank1",
        "--layer_name",
        "self_attn.k_proj",
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--layer_name is 'self_attn.k_proj' on rank 1" in errors[0], (
        proc.stderr[-3000:]
    )
    assert (
        "Traceback" not in proc.stderr.split("torch/distributed/elastic")[0]
    )  # only torchrun's own
    assert not list(out.glob("*.json"))


# ----------------------------------------------------------------------------- 3: flags at their extremes


@pytest.mark.parametrize(
    "script, extra",
    [
        ("single_layer_single_block", ["--fd_step", "1e40"]),
        ("hessian_diagonal", ["--fd_step", "1e40", "--layer_name", "self_attn.q_proj"]),
        ("hessian_spectrum", ["--fd_richardson", "--fd_step", "1e300"]),
        ("hessian_spectrum", ["--fd_step", "1.5"]),
    ],
)
def test_a_huge_finite_difference_step_is_one_line(script, extra, tmp_path, capsys, no_model_load):
    from lib.products.finite_difference import MAX_RELATIVE_STEP

    argv = ["--dataset", "embedded", "--b", "2", "--seqlen", "16", "--dtype", "float32"]
    argv += ["--hvp", "finite_difference", "--no_progress", "--output_dir", str(tmp_path)]
    lines = _fail([*argv, *extra], capsys, COMMANDS[script])
    assert len(lines) == 1 and lines[0].startswith("error: --fd_step: finite-difference step")
    assert f"is not below {MAX_RELATIVE_STEP:g}" in lines[0]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tol", "inf"], "error: --tol must be a number above 0 and below 1, got inf"),
        (["--tol", "nan"], "error: --tol must be a number above 0 and below 1, got nan"),
        (["--tol", "0"], "error: --tol must be a number above 0 and below 1, got 0.0"),
        (
            ["--density", "--density_points", "10000000000"],
            "error: --density_points must be at most 100,000, got 10,000,000,000",
        ),
    ],
)
def test_spectrum_bounds_are_one_line_before_any_work(extra, message, tmp_path, capsys):
    from lib.commands import hessian_spectrum

    argv = [*FAST, "--output_dir", str(tmp_path), *extra]
    assert _fail(argv, capsys, hessian_spectrum) == [message]
    assert not any(tmp_path.iterdir())


def test_broadened_density_in_blocks_equals_the_whole_matrix(monkeypatch):
    from lib.spectrum import algorithms as spectrum

    g = torch.Generator().manual_seed(0)
    theta = torch.randn(3, 7, dtype=torch.float64, generator=g)
    theta[1, 5:] = float("nan")  # a probe that stopped early
    weights = torch.rand(3, 7, dtype=torch.float64, generator=g)
    grid = torch.linspace(-3, 3, 101, dtype=torch.float64)
    whole = spectrum.broadened_density(theta, weights, grid, 0.3)
    monkeypatch.setattr(spectrum, "DENSITY_BLOCK", 40)  # 2 grid points per block
    torch.testing.assert_close(
        spectrum.broadened_density(theta, weights, grid, 0.3), whole, rtol=1e-15, atol=0
    )
    direct = sum(
        weights[i, j] * torch.exp(-0.5 * ((grid - theta[i, j]) / 0.3) ** 2)
        for i in range(3)
        for j in range(7)
        if theta[i, j] == theta[i, j]
    ) / (0.3 * (2 * torch.pi) ** 0.5 * 3)
    torch.testing.assert_close(whole, direct, rtol=1e-12, atol=0)


@pytest.mark.parametrize("requested", [100000, 10**20])
def test_threads_beyond_the_cpus_are_capped_with_a_note(requested, monkeypatch, capsys):
    from lib.runtime import threads

    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_CHOICE", None)
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 2)
    try:
        choice = threads.apply(requested)
        assert choice.n == 2 and torch.get_num_threads() == 2
        assert choice.why == f"--threads {requested} capped to the 2 CPUs"
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"warning: --threads {requested} is more than the 2 CPUs this process may run on: using 2 threads"
        ]
        assert threads.apply(2).why == "--threads" and not capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- 4: a full cache disk


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(
            "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
            "data/0: file write failed"
        ),
        OSError(28, "No space left on device"),
    ],
)
def test_a_full_cache_disk_is_one_warning_and_the_run_goes_on(error, tmp_path, monkeypatch, capsys):
    from lib.model import data

    tok, text = data.load_tokenizer("embedded"), data.EMBEDDED_TEXT.read_text()[:2000]
    expected = data.tokenize(tok, text)

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "save", full)
    assert torch.equal(data.tokenize(tok, text, str(tmp_path)), expected)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"warning: could not write the tokenized-text cache in --cache_dir {tmp_path} ("
    ), err
    assert err[0].endswith("); going on without it")
    assert not list((tmp_path / "tokenized").iterdir())  # no partial file left


# ----------------------------------------------------------------------------- 5: the pass log in the disk pre-flight


def test_checkpoint_every_0_keeps_the_spectrum_disk_preflight_for_the_pass_log(
    tmp_path, monkeypatch, capsys
):
    from lib.app import preflight
    from lib.commands import hessian_spectrum

    monkeypatch.setattr(preflight, "free_disk_bytes", lambda path: 100)
    argv = [*FAST, "--t", "8", "--top_k", "1", "--exact_below", "0", "--max_iter", "3"]
    argv += ["--checkpoint_every", "0"]
    lines = _fail([*argv, "--output_dir", str(tmp_path), "--name", "s"], capsys, hessian_spectrum)
    assert (
        len(lines) == 1 and "of disk for checkpoints" in lines[0] and "(0.1 kB free in" in lines[0]
    )
    assert lines[0].startswith("error: this run needs up to ") and "pass log" in lines[0]
    assert not (tmp_path / "s.passes").exists()


# ----------------------------------------------------------------------------- 6: the interrupt counts the passes kept


@pytest.mark.parametrize("failure", ["interrupt", "error"])
def test_a_pass_stopped_after_three_counts_the_passes_kept(failure, tmp_path):
    from lib.errors import Interrupted, RunError
    from lib.runtime.passlog import PassLog

    def run_pass(v, i):
        if i == 3:
            if failure == "interrupt":
                raise Interrupted(15, "interrupted by SIGTERM; no unit was finished")
            raise RunError("worker 1 (cpu) was killed by SIGKILL (out of memory?) while setting up")
        return 2 * v

    log = PassLog(tmp_path / "s.passes", {"x": 1}, False, run_pass)
    v = torch.ones(4, 1, dtype=torch.float64)
    for _ in range(3):
        log(v)
    with pytest.raises((Interrupted, RunError)) as exc:
        log(v)
    message = exc.value.message if failure == "interrupt" else str(exc.value)
    assert message.startswith(
        "interrupted by SIGTERM; no unit was finished (pass 4)"
        if failure == "interrupt"
        else "worker 1 (cpu) was killed"
    )
    assert message.endswith(
        f"(pass 4); the 3 finished passes before it are saved in {tmp_path / 's.passes'} (rerun with --resume)"
    )
    if failure == "interrupt":
        assert exc.value.code == 143
    resumed = PassLog(tmp_path / "s.passes", {"x": 1}, True, run_pass)
    for _ in range(3):
        resumed(v)
    assert resumed.replayed == 3  # what the message counted is what --resume replays


@pytest.mark.parametrize("signal_", ["SIGTERM", "SIGINT"])
def test_a_signal_between_passes_counts_the_passes_kept(signal_, tmp_path):
    """A signal in the algorithms' own arithmetic (no pass running) says how many passes the log keeps; one inside
    a pass is counted once, by the pass (not twice)."""
    from lib.errors import Interrupted
    from lib.runtime.passlog import PassLog

    log = PassLog(tmp_path / "s.passes", {"x": 1}, False, lambda v, i: 2 * v)
    v = torch.ones(4, 1, dtype=torch.float64)
    with pytest.raises(Interrupted) as exc, log.counting():
        for _ in range(2):
            log(v)
        if signal_ == "SIGTERM":
            raise Interrupted(15)
        raise KeyboardInterrupt
    assert exc.value.message == (
        f"interrupted by {signal_} (between passes); the 2 finished passes are saved in "
        f"{tmp_path / 's.passes'} (rerun with --resume)"
    )
    assert exc.value.code == 128 + (15 if signal_ == "SIGTERM" else 2)

    def stops(v, i):
        raise Interrupted(15, "interrupted by SIGTERM; no unit was finished")

    inside = PassLog(tmp_path / "t.passes", {"x": 1}, False, stops)
    with pytest.raises(Interrupted) as exc, inside.counting():
        inside(v)
    assert (
        exc.value.message == "interrupted by SIGTERM; no unit was finished"
    )  # nothing kept: as it was


# ----------------------------------------------------------------------------- 2: workers watch their parent from the start

POOL_PARENT = """
import sys, time
sys.path.insert(0, {root!r})
if __name__ == "__main__":
    import torch
    from lib.runtime.parallel import WorkerPool
    pool = WorkerPool([torch.device("cpu"), torch.device("cpu")])
    print(" ".join(str(w.proc.pid) for w in pool.start()), flush=True)
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_workers_are_gone_within_a_second_of_a_parent_killed_during_their_start_up(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(POOL_PARENT.format(root=str(ROOT)))
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=subprocess_env()
    )
    pids = [int(p) for p in parent.stdout.readline().split()]
    try:
        assert len(pids) == 2 and all(_alive(p) for p in pids)  # still starting: importing torch
        parent.kill()
        parent.wait()
        t0 = time.monotonic()
        while any(_alive(p) for p in pids) and time.monotonic() - t0 < 10:
            time.sleep(0.02)
        gone_after = time.monotonic() - t0
        assert gone_after < 1.0, f"workers outlived their parent by {gone_after:.2f}s"
    finally:
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


# ----------------------------------------------------------------------------- 7: the unclear cases


def test_finite_differences_with_kink_crossings_left_quote_no_error_and_warn(capsys, monkeypatch):
    """(a) Products that kept kink crossings approximate a smoothed Hessian: the JSON quotes no measured error (it was
    measured where none was left) and says why; one warning line."""
    from lib.products import finite_difference as fd

    monkeypatch.setattr(fd, "_WARNED", set())
    products = fd.FiniteDifference(fd.FDSettings())
    clean = products.report(torch.float32, fd.FDStats(products=10, retries=2))
    assert (
        clean["measured_error_embedded"]["hvp_whole_model"] == 4.8e-2
        and "error_unknown" not in clean
    )
    assert not capsys.readouterr().err
    kinked = products.report(torch.float32, fd.FDStats(products=10, crossings_left=131149))
    assert kinked["measured_error_embedded"] is None and kinked["crossings_left"] == 131149
    assert kinked["error_unknown"].startswith("131,149 kink crossings were left")
    assert capsys.readouterr().err == f"warning: {kinked['error_unknown']}\n"
    products.report(torch.float32, fd.FDStats(products=10, crossings_left=131149))
    assert not capsys.readouterr().err  # once


def test_the_fsdp_view_tensor_warning_leaves_the_gradients_of_the_products_exact(one_rank_env):
    """(b) FSDP2 warns that OPT's decoder layers return a view ("can cause wrong gradients" if changed in place);
    the sharded gradient that every finite-difference product is made of equals the unsharded model's to 1e-14
    (measured 1.5e-16 with one rank and with two)."""
    import copy
    import warnings

    import torch.distributed as dist
    from conftest import tiny_ids, tiny_model

    from lib.objective.loss import summed_nll
    from lib.objective.subsets import params_subset
    from lib.products import fsdp
    from lib.products.finite_difference import FDSettings

    model = tiny_model("opt", torch.float64)
    ids = tiny_ids(3, 8)
    subset = params_subset(model, ["*"])
    reference = copy.deepcopy(model).requires_grad_(True)
    loss = sum(
        summed_nll(reference(input_ids=ids[k : k + 1], use_cache=False).logits, ids[k : k + 1])
        for k in range(3)
    )
    loss.backward()
    expected = torch.cat([reference.get_parameter(n).grad.reshape(-1) for n in subset.param_names])
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            fsdp.init(torch.device("cpu"))
            fsdp.shard(model, subset, torch.device("cpu"))
            op = fsdp.ShardedOperator(model, subset, ids, 1, FDSettings(), torch.device("cpu"))
            g, value = op.gradient(op.x0)
        assert any("returned a view tensor" in str(w.message) for w in seen)
        assert float((g - expected).abs().max()) <= 1e-14 * float(expected.abs().max())
        assert abs(float(value) - float(loss.detach())) <= 1e-13 * abs(float(loss.detach()))
        op.restore()
        assert op.restored()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_skip_existing_checks_the_text_and_the_model_config(copied_model, tmp_path, capsys):
    """(c) --skip_existing reads the --dataset text and the model's config.json (no weight) and refuses a finished
    result computed on other ones."""
    import json

    from lib.model.data import EMBEDDED_TEXT

    text = tmp_path / "text.txt"
    text.write_text(EMBEDDED_TEXT.read_text()[:4000])
    argv = ["--model", str(copied_model), "--dataset", str(text), "--t", "2", "--b", "1"]
    argv += ["--seqlen", "8", "--no_progress", "--output_dir", str(tmp_path / "out"), "--name", "a"]
    single_layer_single_block.run(argv)
    capsys.readouterr()

    def rerun() -> tuple[int, str]:
        with pytest.raises(SystemExit) as e:
            cli.main(
                lambda a: (single_layer_single_block.run(a), exit(0))[1], [*argv, "--skip_existing"]
            )
        out = capsys.readouterr()
        return e.value.code, (out.out + out.err).strip()

    assert rerun() == (
        0,
        f"skipped: {tmp_path / 'out' / 'a.json'} holds this configuration's finished result (its files match "
        "their SHA-256)",
    )
    text.write_text(text.read_text() + " and one more line, after the samples")
    code, line = rerun()
    assert code == 2 and f"the text of --dataset {text} changed (its SHA-256 differs)" in line
    text.write_text(EMBEDDED_TEXT.read_text()[:4000])
    cfg = json.loads((copied_model / "config.json").read_text())
    cfg["layer_norm_elementwise_affine"] = not cfg.get("layer_norm_elementwise_affine", True)
    (copied_model / "config.json").write_text(json.dumps(cfg))
    code, line = rerun()
    assert code == 2 and f"the config.json of --model {copied_model} changed" in line


def _result_json(path, files):
    import json

    path.write_text(
        json.dumps({"files": {"tensor": files[0], "json": path.name}, "figures": files[1:]})
    )


def test_a_finished_result_owns_the_files_it_lists_not_every_figure_of_its_name(tmp_path):
    """(d) A spectrum named q_convergence (density figure only) beside a diagonal result q does not block q's own
    q_convergence.pdf later; a file a result lists stays its own."""
    from lib.app import outputs
    from lib.errors import UserError

    _result_json(tmp_path / "q.json", ["q.pt", "q.pdf", "q.png"])
    spectrum = ["q_convergence.pt", "q_convergence_density.pdf", "q_convergence_density.png"]
    _result_json(tmp_path / "q_convergence.json", spectrum)
    outputs.check_foreign(tmp_path, "q", outputs.planned_files("q", ["", "_convergence"]))
    with pytest.raises(UserError, match="q_convergence_density.pdf, which belongs to the result"):
        outputs.check_foreign(
            tmp_path, "q_convergence_density", outputs.planned_files("q_convergence_density")
        )
    _result_json(tmp_path / "q.json", ["q.pt", "q.pdf", "q_convergence.pdf"])  # q drew it first
    with pytest.raises(UserError, match="q_convergence.pdf, which belongs to the result"):
        outputs.check_foreign(tmp_path, "q_convergence", outputs.planned_files("q_convergence"))


def test_a_name_whose_checkpoint_is_an_unfinished_runs_is_not_told_to_resume(tmp_path):
    """(d) A diagonal run named r.phase2 beside an unfinished r (whose phase-2 checkpoint is r.phase2.ckpt): the
    refusal names r's run, not --resume (which would not help)."""
    from lib.app import outputs
    from lib.errors import UserError

    for f in ("r.ckpt", "r.phase2.ckpt"):
        (tmp_path / f).write_bytes(b"an unfinished run named r")
    checkpoints = [tmp_path / "r.phase2.ckpt", tmp_path / "r.phase2.phase2.ckpt"]
    with pytest.raises(UserError) as e:
        claim = outputs.claim(tmp_path, "r.phase2", checkpoints, False, False)
        claim.release()
    assert "belongs to the unfinished run r (checkpoint" in str(e.value)
    assert "--resume" not in str(e.value)
    assert not (tmp_path / "r.phase2.lock").exists()


def test_a_collective_that_lost_a_rank_is_one_line(monkeypatch, capsys):
    """(d) Under torchrun, rank 0's collective fails when another rank dies: one line (exit 1), not gloo's traceback;
    any other RuntimeError keeps its traceback."""
    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
        "[127.0.0.1]:29845. This is typically caused by a remote worker crashing."
    )

    def fail(error):
        def run(argv):
            raise error

        return run

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        cli.main(fail(gloo), [])
    assert e.value.code == 1
    assert capsys.readouterr().err == (
        "error: rank 0 lost another rank of this torchrun job (Connection closed by peer "
        "[127.0.0.1]:29845); that rank printed why, and torchrun's summary names it\n"
    )
    with pytest.raises(RuntimeError, match="shapes"):
        cli.main(fail(RuntimeError("shapes do not match")), [])
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="Connection closed"):
        cli.main(fail(gloo), [])


def test_dry_run_prints_the_installed_command_when_installed():
    """(d) reproduce's commands name the console command when the package is installed (llm_hessian), else the
    script; every such command exists in pyproject.toml."""
    import tomllib

    from lib.app.reproduce import script_command

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in COMMANDS:
        assert script_command(name, "lib") == f"python {name}.py"
        installed = script_command(name, "llm_hessian")
        assert scripts[installed] == f"llm_hessian.commands:{name}.main"


@pytest.mark.parametrize("local_rank, printed", [("0", True), ("1", False)])
def test_a_refusal_of_the_flags_is_printed_once_per_torchrun_node(
    local_rank, printed, monkeypatch, capsys
):
    """(d) torchrun gives every local rank the same arguments: a bad flag or value is printed by local rank 0 only
    (each rank exits 2)."""
    from lib.commands import hessian_spectrum

    monkeypatch.setenv("RANK", local_rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv in (["--tol", "inf"], ["--no_such_flag"]):
        with pytest.raises(SystemExit) as e:
            cli.main(hessian_spectrum.run, argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert (err.startswith("error: ") and err.count("\n") == 1) if printed else err == ""


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_an_error_every_rank_raises_from_rank_0s_verdict_is_printed_by_rank_0(
    rank, printed, monkeypatch, capsys
):
    """(d) A unit's failure or a refused checkpoint is decided on rank 0 and raised on every rank: one line per job."""
    from lib.errors import RunError, UserError
    from lib.runtime import parallel

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for error, code in (
        (RunError("rank 1 (cpu) failed on samples 2..3 (unit 1): ValueError: x"), 1),
        (UserError("checkpoint x.ckpt exists from an earlier run; pass --resume"), 2),
    ):

        def run(argv, error=error):
            raise parallel._shared(error)

        with pytest.raises(SystemExit) as e:
            cli.main(run, [])
        assert e.value.code == code
        assert capsys.readouterr().err == (f"error: {error}\n" if printed else "")
