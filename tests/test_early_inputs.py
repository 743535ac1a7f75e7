"""The checks that need no weights run before torch is imported (issue 27 item 4): ``--seqlen`` against the config's
positions, ``--b``, a missing ``--dataset`` file and output-name conflicts, with the messages of the checks after the
load (the pipeline's, which stay the oracle)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

import single_layer_single_block
from lib import commands
from lib.app import early_checks
from lib.errors import UserError

BASE = ["--t", "2", "--no_progress"]


def _refusal(argv: list[str]) -> str:
    with pytest.raises(UserError) as e:
        single_layer_single_block.run([*BASE, *argv])
    return str(e.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["--b", "0"],
        ["--seqlen", "1"],
        ["--seqlen", "513"],  # the embedded model's config: 512 positions
        ["--dataset", "no/such/file.txt"],
        ["--name", "a/b"],
        ["--output_dir", "README.md"],
    ],
    ids=["b0", "seqlen1", "seqlen_positions", "dataset", "name", "output_dir_file"],
)
def test_early_refusals_equal_the_pipelines_messages(argv, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    early = _refusal(argv)
    monkeypatch.setattr(commands, "check_inputs_on_disk", lambda spec: None)
    assert _refusal(argv) == early


def test_a_finished_result_of_an_explicit_name_is_refused_early_as_the_claim_does(
    tmp_path, monkeypatch
):
    out = ["--b", "1", "--seqlen", "8", "--output_dir", str(tmp_path), "--name", "h"]
    (tmp_path / "h.json").write_text("{}")
    early = _refusal(out)
    assert "--skip_existing" in early and "--overwrite" in early
    monkeypatch.setattr(commands, "check_inputs_on_disk", lambda spec: None)
    assert _refusal(out) == early
    early_checks.check_outputs(str(tmp_path), "h", overwrite=True, skip_existing=False)
    early_checks.check_outputs(str(tmp_path), "h", overwrite=False, skip_existing=True)
    early_checks.check_outputs(str(tmp_path), None, overwrite=False, skip_existing=False)


def test_more_samples_than_the_text_can_hold_are_refused_early_and_later(monkeypatch):
    """388,217 bytes hold at most 388,233 tokens: 3,033 samples of 128; the tokens (133,812) hold 1,045."""
    early = _refusal(["--b", "4000", "--seqlen", "128"])
    assert early == (
        "--b 4000 needs 512000 tokens but the text shakespeare-heldout.txt (388217 bytes) has at most 388233 "
        "tokens: at most 3033 samples of seqlen 128 exist"
    )
    monkeypatch.setattr(commands, "check_inputs_on_disk", lambda spec: None)
    assert "only 1045 samples of seqlen 128 exist" in _refusal(["--b", "4000", "--seqlen", "128"])
    # a b between the tokens and the bytes passes the early check; the pipeline refuses it
    early_checks.check_data("embedded", None, "auto", 128, 2000, 2048)


def test_the_bound_holds_for_a_byte_level_tokenizer_on_any_text(tmp_path):
    """The early bound (one token per byte, plus slack) is never below the real count, on a text of many scripts."""
    from lib.model.data import load_tokenizer, tokenize

    text = "Ünïcödé ∑ 漢字 emoji 🤖 tabs\t\tand\n\nnewlines " * 50 + "x" * 300
    n = tokenize(load_tokenizer("embedded"), text).numel()
    assert n <= len(text.encode()) + early_checks.SPECIAL_TOKENS_SLACK


def test_config_positions_and_the_default_dataset(tmp_path):
    assert early_checks.max_positions({"max_position_embeddings": 2048}) == 2048  # OPT-125M
    assert early_checks.max_positions({"n_positions": 1024}) == 1024  # GPT-2
    assert early_checks.max_positions({"text_config": {"max_position_embeddings": 7}}) == 7
    assert early_checks.max_positions({}) is None
    assert early_checks.config_positions("embedded", None) == 512
    assert early_checks.config_positions(str(tmp_path), None) is None
    assert early_checks.text_file("auto", "org/any") is None  # WikiText-2: through `datasets`
    assert early_checks.text_file("auto", "embedded").name == "shakespeare-heldout.txt"


def test_the_input_checks_run_before_torch_is_imported(tmp_path):
    code = (
        "import sys\n"
        "from lib.commands import single_layer_single_block as c\n"
        "from lib.errors import UserError\n"
        "for argv in (['--b', '0'], ['--dataset', 'missing.txt'], ['--seqlen', '600'], ['--b', '99999']):\n"
        "    try:\n"
        "        c.run(argv)\n"
        "    except UserError as e:\n"
        "        print(e)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    lines = out.stdout.splitlines()
    assert len(lines) == 5 and lines[-1] == "torch imported: False", out.stdout + out.stderr
    assert lines[0] == "--b must be at least 1, got 0" and "--dataset 'missing.txt'" in lines[1]
    assert "--seqlen 600 exceeds" in lines[2] and "--b 99999 needs" in lines[3]


def test_a_rerun_under_the_default_name_is_refused_before_torch_as_the_claim_does(
    tmp_path, monkeypatch
):
    out = ["--b", "1", "--seqlen", "8", "--output_dir", str(tmp_path)]
    meta = single_layer_single_block.run([*BASE, *out])
    assert meta["files"]["json"].endswith(f"_{meta['spec_digest']}.json")
    early = _refusal(out)
    assert early.startswith(f"{tmp_path / meta['files']['json']} holds a finished result")
    monkeypatch.setattr(commands, "check_inputs_on_disk", lambda spec: None)
    assert _refusal(out) == early
    # another configuration (another digest) or another script's file is not this run's result
    assert early_checks.finished_default(tmp_path, "single_layer_single_block", "0" * 8) is None
    assert early_checks.finished_default(tmp_path, "hessian_spectrum", meta["spec_digest"]) is None
    js = tmp_path / meta["files"]["json"]
    assert (
        early_checks.finished_default(tmp_path, "single_layer_single_block", meta["spec_digest"])
        == js
    )
