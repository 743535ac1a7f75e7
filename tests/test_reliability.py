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
from cases import ARGS, _main, _stderr_of
from conftest import ROOT, subprocess_env

import hessian_diagonal
import single_layer_single_block
from lib.runtime import checkpoint as ckpt
from lib.runtime import parallel


@pytest.fixture(scope="module")
def reference_exact(tmp_path_factory) -> torch.Tensor:
    """The uninterrupted result of ``single_layer_single_block.py`` with :data:`test_guarantees.ARGS`."""
    tmp = tmp_path_factory.mktemp("reference")
    meta = single_layer_single_block.run([*ARGS, "--output_dir", str(tmp)])
    return torch.load(tmp / meta["files"]["tensor"])


DIAG_BF16 = [
    "--vhp_samples",
    "4",
    "--layer_name",
    "self_attn.v_proj",
    "--seqlen",
    "16",
    "--b",
    "2",
    "--dtype",
    "bfloat16",
    "--probe_batch",
    "1",
    "--no_progress",
    "--name",
    "d",
]


# ----------------------------------------------------------------------------- 7: bfloat16 diagonal


def test_bfloat16_diagonal_runs_and_resumes_after_phase_one(tmp_path):
    """XDiag in bfloat16: phase 2 hashes the bfloat16 basis (it crashed there at ``.numpy()``, and again on every
    --resume); a run stopped after phase 1 (its phase-1 checkpoint complete, no phase 2) resumes and gives the
    uninterrupted result bitwise."""
    meta = hessian_diagonal.run([*DIAG_BF16, "--output_dir", str(tmp_path), "--keep_checkpoint"])
    reference = torch.load(tmp_path / meta["files"]["tensor"])
    assert reference.dtype == torch.bfloat16 and bool(torch.isfinite(reference.float()).all())
    for f in ("d.phase2.ckpt", "d.pt", "d.json"):  # as if stopped right after phase 1
        (tmp_path / f).unlink()
    assert ckpt.read(tmp_path / "d.ckpt")["prefix"] == 2  # phase 1 is complete and kept
    meta = hessian_diagonal.run(
        [*DIAG_BF16, "--output_dir", str(tmp_path), "--resume", "--overwrite"]
    )
    assert meta["run"][0]["mode"] == "resumed complete" and meta["run"][1]["units_run"] == 2
    assert torch.equal(torch.load(tmp_path / meta["files"]["tensor"]), reference)


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
    assert (
        code == 2
        and err
        == f"error: --output_dir {str(tmp_path)!r} is not a writable directory (File too large); choose another --output_dir"
    )
    assert list(tmp_path.iterdir()) == []  # no .write-probe-<pid>


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_unit_timeout_is_refused(value, tmp_path, no_model_load):
    code, err = _main(
        single_layer_single_block, [*ARGS, "--output_dir", str(tmp_path), "--unit_timeout", value]
    )
    assert (
        code == 2
        and err
        == f"error: --unit_timeout must be a finite number of seconds (0 = automatic), got {float(value)}"
    )


# ----------------------------------------------------------------------------- 6: token ids beyond the model's vocabulary


@pytest.mark.parametrize("devices", [[], ["--devices", "cpu,cpu"]], ids=["in-process", "workers"])
def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_computing(
    devices, tmp_path, monkeypatch
):
    from cases import INPUTS_FAST as FAST
    from cases import _tiny_opt

    model_dir = _tiny_opt(tmp_path / "m", vocab=64)  # the embedded 4096-token tokenizer
    monkeypatch.setattr(
        parallel,
        "_run_on_pool",
        lambda *a: (_ for _ in ()).throw(AssertionError("workers were started")),
    )
    code, err = _main(
        single_layer_single_block,
        ["--model", str(model_dir), *FAST, "--output_dir", str(tmp_path / "out"), *devices],
    )
    assert code == 2 and re.fullmatch(
        rf"error: the tokenizer of '{re.escape(str(model_dir))}' gives token id \d+ \(\d+ of the 32 sample tokens out of range\) but the model's vocabulary has 64 entries \(ids 0\.\.63\): the tokenizer does not belong to the model",
        err,
    ), err
    assert not (
        tmp_path / "out"
    ).exists()  # nothing written (the directory the run created is removed again)


