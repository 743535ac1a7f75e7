"""One name per concept (the flag's) in library, flags and JSON: ``hvps``, ``chunk``, ``num_blocks``,
``num_layers``; the old library keywords warn once, old result files stay readable, and the spec digests (default
output names, checkpoint identity) are those of the code before the rename."""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch
from conftest import tiny_ids, tiny_model

import lib
from lib import deprecation
from lib.app import cli
from lib.app.results import load_result
from lib.commands import COMMANDS
from lib.errors import ParamError


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(deprecation, "_WARNED", set())


def test_old_keywords_give_the_same_result_and_warn_once(fresh_warnings):
    model = tiny_model("opt")
    new = lib.several_layers_several_blocks(model, num_layers=2, num_blocks=2, t=3)
    with pytest.warns(DeprecationWarning, match="'n_blocks' is deprecated; use 'num_blocks'"):
        old = lib.several_layers_several_blocks(model, n_layers=2, n_blocks=2, t=3)
    assert [(s.param_name, s.flat_index.tolist()) for s in old.slices] == [
        (s.param_name, s.flat_index.tolist()) for s in new.slices
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        lib.several_layers_several_blocks(model, n_layers=2, n_blocks=2, t=3)
    with pytest.raises(TypeError, match="both 'n_blocks' and its new name 'num_blocks'"):
        lib.single_layer_several_blocks(model, "fc1", n_blocks=1, num_blocks=1, t=2)


def test_the_diagonal_takes_hvps_and_chunk_and_its_old_keywords(fresh_warnings):
    model, ids = tiny_model("opt"), tiny_ids(b=2, seqlen=6)
    name = "model.decoder.layers.0.self_attn.q_proj.weight"
    target = lib.Target(name, tuple(model.get_parameter(name).shape))
    kw = dict(estimators=("hutchinson",), seed=3)
    new = lib.hessian_diagonal(model, [target], ids, hvps=4, chunk=2, **kw)
    with pytest.warns(DeprecationWarning, match="'vhp_samples' is deprecated; use 'hvps'"):
        old = lib.hessian_diagonal(model, [target], ids, vhp_samples=4, probe_batch=2, **kw)
    assert torch.equal(old.diagonals["hutchinson"][name], new.diagonals["hutchinson"][name])
    assert new.hvps == 4 and new.hvps_per_sample == {"hutchinson": 4}
    assert new.chunk["1"] == {"chunk": 2, "measured": False}
    with pytest.warns(DeprecationWarning, match="'vhp_samples' is deprecated; use 'hvps'"):
        assert new.vhp_samples == 4


def test_library_errors_name_the_new_parameters_and_the_scripts_the_flags():
    model = tiny_model("opt")
    with pytest.raises(ParamError) as e:
        lib.single_layer_several_blocks(model, "fc1", 3, 4)
    assert e.value.param == "num_blocks" and e.value.message.startswith(
        "num_blocks 3 is out of range"
    )
    assert cli.flag_message(e.value).startswith("--num_blocks 3 is out of range")
    with pytest.raises(ParamError) as e:
        lib.xdiag_basis(torch.zeros(2, 5, dtype=torch.float64))
    assert cli.flag_message(e.value).endswith(
        "smaller than --hvps/2; use the exact estimator or fewer HVPs"
    )


def test_a_result_written_with_the_old_keys_reads_with_the_new(tmp_path):
    torch.save(torch.ones(3), tmp_path / "d.pt")
    sha = hashlib.sha256((tmp_path / "d.pt").read_bytes()).hexdigest()
    old = {
        "files": {"tensor": "d.pt", "json": "d.json"},
        "outputs": {"d.pt": sha},
        "vhp_samples": 6,
        "hvps_per_sample": {"xdiag": 6},
        "probe_batch": {"1": {"probe_batch": "auto", "measured": None}},
    }
    (tmp_path / "d.json").write_text(json.dumps(old))
    meta, tensor = load_result(tmp_path / "d.json")
    assert torch.equal(tensor, torch.ones(3))
    assert (
        meta["hvps"] == 6 and "vhp_samples" not in meta and meta["hvps_per_sample"] == {"xdiag": 6}
    )
    assert meta["chunk"] == {"1": {"chunk": "auto", "measured": None}} and "probe_batch" not in meta


# digests computed by the code before the rename (commit 2c4dae3): the default output names and the
# checkpoints' identity of existing configurations must not change
DIGESTS = [
    ("single_layer_single_block", [], "c78fb43f"),
    ("single_layer_several_blocks", [], "bdbd89fd"),
    ("several_layers_several_blocks", [], "029189a9"),
    ("hessian_diagonal", [], "032d4221"),
    ("hessian_spectrum", [], "13306d53"),
    ("hessian_sweep", [], "102c302e"),
    ("hessian_diagonal", ["--hvps", "6", "--chunk", "4", "--estimator", "hutchinson"], "3983b6d1"),
    (
        "hessian_diagonal",
        ["--vhp_samples", "6", "--probe_batch", "4", "--estimator", "hutchinson"],
        "3983b6d1",
    ),
    ("hessian_spectrum", ["--num_blocks", "2", "--chunk", "3"], "8b16dd4a"),
    ("single_layer_several_blocks", ["--num_blocks", "2"], "5c42ae73"),
]


@pytest.mark.parametrize("script,argv,digest", DIGESTS)
def test_the_spec_digests_are_unchanged(script, argv, digest):
    assert COMMANDS[script].spec(argv).digest() == digest


def test_errors_naming_several_parameters_read_as_flags_on_the_command_line(monkeypatch):
    """The library names parameters (``cache_dir``, ``dataset``, ``model``, ``resume``); the scripts' messages are
    those they printed before, with the flags."""
    import sys
    import types

    from lib.model import data

    def unreachable(*a, **k):
        raise ConnectionError("no route to {host}")

    monkeypatch.setattr(data, "hub_offline_if_unreachable", lambda: None)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    with pytest.raises(ParamError) as e:
        data.load_text("wikitext2")
    start = "cannot load WikiText-2 (wikitext-2-raw-v1, test split) through `datasets`: ConnectionError: no route to {host}. "
    assert str(e.value) == start + (
        "Without internet, set HF_DATASETS_OFFLINE=1 with a filled cache_dir, or pass dataset PATH to a local "
        "UTF-8 text file (or dataset embedded)."
    )
    assert cli.flag_message(e.value) == start + (
        "Without internet, set HF_DATASETS_OFFLINE=1 with a filled --cache_dir, or pass --dataset PATH to a "
        "local UTF-8 text file (or --dataset embedded)."
    )
    e2 = ParamError(
        "resume",
        template="pass log {x} exists; pass {resume} to continue it".replace("{x}", "a{{b}}"),
    )
    assert str(e2) == "pass log a{b} exists; pass resume to continue it"
    assert cli.flag_message(e2) == "pass log a{b} exists; pass --resume to continue it"
    import pickle

    again = pickle.loads(pickle.dumps(e2))  # between processes and torchrun ranks
    assert (again.param, again.message, again.template) == (e2.param, e2.message, e2.template)


def test_the_bundled_fig3a_result_written_before_the_rename_reads_with_the_new_keys():
    from pathlib import Path

    meta, _ = load_result(Path(__file__).resolve().parent.parent / "pdf" / "fig3a_embedded.json")
    assert meta["hvps"] == 200 and "vhp_samples" not in meta
    assert all("chunk" in r and "probe_batch" not in r for r in meta["chunk"].values())
