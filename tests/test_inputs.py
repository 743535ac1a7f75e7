"""Guarantees on inputs (issue 12, items 1-3 and 11-14): the run uses the model and tokenizer it names,
complete and finite, refuses bad flags in one line, and fails fast and quietly when the hub is unreachable."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from cases import INPUTS_FAST as FAST
from cases import _fail, _tiny_opt, fake_hub
from conftest import ROOT

import several_layers_several_blocks
import single_layer_several_blocks
import single_layer_single_block
from lib.app import cli
from lib.model.data import tokenize
from lib.model.inputs import model_fingerprint, tokenizer_fingerprint
from lib.model.models import EMBEDDED_MODEL_DIR, ModelSpec, load_model
from lib.runtime import checkpoint as ckpt


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _tiny_opt(tmp_path_factory.mktemp("model") / "tiny-opt")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_weights(path, edit) -> None:
    """Rewrite ``path/model.safetensors`` as ``edit(state_dict)``."""
    from safetensors.torch import load_file, save_file

    sd = load_file(path / "model.safetensors")
    edit(sd)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


def _script(tmp_path, *argv) -> subprocess.CompletedProcess:
    """``single_layer_single_block.py`` in a fresh process (offline, one thread)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "single_layer_single_block.py"), *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


# ----------------------------------------------------------------------------- item 1: fingerprints


def test_fingerprint_is_content_based(tiny_dir, tmp_path):
    a, b = load_model(str(tiny_dir)), load_model(str(_copy(tiny_dir, tmp_path / "moved")))
    assert model_fingerprint(a) == model_fingerprint(b)  # where the files are does not matter
    w = a.get_parameter("model.decoder.layers.1.fc2.weight")
    w.view(-1)[7] = torch.nextafter(w.view(-1)[7], torch.tensor(1.0))  # one ulp in one weight
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(b.to(torch.float64)) != model_fingerprint(
        load_model(str(tiny_dir))
    )  # the dtype counts
    from lib.model.data import load_tokenizer

    tok = load_tokenizer(str(tiny_dir))
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(
        load_tokenizer("embedded")
    )  # same files, other place
    tok.add_tokens(["<new-token>"])
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(load_tokenizer("embedded"))


@pytest.mark.slow
def test_resume_refuses_a_model_changed_after_a_kill(tiny_dir, tmp_path):
    model_dir = _copy(tiny_dir, tmp_path / "m")
    argv = [
        "--model",
        str(model_dir),
        *FAST,
        "--output_dir",
        str(tmp_path / "out"),
        "--cache_dir",
        str(tmp_path / "c"),
        "--name",
        "r",
        "--checkpoint_every",
        "1",
    ]
    single_layer_single_block.run([*argv, "--keep_checkpoint"])
    meta = json.loads((tmp_path / "out" / "r.json").read_text())
    assert meta["fingerprints"]["model"] == model_fingerprint(load_model(str(model_dir)))
    assert re.fullmatch(r"[0-9a-f]{16}", meta["fingerprints"]["tokenizer"])
    # as if killed before the results were written, then a weight is edited in the model directory
    for f in ("r.pt", "r.json"):
        (tmp_path / "out" / f).unlink()
    _edit_weights(model_dir, lambda sd: sd["model.decoder.layers.0.fc1.weight"].mul_(1.001))
    proc = _script(tmp_path, *argv, "--resume")
    assert proc.returncode == 2, proc.stderr
    old, new = (
        meta["fingerprints"]["model"][:12],
        model_fingerprint(load_model(str(model_dir)))[:12],
    )
    assert proc.stderr.strip().splitlines() == [
        f"error: checkpoint {tmp_path / 'out' / 'r.ckpt'} was written for other inputs: the model's weights changed (fingerprint {old}.. -> {new}..); restore the original files, or delete it to start over"
    ]
    assert not (tmp_path / "out" / "r.pt").exists()


