"""The three exact-Hessian scripts end to end on the embedded model, and every error path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import several_layers_several_blocks
import single_layer_several_blocks
import single_layer_single_block
from lib.app import cli
from lib.hessian.exact import exact_hessian
from lib.model.models import load_model
from lib.objective import subsets

FAST = ["--seqlen", "16", "--b", "2", "--no_progress"]


def _outputs(tmp_path, meta):
    stem = tmp_path / meta["files"]["tensor"][:-3]
    return torch.load(f"{stem}.pt"), json.loads(open(f"{stem}.json").read())


def test_single_layer_single_block_end_to_end(tmp_path):
    meta = single_layer_single_block.run(
        ["--t", "6", "--block_index", "1", "--output_dir", str(tmp_path), *FAST]
    )
    h, js = _outputs(tmp_path, meta)
    assert h.shape == (6, 6) and h.dtype == torch.float32
    assert js["entries"] == [
        ["model.decoder.layers.1.self_attn.q_proj.weight", 0, j] for j in range(6)
    ]
    assert js["config"]["data"]["b"] == 2 and js["n_tokens"] == 2 * 15
    assert "mean next-token NLL" in js["normalization"]
    assert 1 < js["perplexity"] < 4096
    for f in js["figures"]:
        assert (tmp_path / f).stat().st_size > 1000
    # the saved matrix is the library's exact Hessian of the same samples, normalized
    model = load_model("embedded")
    sub = subsets.single_layer_single_block(model, "self_attn.q_proj", 1, 6)
    from lib.model.data import EMBEDDED_TEXT, load_tokenizer, make_samples, tokenize

    samples = make_samples(tokenize(load_tokenizer("embedded"), EMBEDDED_TEXT.read_text()), 16, 2)
    ref = exact_hessian(model, sub, samples, method="autograd", fused_head=False)
    assert torch.allclose(h, ref.hessian, rtol=1e-4, atol=1e-7)
    assert float(h.abs().max()) > 0


def test_single_layer_several_blocks_end_to_end(tmp_path):
    meta = single_layer_several_blocks.run(
        ["--t", "3", "--layer_name", "fc2", "--output_dir", str(tmp_path), *FAST]
    )
    h, js = _outputs(tmp_path, meta)
    assert h.shape == (12, 12)  # 3 entries x all 4 blocks
    assert [e[0] for e in js["entries"][::3]] == [
        f"model.decoder.layers.{b}.fc2.weight" for b in range(4)
    ]
    assert torch.allclose(h, h.T, rtol=1e-4, atol=1e-7 * float(h.abs().max()))


def test_several_layers_several_blocks_end_to_end(tmp_path):
    meta = several_layers_several_blocks.run(
        [
            "--t",
            "2",
            "--num_layers",
            "3",
            "--num_blocks",
            "2",
            "--output_dir",
            str(tmp_path),
            "--name",
            "x",
            *FAST,
        ]
    )
    h, js = _outputs(tmp_path, meta)
    assert h.shape == (12, 12)
    assert (tmp_path / "x.pt").exists() and js["config"]["subset"]["num_layers"] == 3
    assert js["entries"][2][0] == "model.decoder.layers.0.self_attn.v_proj.weight"


def test_local_text_dataset_and_token_cache(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 40, encoding="utf-8")
    args = [
        "--t",
        "2",
        "--dataset",
        str(text),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--output_dir",
        str(tmp_path),
        *FAST,
    ]
    single_layer_single_block.run(args)
    cached = list((tmp_path / "cache" / "tokenized").glob("*.pt"))
    assert len(cached) == 1
    single_layer_single_block.run([*args, "--overwrite"])  # second run reads the cache
    assert list((tmp_path / "cache" / "tokenized").glob("*.pt")) == cached


ERRORS = [
    (
        ["--layer_name", "q_proj"],
        r"unknown --layer_name 'q_proj'; the linear layers of a block are: self_attn.k_proj, self_attn.v_proj, self_attn.q_proj",
    ),
    (["--t", "129"], r"--t 129 is larger than a row of self_attn.q_proj \(128 entries\)"),
    (["--block_index", "4"], r"--block_index 4 is out of range: the model has 4 blocks"),
    (["--seqlen", "600"], r"--seqlen 600 exceeds the model's maximum sequence length 512"),
    (
        ["--b", "100000"],
        r"--b 100000 needs .* tokens but the text .* has at most \d+ tokens: at most \d+ samples of seqlen 16 exist",
    ),
    (["--b", "3", "--model_input_bs", "2"], r"--model_input_bs 2 does not divide --b 3"),
    (
        ["--attn_implementation", "flash_attention_2"],
        r"attention 'flash_attention_2' has no double backward",
    ),
    (["--dataset", "/nonexistent/file.txt"], r"--dataset '/nonexistent/file.txt' is neither"),
    (["--model", "/nonexistent/model"], r"cannot load model '/nonexistent/model'.*--model PATH"),
    (["--device", "gpu"], r"invalid --device 'gpu': give a torch device such as cpu, cuda"),
]


@pytest.mark.parametrize("extra,message", ERRORS, ids=[e[0][0] for e in ERRORS])
def test_errors_are_one_clear_line(extra, message, capsys, tmp_path):
    argv = [
        "--t",
        "4",
        "--seqlen",
        "16",
        "--b",
        "2",
        "--no_progress",
        "--output_dir",
        str(tmp_path),
    ]
    with pytest.raises(SystemExit) as exc:
        cli.main(single_layer_single_block.run, argv + extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not list(tmp_path.iterdir())  # nothing computed or written


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,extra,message",
    [
        ("single_layer_several_blocks.py", ["--num_blocks", "5"], "--num_blocks 5 is out of range"),
        (
            "several_layers_several_blocks.py",
            ["--num_layers", "7"],
            "--num_layers 7 is out of range: block 0 has 6 linear layers",
        ),
        (
            "single_layer_single_block.py",
            ["--model", "no-such-org/no-such-model"],
            "HF_HUB_OFFLINE",
        ),
        (
            "single_layer_single_block.py",
            ["--model", "embedded", "--dataset", "wikitext2"],
            "cannot load WikiText-2",
        ),
    ],
)
def test_errors_from_the_command_line_have_no_traceback(script, extra, message, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / script),
            "--t",
            "2",
            "--seqlen",
            "16",
            "--b",
            "2",
            "--no_progress",
            "--output_dir",
            str(tmp_path),
            "--cache_dir",
            str(tmp_path / "c"),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, proc.stderr


@pytest.mark.parametrize(
    "script,argv,message",
    [
        ("single_layer_single_block", ["--chunkk", "2"], "unrecognized arguments: --chunkk 2"),
        (
            "single_layer_several_blocks",
            ["--dtype", "float8"],
            "argument --dtype: invalid choice: 'float8'",
        ),
        ("hessian_diagonal", ["--t", "4"], "unrecognized arguments: --t 4"),
        ("hessian_spectrum", ["--which", "top"], "argument --which: invalid choice: 'top'"),
        ("reproduce", ["--figure", "5"], "argument --figure: invalid choice: '5'"),
        ("reproduce", [], "the following arguments are required: --figure"),
    ],
)
def test_misspelt_or_malformed_flags_are_one_line(script, argv, message, capsys):
    import importlib

    with pytest.raises(SystemExit) as exc:
        cli.main(importlib.import_module(script).run, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and err.startswith("error: ")
        and message in err
        and "--help" in err
    ), err


def test_reproduce_checks_passed_on_flags_before_any_run(capsys, tmp_path):
    import reproduce

    # --t is a flag of the exact scripts (figures 1a-2) but not of hessian_diagonal.py (figures 3a, 3b)
    with pytest.raises(SystemExit) as exc:
        cli.main(
            reproduce.run, ["--figure", "all", "--quick", "--output_dir", str(tmp_path), "--t", "3"]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: unrecognized arguments: --t 3 (--t is a flag of single_layer_single_block.py, "
        "single_layer_several_blocks.py, several_layers_several_blocks.py, hessian_spectrum.py, not of this "
        "script) (see hessian_diagonal.py --help)"
    ), err
    assert not list(tmp_path.iterdir())  # no figure was computed


def test_spectrum_says_when_eigenvalues_did_not_converge(capsys, tmp_path):
    import hessian_spectrum

    q0 = "model.decoder.layers.0.self_attn.q_proj.weight"
    common = [
        "--params",
        q0,
        "--exact_below",
        "0",
        "--top_k",
        "2",
        "--output_dir",
        str(tmp_path),
        *FAST,
    ]
    meta = hessian_spectrum.run([*common, "--max_iter", "3", "--name", "short"])
    assert meta["converged"] == [
        False,
        False,
    ]  # 3 Lanczos passes cannot converge 2 pairs on 16,384 entries
    assert (
        "warning: 2 of 2 eigenvalues did not converge within --max_iter 3 passes"
        in capsys.readouterr().err
    )
    meta = hessian_spectrum.run([*common, "--tol", "1e-2", "--name", "long"])
    assert all(meta["converged"]) and "did not converge" not in capsys.readouterr().err


def test_hessian_diagonal_refuses_layer_name_with_all_layers(capsys, tmp_path):
    import hessian_diagonal

    with pytest.raises(
        SystemExit
    ) as exc:  # it used to be ignored silently: every layer was estimated
        cli.main(
            hessian_diagonal.run,
            ["--all_layers", "--layer_name", "fc1", "--output_dir", str(tmp_path), *FAST],
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "error: --layer_name fc1 picks one layer but --all_layers takes every linear layer: give one or the other"
    ), err
    assert not list(tmp_path.iterdir())


def test_settings_that_would_be_ignored_are_refused(capsys, tmp_path):
    """A --compare setting without --compare, and more eigenvalues than the subset has, are one line and exit 2."""
    import hessian_spectrum

    argv = [
        "--t",
        "4",
        "--seqlen",
        "16",
        "--b",
        "2",
        "--no_progress",
        "--output_dir",
        str(tmp_path),
    ]
    with pytest.raises(SystemExit) as exc:
        cli.main(
            single_layer_single_block.run, [*argv, "--fisher_samples", "8", "--compare_top_k", "2"]
        )
    assert exc.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: --fisher_samples, --compare_top_k only apply with --compare APPROX [APPROX ...]"
    )
    with pytest.raises(SystemExit) as exc:
        cli.main(hessian_spectrum.run, [*argv, "--top_k", "3", "--which", "both"])
    assert exc.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "--top_k 3 with --which both asks for 6 eigenvalues but the subset has only 4 entries"
        )
    )
    assert not list(tmp_path.glob("*.json"))