# ----------------------------------------------------------------------------- 1: the model's configuration and code are part of its identity


def test_resume_refuses_a_model_whose_configuration_changed_after_a_kill(tmp_path, capsys):
    import shutil

    from cases import INPUTS_FAST as FAST
    from cases import _fail, _tiny_opt

    from lib.model.models import load_model

    model_dir = _tiny_opt(tmp_path / "m")
    assert json.loads((model_dir / "config.json").read_text())["activation_function"] == "relu"
    argv = [
        "--model",
        str(model_dir),
        *FAST,
        "--output_dir",
        str(tmp_path / "out"),
        "--name",
        "r",
        "--checkpoint_every",
        "1",
    ]
    meta = single_layer_single_block.run([*argv, "--keep_checkpoint"])
    for f in ("r.pt", "r.json"):  # as if killed before the results were written
        (tmp_path / "out" / f).unlink()
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(
        json.dumps({**cfg, "activation_function": "gelu", "_name_or_path": "elsewhere"})
    )
    capsys.readouterr()
    err = _fail([*argv, "--resume"], capsys)  # exit 0 before: 2 relu units mixed with 2 gelu units
    assert not (tmp_path / "out" / "r.pt").exists()
    from lib.model.inputs import code_path, config_fingerprint

    old, new = meta["fingerprints"]["model_config"], config_fingerprint(load_model(str(model_dir)))
    assert (
        err
        == f"error: checkpoint {tmp_path / 'out' / 'r.ckpt'} was written for other inputs: the model's configuration (config.json) changed (fingerprint {old[:12]}.. -> {new[:12]}..); restore the original files, or delete it to start over"
    )
    (model_dir / "config.json").write_text(json.dumps(cfg))
    model = load_model(str(model_dir))
    assert (
        old
        == config_fingerprint(model)
        == config_fingerprint(load_model(str(shutil.copytree(model_dir, tmp_path / "moved"))))
    )
    assert meta["fingerprints"]["code"] == code_path(model) and code_path(model).startswith(
        "transformers "
    )


def test_a_worker_refuses_a_model_whose_configuration_or_code_differs(tmp_path):
    from cases import _tiny_opt

    from lib.errors import UserError
    from lib.model.inputs import code_path, config_fingerprint
    from lib.model.models import ModelSpec, load_model

    model_dir = _tiny_opt(tmp_path / "m")
    model = load_model(str(model_dir))
    ModelSpec(
        str(model_dir), config_fingerprint=config_fingerprint(model), code=code_path(model)
    ).load()  # the same: accepted
    with pytest.raises(
        UserError,
        match=r"\(configuration 000000000000 -> [0-9a-f]{12}\): its files changed during the run",
    ):
        ModelSpec(str(model_dir), config_fingerprint="0" * 16).load()
    with pytest.raises(
        UserError, match=r"\(code transformers 0\.0 -> transformers .*, attention eager\)"
    ):
        ModelSpec(str(model_dir), code="transformers 0.0").load()


# ----------------------------------------------------------------------------- 2: a full disk between two checkpoints