def test_checkpoint_names_a_changed_tokenizer(tmp_path):
    spec = ModelSpec("m", fingerprint="a" * 64, tokenizer_fingerprint="b" * 16)
    config = {"samples_sha256": "x", "model": spec.identity()}
    ckpt.save(tmp_path / "x.ckpt", ckpt.RunState(1), config)
    changed = {
        "samples_sha256": "y",
        "model": {**spec.identity(), "tokenizer_fingerprint": "c" * 16},
    }
    with pytest.raises(
        ckpt.UserError,
        match=r"the tokenizer changed \(fingerprint bbbbbbbbbbbb\.\. -> cccccccccccc\.\.\); the configuration also differs in: samples_sha256;",
    ):
        ckpt.load(tmp_path / "x.ckpt", changed, 1)


def test_worker_refuses_a_model_that_differs_from_the_parents(tiny_dir, tmp_path, monkeypatch):
    """A directory, and a hub revision (a commit of a local hub cache, as ``hessian_sweep.py --revisions`` workers
    load it): the parent's fingerprint is accepted, another refused in one line naming the revision."""
    fp = model_fingerprint(load_model(str(tiny_dir)))
    spec = ModelSpec(str(tiny_dir), fingerprint=fp)
    spec.load()  # the same files: accepted
    with pytest.raises(
        ckpt.UserError,
        match=r"loaded a different model .* \(fingerprint 000000000000 -> [0-9a-f]{12}\): its files changed during the run",
    ):
        ModelSpec(str(tiny_dir), fingerprint="0" * 64).load()
    commit = fake_hub(tmp_path, "org/tiny", {"step1": tiny_dir})["step1"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = ModelSpec("org/tiny", str(tmp_path), fingerprint=fp, revision=commit)
    assert model_fingerprint(hub.load()) == fp and hub.identity()["revision"] == commit
    with pytest.raises(ckpt.UserError) as e:
        dataclasses.replace(hub, fingerprint="0" * 64).load()
    assert str(e.value) == (
        f"this process loaded a different model 'org/tiny' at revision {commit} than the run started with "
        f"(fingerprint 000000000000 -> {fp[:12]}): its files changed during the run; rerun"
    )
    assert "revision" not in spec.identity()  # runs without a revision keep their identity


# ----------------------------------------------------------------------------- items 2 and 3: weights


def test_missing_weight_is_refused_before_any_computation(tiny_dir, tmp_path, capsys):
    model_dir = _copy(tiny_dir, tmp_path / "m")
    _edit_weights(
        model_dir,
        lambda sd: [
            sd.pop("model.decoder.layers.1.fc1.weight"),
            sd.pop("model.decoder.final_layer_norm.bias"),
        ],
    )
    err = _fail(["--model", str(model_dir), *FAST, "--output_dir", str(tmp_path / "out")], capsys)
    assert (
        "lacks 2 weight(s) that would be randomly initialised: model.decoder.final_layer_norm.bias, model.decoder.layers.1.fc1.weight"
        in err
    )
    assert not list(
        (tmp_path / "out").glob("*")
    )  # the output dir is validated (created) before loading, nothing is written


def test_mismatched_weight_is_refused(tiny_dir, tmp_path, capsys):
    model_dir = _copy(tiny_dir, tmp_path / "m")
    _edit_weights(
        model_dir, lambda sd: sd.__setitem__("model.decoder.layers.0.fc2.weight", torch.zeros(5, 5))
    )
    err = _fail(["--model", str(model_dir), *FAST, "--output_dir", str(tmp_path / "out")], capsys)
    assert (
        "1 weight(s) whose shape does not match its config.json: model.decoder.layers.0.fc2.weight"
        in err
    )


def test_unused_weights_warn_in_one_line_and_the_run_proceeds(tiny_dir, tmp_path, capsys):
    model_dir = _copy(tiny_dir, tmp_path / "m")
    _edit_weights(model_dir, lambda sd: sd.__setitem__("extra.scale", torch.ones(3)))
    meta = single_layer_single_block.run(
        ["--model", str(model_dir), *FAST, "--output_dir", str(tmp_path / "out")]
    )
    warnings = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")
    ]
    assert warnings == [
        f"warning: model {str(model_dir)!r}: 1 weight(s) of the checkpoint are not used by OPTForCausalLM and are ignored: extra.scale"
    ]
    assert meta["fingerprints"]["model"] == model_fingerprint(
        load_model(str(tiny_dir))
    )  # the same tensors are used