def test_a_disk_full_after_the_first_checkpoint_is_one_line_that_counts_what_the_file_holds(
    tmp_path, monkeypatch, reference_exact
):
    save = ckpt.save
    limited = []

    def fill_the_disk_after_the_first(path, state, config):
        save(path, state, config)
        if (
            not limited
        ):  # from now on every file write past 64 bytes fails (EFBIG), like a full disk
            limited.append(_file_size_limit(64))
            limited[0].__enter__()

    monkeypatch.setattr(ckpt, "save", fill_the_disk_after_the_first)
    try:
        code, lines = _stderr_of(
            single_layer_single_block,
            [*ARGS, "--output_dir", str(tmp_path), "--checkpoint_every", "1"],
        )
    finally:
        if limited:
            limited[0].__exit__(None, None, None)
    path = tmp_path / "h.ckpt"
    assert code == 1 and lines == [
        f"error: could not write the checkpoint {path} (OSError: [Errno 27] File too large); the 1 finished unit of 4 is saved in {path} (rerun with --resume)"
    ]
    assert ckpt.read(path)["prefix"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == [
        "h.ckpt"
    ]  # no temporary file, no lock
    monkeypatch.undo()
    meta = single_layer_single_block.run([*ARGS, "--output_dir", str(tmp_path), "--resume"])
    assert torch.equal(torch.load(tmp_path / meta["files"]["tensor"]), reference_exact)


# ----------------------------------------------------------------------------- 3: names too long for the files derived from them


@pytest.mark.parametrize("name", ["x" * 245, "漢" * 130], ids=["245-ascii", "130-cjk"])
def test_a_name_too_long_for_its_derived_files_is_refused_before_any_work(
    name, tmp_path, no_model_load
):
    """The longest file a run derives from its name is a temporary ``.<name>.ckpt.tmp<pid>``: 17 bytes more than
    the name (7 digits for the pid), so 238 bytes is the longest name on a file system with 255-byte names."""
    code, err = _main(
        single_layer_single_block, [*ARGS, "--output_dir", str(tmp_path), "--name", name]
    )
    size = len(name.encode())
    assert code == 2 and err == (
        f"error: --name is {size} bytes long (UTF-8): with the suffixes and temporary-file markers this run adds (up to 17 bytes, "
        f"as in '.<name>.json.tmp<pid>') its file names would exceed the 255-byte limit of {tmp_path}; use a --name of at most 238 bytes"
    )
    assert list(tmp_path.iterdir()) == []
    code, err = _main(
        single_layer_single_block, [*ARGS, "--output_dir", str(tmp_path), "--name", "y" * 238]
    )
    assert code == -1 and "the model was loaded" in err  # the longest name passes every check


# ----------------------------------------------------------------------------- 4: one result's files never overwrite another's


TINY = ["--t", "2", "--seqlen", "16", "--b", "2", "--dtype", "float64", "--no_progress"]


@pytest.mark.parametrize(
    "first,second,taken",
    [
        (["--name", "r_batch_study"], ["--name", "r", "--batch_study"], "r_batch_study.pt"),
        (["--name", "r", "--batch_study"], ["--name", "r_batch_study"], "r_batch_study.pt"),
        (["--name", "q_compare"], ["--name", "q", "--compare", "diag"], "q_compare.pt"),
        (
            ["--name", "q", "--compare", "diag"],
            ["--name", "q_compare", "--overwrite"],
            "q_compare.pt",
        ),
    ],
    ids=["study-after-name", "name-after-study", "compare-after-name", "name-after-compare"],
)
def test_a_run_never_writes_a_file_of_another_result(first, second, taken, tmp_path, monkeypatch):
    single_layer_single_block.run([*TINY, "--output_dir", str(tmp_path), *first])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    owner = first[1]
    monkeypatch.setattr(
        "lib.app.pipeline.load_model",
        lambda *a, **k: (_ for _ in ()).throw(AssertionError("the model was loaded")),
    )
    code, err = _main(single_layer_single_block, [*TINY, "--output_dir", str(tmp_path), *second])
    assert (
        code == 2
        and err
        == f"error: this run would write {tmp_path / taken}, which belongs to the result {tmp_path / owner}.json; choose another --name (--overwrite replaces only a result of the same name)"
    )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # untouched, no lock left


def test_a_run_never_writes_a_file_a_running_or_unfinished_run_will_write(tmp_path, monkeypatch):
    from lib.app import outputs

    monkeypatch.setattr(
        "lib.app.pipeline.load_model",
        lambda *a, **k: (_ for _ in ()).throw(AssertionError("the model was loaded")),
    )
    other = outputs.claim(
        tmp_path,
        "r",
        [tmp_path / "r.ckpt"],
        False,
        False,
        files=outputs.planned_files("r", ["", "_batch_study"], ["_batch_study"]),
    )
    try:  # a run named r with --batch_study in progress
        code, err = _main(
            single_layer_single_block,
            [*TINY, "--output_dir", str(tmp_path), "--name", "r_batch_study"],
        )
        assert (
            code == 2
            and err
            == f"error: this run would write {tmp_path / 'r_batch_study.pt'}, which belongs to a run in progress (pid {os.getpid()}) named r; choose another --name (--overwrite replaces only a result of the same name)"
        )
    finally:
        other.release()
        outputs._CURRENT.remove(other)
    (tmp_path / "q_compare.ckpt").write_bytes(b"an unfinished run named q_compare")
    code, err = _main(
        single_layer_single_block,
        [*TINY, "--output_dir", str(tmp_path), "--name", "q", "--compare", "diag"],
    )
    assert (
        code == 2
        and err
        == f"error: this run would write {tmp_path / 'q_compare.pt'}, which belongs to the unfinished run q_compare (checkpoint {tmp_path / 'q_compare.ckpt'}); choose another --name (--overwrite replaces only a result of the same name)"
    )


# ----------------------------------------------------------------------------- 5: all outputs of a result are replaced as a unit


WRAPPER = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
what = {what!r}
if what == "kill_at_png":  # SIGKILL as the result's first .png is written (its .pdf is written just before)
    import matplotlib.figure
    savefig = matplotlib.figure.Figure.savefig
    def killing(self, fname, *a, **k):
        if str(fname).endswith(".png") or k.get("format") == "png":
            os.kill(os.getpid(), signal.SIGKILL)
        return savefig(self, fname, *a, **k)
    matplotlib.figure.Figure.savefig = killing
import single_layer_single_block
from lib.app import cli
if __name__ == "__main__":
    cli.main(single_layer_single_block.run, sys.argv[1:])
"""


def _wrapped(tmp_path, what: str, argv: list[str], **kw) -> subprocess.Popen:
    """The script run through :data:`WRAPPER` with fault ``what``; it and every process it starts carry the
    environment variable ``HESSIAN_TEST_MARK=<tmp_path>`` (see :func:`_marked`)."""
    script = tmp_path / f"{what}.py"
    script.write_text(WRAPPER.format(root=str(ROOT), what=what))
    env = {**subprocess_env(), "HESSIAN_TEST_MARK": str(tmp_path)}
    return subprocess.Popen(
        [sys.executable, str(script), *argv],
        env=env,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _marked(tmp_path) -> set[int]:
    """Pids of the live (not zombie) processes started by :func:`_wrapped` for ``tmp_path``, workers included (Linux ``/proc``)."""
    from pathlib import Path

    mark = f"HESSIAN_TEST_MARK={tmp_path}".encode()
    out = set()
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if (
                mark in (d / "environ").read_bytes().split(b"\0")
                and (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            ):
                out.add(int(d.name))
        except OSError:
            continue
    return out


def _visible(d) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes() for p in d.iterdir() if not p.name.startswith(".") and p.is_file()
    }


@pytest.mark.slow
def test_an_overwrite_killed_between_its_figures_leaves_the_old_result_whole(
    tmp_path, reference_exact
):
    out = tmp_path / "out"
    single_layer_single_block.run(
        [*ARGS, "--output_dir", str(out), "--b", "2"]
    )  # the old result of the same name
    old = _visible(out)
    assert sorted(old) == ["h.json", "h.pdf", "h.png", "h.pt"]
    proc = _wrapped(tmp_path, "kill_at_png", [*ARGS, "--output_dir", str(out), "--overwrite"])
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    now = _visible(out)
    assert {
        k: v for k, v in now.items() if k not in ("h.ckpt", "h.lock")
    } == old  # no new .pdf beside the old JSON: nothing of the new set is visible
    assert ckpt.read(out / "h.ckpt")["prefix"] == 4
    meta = single_layer_single_block.run(
        [*ARGS, "--output_dir", str(out), "--overwrite", "--resume"]
    )
    from lib.app.results import verify_result

    assert verify_result(out / "h.json")["outputs"] == meta["outputs"] and sorted(
        meta["outputs"]
    ) == [
        "h.pdf",
        "h.png",
        "h.pt",
    ]
    assert torch.equal(torch.load(out / "h.pt"), reference_exact)
    assert sorted(p.name for p in out.iterdir()) == [
        "h.json",
        "h.pdf",
        "h.png",
        "h.pt",
    ]  # no temporary file left


def test_an_overwrite_stopped_while_renaming_its_files_leaves_no_json(
    tmp_path, monkeypatch, reference_exact
):
    import lib.app.results
    from lib.app.results import verify_result

    single_layer_single_block.run(
        [*ARGS, "--output_dir", str(tmp_path), "--b", "2", "--batch_study"]
    )
    replace = os.replace

    def stop_at_the_png(src, dst):
        if str(dst).endswith("h.png") and ".tmp" in str(src):
            raise KeyboardInterrupt
        return replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(lib.app.results.os, "replace", stop_at_the_png)
        code, err = _main(
            single_layer_single_block, [*ARGS, "--output_dir", str(tmp_path), "--overwrite"]
        )
    assert (
        code == 130
        and err
        == f"error: interrupted by SIGINT while writing the results; every unit is computed and saved in {tmp_path / 'h.ckpt'}: fix the cause and rerun with --resume (and the same flags) to write the outputs without recomputing"
    )
    assert not (
        tmp_path / "h.json"
    ).exists()  # the old JSON went first: a mixed set is never described by a JSON
    assert not [
        p for p in tmp_path.iterdir() if p.name.startswith(".")
    ]  # the staged files not yet renamed are removed
    meta = single_layer_single_block.run(
        [*ARGS, "--output_dir", str(tmp_path), "--overwrite", "--resume"]
    )
    verify_result(tmp_path / "h.json")
    assert torch.equal(torch.load(tmp_path / "h.pt"), reference_exact)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["h.json", *meta["outputs"]]
    )  # the old batch study's files are gone


# ----------------------------------------------------------------------------- 12: tensor_sha256 (and every file's digest) checked when results are read


def test_verify_result_names_a_replaced_damaged_or_missing_file(tmp_path):
    from lib.app.results import ResultMismatch, load_result, verify_result

    single_layer_single_block.run(
        [*TINY, "--output_dir", str(tmp_path), "--name", "a", "--batch_study"]
    )
    meta, tensor = load_result(tmp_path / "a.json")
    assert torch.equal(tensor, torch.load(tmp_path / "a.pt")) and sorted(meta["outputs"]) == [
        "a.pdf",
        "a.png",
        "a.pt",
        "a_batch_study.pdf",
        "a_batch_study.png",
        "a_batch_study.pt",
    ]
    pt = (tmp_path / "a.pt").read_bytes()
    torch.save(tensor * 2, tmp_path / "a.pt")  # another run's tensor
    with pytest.raises(
        ResultMismatch,
        match=rf"^{re.escape(str(tmp_path / 'a.pt'))} does not match the SHA-256 recorded in {re.escape(str(tmp_path / 'a.json'))} \([0-9a-f]{{12}}\.\. recorded, [0-9a-f]{{12}}\.\. found\): it was replaced or damaged; rerun with --overwrite to rebuild the result$",
    ):
        verify_result(tmp_path / "a.json")
    (tmp_path / "a.pt").write_bytes(pt)
    data = (tmp_path / "a_batch_study.png").read_bytes()
    (tmp_path / "a_batch_study.png").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ResultMismatch, match=r"a_batch_study\.png does not match"):
        verify_result(tmp_path / "a.json")
    (tmp_path / "a_batch_study.png").write_bytes(data)
    verify_result(tmp_path / "a.json")
    (tmp_path / "a.pdf").unlink()
    with pytest.raises(ResultMismatch, match=r"a\.pdf, a file of the result .*a\.json, is missing"):
        verify_result(tmp_path / "a.json")


@pytest.mark.slow
def test_reproduce_refuses_a_result_whose_tensor_was_swapped(tmp_path, monkeypatch, capsys):
    import reproduce
    from lib.app import reproduce as preset_runs

    run = preset_runs.execute
    done = []

    def swap_after_the_second(spec):
        meta = run(spec)
        done.append(meta)
        if len(done) == 2:  # another run's tensor in place of this one's, its JSON untouched
            (tmp_path / meta["files"]["tensor"]).write_bytes(
                (tmp_path / done[0]["files"]["tensor"]).read_bytes()
            )
        return meta

    monkeypatch.setattr(preset_runs, "execute", swap_after_the_second)
    with pytest.raises(SystemExit) as e:
        from lib.app import cli

        cli.main(
            reproduce.run,
            ["--figure", "3b", "--quick", "--output_dir", str(tmp_path), "--no_progress"],
        )
    swapped = tmp_path / done[1]["files"]["tensor"]
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: {swapped} does not match the SHA-256 recorded in "
    )
    assert not (tmp_path / "fig3b_embedded_quick.png").exists()


# ----------------------------------------------------------------------------- 8: the spectrum's pass files


def _scale_first_output_entry(path) -> None:
    """Edit a pass file as a person would: multiply the first entry of the stored ``H V`` by 1.5 in place (the tensor's
    bytes are stored raw inside the ``torch.save`` zip archive, whatever surrounds it)."""
    import io
    import zipfile

    data = bytearray(path.read_bytes())
    start = data.find(b"PK\x03\x04")
    with zipfile.ZipFile(io.BytesIO(bytes(data[start:]))) as z:
        (entry,) = [n for n in z.namelist() if n.rsplit("/", 2)[-2:-1] == ["data"]]
        raw = z.read(entry)
    at = data.find(raw)
    value = torch.frombuffer(bytearray(raw[:8]), dtype=torch.float64) * 1.5
    data[at : at + 8] = value.numpy().tobytes()
    path.write_bytes(bytes(data))


SPECTRUM = [
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
    "16",
    "--top_k",
    "1",
    "--seed",
    "1",
    "--exact_below",
    "0",
    "--max_iter",
    "3",
    "--tol",
    "1e-15",
]


@pytest.fixture(scope="module")
def pass_log(tmp_path_factory):
    """The pass log of a spectrum run (3 passes), as a run killed before writing its results leaves it."""
    import hessian_spectrum

    out = tmp_path_factory.mktemp("spectrum")
    hessian_spectrum.run([*SPECTRUM, "--output_dir", str(out), "--keep_checkpoint"])
    log = out / "s.passes"
    assert sorted(p.name for p in log.iterdir()) == [
        "config.json",
        "pass_00000.pt",
        "pass_00001.pt",
        "pass_00002.pt",
    ]
    return log


@pytest.mark.parametrize("what", ["junk", "truncated", "edited", "no config, other --b"])
def test_damaged_edited_or_unbound_pass_files_are_refused_on_resume(what, pass_log, tmp_path):
    import shutil

    import hessian_spectrum

    log = tmp_path / "s.passes"
    shutil.copytree(pass_log, log)
    last = log / "pass_00002.pt"
    damaged = rf"pass file {re.escape(str(last))} is truncated, damaged or edited \({{}}\); delete {re.escape(str(log))} to start over"
    damage, message = {
        "junk": (
            lambda: last.write_bytes(b"junk"),
            damaged.format("4 bytes, shorter than its header"),
        ),
        "truncated": (
            lambda: last.write_bytes(last.read_bytes()[:-100]),
            damaged.format(r"\d+ of \d+ payload bytes"),
        ),
        "edited": (
            lambda: _scale_first_output_entry(last),
            damaged.format("checksum mismatch"),
        ),  # silently other eigenvalues before
        "no config, other --b": (
            lambda: (log / "config.json").unlink(),
            rf"pass log {re.escape(str(log))} has 3 pass files but no config\.json: it cannot be checked against this run; delete it to start over",
        ),
    }[what]
    damage()
    extra = ["--b", "3"] if "--b" in what else []  # replayed the b=2 passes for b=3 before
    code, lines = _stderr_of(
        hessian_spectrum, [*SPECTRUM, "--output_dir", str(tmp_path), "--resume", *extra]
    )
    assert code == 2 and len(lines) == 1 and re.fullmatch("error: " + message, lines[0]), lines
    assert not (tmp_path / "s.pt").exists()


def test_a_pass_file_is_bound_to_its_configuration_and_index(tmp_path):
    from lib.errors import UserError
    from lib.runtime.passlog import encode_pass, read_pass

    f = tmp_path / "pass_00000.pt"
    f.write_bytes(encode_pass("a" * 64, 0, "digest", torch.ones(3, 2, dtype=torch.float64)))
    assert torch.equal(read_pass(f, "a" * 64, 0)["output"], torch.ones(3, 2, dtype=torch.float64))
    for config, index in (("b" * 64, 0), ("a" * 64, 1)):
        with pytest.raises(UserError, match="was written by a run with a different configuration"):
            read_pass(f, config, index)


# ----------------------------------------------------------------------------- 9: a worker stuck while setting up


LIGHT = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import torch
from lib.app import cli
from lib.runtime import parallel


class Job:
    \"\"\"An additive job without a model whose worker processes stop (SIGSTOP) in set-up or hang in their units.\"\"\"

    model_input_bs = 1

    def __init__(self, what):
        self.what = what

    def setup(self, device):
        if self.what == "stop_in_setup":
            os.kill(os.getpid(), signal.SIGSTOP)

    def num_units(self):
        return 4

    def steps_per_unit(self):
        return 1

    def run_unit(self, k, progress=None):
        if self.what == "hang_in_units":
            print("HANGING", file=sys.stderr, flush=True)
            time.sleep(600)
        return {{"s": torch.full((3,), float(k), dtype=torch.float64)}}

    def config(self):
        return {{"kind": "light"}}


if __name__ == "__main__":
    settings = parallel.RunSettings([torch.device("cpu")] * 2, setup_timeout=float(sys.argv[2]))
    cli.main(lambda argv: parallel.run_job(Job(sys.argv[1]), settings), [])
"""


def _light(tmp_path, what: str, setup_timeout: float = 0.0) -> subprocess.Popen:
    """:data:`LIGHT` (torch and :mod:`lib.runtime.parallel` only, two CPU workers) with fault ``what``, marked like :func:`_wrapped`."""
    script = tmp_path / "light.py"
    script.write_text(LIGHT.format(root=str(ROOT)))
    env = {**subprocess_env(), "HESSIAN_TEST_MARK": str(tmp_path)}
    return subprocess.Popen(
        [sys.executable, str(script), what, str(setup_timeout)],
        env=env,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_a_worker_stuck_while_setting_up_is_stopped_as_hung(tmp_path):
    proc = _light(tmp_path, "stop_in_setup", setup_timeout=3)
    try:
        _, err = proc.communicate(
            timeout=240
        )  # it hung forever before: the watchdog watched units only
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert re.fullmatch(
        r"error: worker \d \(cpu\) has been setting up \(loading the model, preparing the job\) for \d+s, over --setup_timeout 3s; it was stopped as hung",
        err.strip().splitlines()[-1],
    ), err
    assert _marked(tmp_path) == set()  # both workers are gone, the stopped one too


def test_setup_timeout_flag_reaches_the_run_and_is_validated(tmp_path, no_model_load):

    from lib import commands
    from lib.app import pipeline

    spec = commands.single_layer_single_block.spec([*ARGS, "--setup_timeout", "7"])
    cpu = torch.device("cpu")
    run = pipeline.Run(spec, "x", None, None, cpu, [cpu, cpu], {}, None, 0.0)
    assert run.run_settings(tmp_path / "x.ckpt", "x").setup_timeout == 7.0
    code, err = _main(
        single_layer_single_block, [*ARGS, "--output_dir", str(tmp_path), "--setup_timeout", "nan"]
    )
    assert (
        code == 2
        and err
        == "error: --setup_timeout must be a finite number of seconds (0 = automatic), got nan"
    )


def test_automatic_setup_limit_is_fifteen_minutes_or_ten_fastest_setups():
    w = parallel._Worker(0, torch.device("cpu"), None, None, sent=time.monotonic() - 1000)
    assert parallel._stuck_in_setup([w], [], 0) is not None  # 1000 s > 900 s
    assert parallel._stuck_in_setup([w], [120.0], 0) is None  # 1000 s < 10 * 120 s
    w.ready = True
    assert parallel._stuck_in_setup([w], [], 0) is None
    w.ready, w.sent = False, time.monotonic() - 4
    assert parallel._stuck_in_setup([w], [], 3.0)[1] == "--setup_timeout 3s"


# ----------------------------------------------------------------------------- 13: workers end with their parent


def _workers(tmp_path) -> set[int]:
    """The worker processes among :func:`_marked` (spawned interpreters)."""
    from pathlib import Path

    out = set()
    for pid in _marked(tmp_path):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.add(pid)
        except OSError:
            pass
    return out


@pytest.mark.slow
def test_workers_exit_within_a_second_or_two_of_a_sigkilled_parent(tmp_path):
    proc = _light(tmp_path, "hang_in_units")
    try:
        seen, deadline = "", time.monotonic() + 240
        while seen.count("HANGING") < 2:  # both workers are inside a unit
            assert time.monotonic() < deadline and proc.poll() is None, seen
            seen += proc.stderr.readline()
        workers = _workers(tmp_path)
        assert len(workers) == 2
        proc.kill()  # SIGKILL: the parent runs no clean-up
        proc.wait()
        deadline = time.monotonic() + 2.0
        while _workers(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = _workers(tmp_path)
    finally:
        for pid in _marked(tmp_path):
            os.kill(pid, signal.SIGKILL)
    assert left == set(), "workers still computing after their parent was killed"


# ----------------------------------------------------------------------------- 11: the chunk every process used is recorded and reused on --resume


CHUNKED = [
    "--t",
    "32",
    "--b",
    "4",
    "--model_input_bs",
    "1",
    "--dtype",
    "float64",
    "--no_progress",
    "--name",
    "c",
]
"""With ``--seqlen 32`` the products are the 32 entries; with ``--seqlen 16`` the 16 (position, unit) products of the
layer's output (fewer than the entries: lib.hessian.exact.products_space)."""


def _counting_clock(monkeypatch) -> None:
    """Candidates timed on a clock that ticks once per call: every call looks as long, so larger chunks always win
    and the choice (chunk 8 of 1, 2, 4, 8 on 32 columns) does not depend on the machine's load."""
    import itertools

    import lib.products.autotune

    ticks = itertools.count()
    monkeypatch.setattr(
        lib.products.autotune, "device_clock", lambda device: lambda: float(next(ticks))
    )


@pytest.mark.parametrize(
    "seqlen,space,size,chosen", [(32, "entries", 32, 8), (16, "layer-outputs", 16, 4)]
)
def test_float64_resume_with_the_automatic_chunk_is_bitwise(
    tmp_path, monkeypatch, seqlen, space, size, chosen
):
    _counting_clock(monkeypatch)
    chunked = [*CHUNKED, "--seqlen", str(seqlen)]
    meta = single_layer_single_block.run([*chunked, "--output_dir", str(tmp_path / "ref")])
    reference = torch.load(tmp_path / "ref" / "c.pt")
    assert meta["chunk"]["chunk"] == "auto" and meta["chunk"]["measured"]["chunk"] == chosen
    assert meta["products"]["space"] == space
    save = ckpt.save

    def interrupt_after_two_units(path, state, config):
        save(path, state, config)
        if state.n_done == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ckpt, "save", interrupt_after_two_units)
        code, _ = _main(
            single_layer_single_block,
            [*chunked, "--output_dir", str(tmp_path), "--checkpoint_every", "1"],
        )
    assert code == 130 and ckpt.read(tmp_path / "c.ckpt")["prefix"] == 2
    meta = single_layer_single_block.run(
        [*chunked, "--output_dir", str(tmp_path), "--resume"]
    )  # measured again on unit 2 before
    assert torch.equal(torch.load(tmp_path / "c.pt"), reference)
    assert meta["run"]["reused_chunks"] == {str(size): chosen}


@pytest.mark.slow
def test_spectrum_resume_with_the_automatic_chunk_is_bitwise(tmp_path, monkeypatch):
    """The trace's 30-vector pass measures the chunk and the Hutch++ passes reuse it; a run stopped after the
    Hutchinson pass replays the recorded passes on --resume and computes the Hutch++ passes with the recorded chunk."""
    import hessian_spectrum
    import lib.runtime.passlog

    flags = [*SPECTRUM, "--trace", "--t", "32"]
    _counting_clock(monkeypatch)
    ref_meta = hessian_spectrum.run([*flags, "--output_dir", str(tmp_path / "ref")])
    reference = torch.load(tmp_path / "ref" / "s.pt")
    encode = lib.runtime.passlog.encode_pass

    def stop_after_the_hutchinson_pass(config_sha256, i, *a, **k):
        if i == 4:
            raise KeyboardInterrupt
        return encode(config_sha256, i, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(lib.runtime.passlog, "encode_pass", stop_after_the_hutchinson_pass)
        code, _ = _main(hessian_spectrum, [*flags, "--output_dir", str(tmp_path)])
    assert code == 130 and len(list((tmp_path / "s.passes").glob("pass_*.pt"))) == 4
    meta = hessian_spectrum.run([*flags, "--output_dir", str(tmp_path), "--resume"])
    assert meta["replayed_passes"] == 4
    assert (
        meta["trace"] == ref_meta["trace"]
    )  # the Hutch++ passes: measured again (other chunks) before
    resumed = torch.load(tmp_path / "s.pt")
    assert set(resumed) == set(reference) and all(
        torch.equal(resumed[k], reference[k]) for k in reference
    )