def test_tied_output_layer_is_not_missing(tiny_dir):
    model = load_model(
        str(tiny_dir)
    )  # OPT ties lm_head to the embeddings: not in the file, not refused
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_encoder_only_model_is_refused(tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    BertForMaskedLM(
        BertConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=4096,
        )
    ).save_pretrained(tmp_path / "bert")
    shutil.copy(EMBEDDED_MODEL_DIR / "tokenizer.json", tmp_path / "bert")
    assert _fail(
        ["--model", str(tmp_path / "bert"), *FAST, "--output_dir", str(tmp_path / "out")], capsys
    ) == (
        f"error: model {str(tmp_path / 'bert')!r} is not a causal language model: its config.json lists BertForMaskedLM; loading it as BertLMHeadModel would use an untrained or wrong output layer. Use a causal LM (e.g. *ForCausalLM)"
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused_at_load_and_named(tiny_dir, tmp_path, capsys, value):
    model_dir = _copy(tiny_dir, tmp_path / "m")
    _edit_weights(
        model_dir,
        lambda sd: sd["model.decoder.layers.1.self_attn.v_proj.weight"].view(-1)[3:5].fill_(value),
    )
    err = _fail(["--model", str(model_dir), *FAST, "--output_dir", str(tmp_path / "out")], capsys)
    assert (
        err
        == "error: the model's weight model.decoder.layers.1.self_attn.v_proj.weight has 2 non-finite (NaN or Inf) values out of 256; the checkpoint is corrupt"
    )


# ----------------------------------------------------------------------------- item 11: flags


@pytest.mark.parametrize(
    "script,extra,message",
    [
        (
            single_layer_several_blocks,
            ["--num_blocks", "0"],
            "error: --num_blocks must be at least 1, got 0 (leave it out to use all)",
        ),
        (
            several_layers_several_blocks,
            ["--num_layers", "0"],
            "error: --num_layers must be at least 1, got 0 (leave it out to use all)",
        ),
        (
            several_layers_several_blocks,
            ["--num_blocks", "-1"],
            "error: --num_blocks must be at least 1, got -1 (leave it out to use all)",
        ),
        (
            single_layer_single_block,
            ["--devices", ""],
            "error: --devices '' has an empty entry; give e.g. cuda:0,cuda:1 or cpu,cpu",
        ),
        (
            single_layer_single_block,
            ["--seed", str(2**64)],
            f"error: --seed {2**64} is out of range: use an integer from -2**63 to 2**64-1",
        ),
    ],
    ids=["num_blocks0", "num_layers0", "num_blocks-1", "devices-empty", "seed-huge"],
)
def test_bad_flags_are_refused_in_one_line(script, extra, message, tmp_path, capsys):
    assert _fail([*FAST, "--output_dir", str(tmp_path / "out"), *extra], capsys, script) == message
    assert not list(
        (tmp_path / "out").glob("*")
    )  # the output dir is validated (created) before loading, nothing is written


# ----------------------------------------------------------------------------- item 12: messages that mislead


def test_model_directory_without_tokenizer_is_named(tmp_path, capsys):
    model_dir = _tiny_opt(tmp_path / "m", tokenizer=False)
    err = _fail(["--model", str(model_dir), *FAST, "--output_dir", str(tmp_path / "out")], capsys)
    assert err.startswith(
        f"error: model directory {model_dir} has no tokenizer (none of tokenizer.json, "
    )


@pytest.mark.parametrize("damaged", ["config.json", "model.safetensors"])
def test_corrupt_model_files_are_named_without_the_offline_hint(
    tiny_dir, tmp_path, capsys, damaged
):
    model_dir = _copy(tiny_dir, tmp_path / "m")
    data = (model_dir / damaged).read_bytes()
    (model_dir / damaged).write_bytes(data[: len(data) // 3])  # truncated
    err = _fail(["--model", str(model_dir), *FAST, "--output_dir", str(tmp_path / "out")], capsys)
    expected = (
        f"error: {model_dir / 'config.json'} is corrupt: not valid JSON ("
        if damaged == "config.json"
        else f"error: cannot load model directory {model_dir} (SafetensorError: "
    )
    assert err.startswith(expected) and "HF_HUB_OFFLINE" not in err, err


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_bad_cache_dir_is_one_line(tmp_path, capsys, kind):
    bad = tmp_path / "cache"
    if kind == "file":
        bad.write_text("x")
        message = f"error: --cache_dir {bad} is a file, not a directory"
    else:
        if os.geteuid() == 0:
            pytest.skip("root can write anywhere")
        bad.mkdir()
        bad.chmod(0o500)
        message = f"error: --cache_dir {bad} is not writable"
    assert (
        _fail([*FAST, "--cache_dir", str(bad), "--output_dir", str(tmp_path / "out")], capsys)
        == message
    )


def test_corrupt_token_cache_is_detected_and_rebuilt(tmp_path, capsys):
    from lib.model.data import EMBEDDED_TEXT, load_tokenizer

    tok, text = load_tokenizer("embedded"), EMBEDDED_TEXT.read_text()[:2000]
    ids = tokenize(tok, text, str(tmp_path))
    (cached,) = (tmp_path / "tokenized").glob("*.pt")
    for damage in (
        lambda b: b[: len(b) // 2],
        lambda b: b.replace(ids[5].numpy().tobytes(), (ids[5] + 1).numpy().tobytes(), 1),
    ):
        cached.write_bytes(damage(cached.read_bytes()))
        assert torch.equal(tokenize(tok, text, str(tmp_path)), ids)
        assert (
            capsys.readouterr().err.strip()
            == f"warning: the tokenized-text cache {cached} is corrupt; tokenizing again"
        )
        assert (
            torch.equal(tokenize(tok, text, str(tmp_path)), ids) and not capsys.readouterr().err
        )  # rebuilt


# ----------------------------------------------------------------------------- item 13: hub unreachable


UNTIL_ERROR = """
import sys, time
sys.path.insert(0, {root!r})
from transformers import AutoModelForCausalLM, AutoTokenizer  # imports first: a loaded machine slows them, not the run
from datasets import load_dataset
import single_layer_single_block
from lib.app import cli
t0 = time.perf_counter()
try:
    cli.main(single_layer_single_block.run, {argv!r})
finally:
    print(f"elapsed {{time.perf_counter() - t0:.3f}}")
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model", "no-such-org/no-such-model"], "cannot load model 'no-such-org/no-such-model'"),
        (["--dataset", "wikitext2"], "cannot load WikiText-2"),
    ],
    ids=["hub-model", "wikitext2"],
)
def test_unreachable_hub_fails_fast_in_one_line(tmp_path, extra, message):
    """Without HF_HUB_OFFLINE, and no route to the hub (as on this machine): no retries (about 25 s of them
    before), one line on stderr. The time is taken from after the imports, in the child."""
    from lib.model.inputs import hub_reachable

    if hub_reachable():
        pytest.skip("the hub is reachable from here")
    argv = [
        *FAST,
        "--output_dir",
        str(tmp_path / "out"),
        "--cache_dir",
        str(tmp_path / "c"),
        *extra,
    ]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    code = UNTIL_ERROR.format(root=str(ROOT), argv=argv)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**env, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    elapsed = float(proc.stdout.split()[-1])
    assert elapsed < 10, elapsed


# ----------------------------------------------------------------------------- item 14: low precision


def test_low_precision_dtype_warns_in_one_line(tiny_dir, tmp_path, capsys):
    single_layer_single_block.run(
        [
            "--model",
            str(tiny_dir),
            *FAST,
            "--dtype",
            "bfloat16",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    warnings = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")
    ]
    assert warnings == [f"warning: --dtype bfloat16: {cli.LOW_PRECISION_NOTE['bfloat16']}"]
    single_layer_single_block.run(
        [
            "--model",
            str(tiny_dir),
            *FAST,
            "--dtype",
            "float32",
            "--output_dir",
            str(tmp_path / "out32"),
        ]
    )
    assert "warning:" not in capsys.readouterr().err
