"""The JSON's ``config`` describes only what the run used (issue 27 item 5): a ``--params`` spectrum run lists no
row subset (layer, block, t), and files written before still read the same way."""

from __future__ import annotations

import json

import hessian_spectrum
from lib.app import results
from lib.app.spec import ROW_SUBSET_FIELDS, used_config

ARGS = ["--b", "1", "--seqlen", "8", "--top_k", "2", "--no_progress"]


def test_a_params_run_lists_only_its_params_and_old_files_read_the_same(tmp_path):
    name = "model.decoder.layers.0.self_attn.q_proj.bias"
    meta = hessian_spectrum.run([*ARGS, "--params", name, "--output_dir", str(tmp_path)])
    js = tmp_path / meta["files"]["json"]
    config = json.loads(js.read_text())["config"]
    assert config["subset"] == {"params": [name]}
    assert meta["spec_digest"] == json.loads(js.read_text())["spec_digest"]
    # a file of before: the unused defaults listed; the reader gives the same config
    old = json.loads(js.read_text())
    old["config"]["subset"] = {
        "layer_name": "self_attn.q_proj",
        "block_index": 0,
        "num_blocks": None,
        "num_layers": None,
        "t": 128,
        "params": [name],
    }
    js.write_text(json.dumps(old))
    assert results.run_config(results.verify_result(js)) == config


def test_a_row_subset_run_keeps_its_fields(tmp_path):
    meta = hessian_spectrum.run([*ARGS, "--t", "4", "--output_dir", str(tmp_path)])
    subset = json.loads((tmp_path / meta["files"]["json"]).read_text())["config"]["subset"]
    assert subset["layer_name"] == "self_attn.q_proj" and subset["t"] == 4
    assert subset["block_index"] == 0 and subset["params"] is None
    assert results.run_config({"config": {"subset": subset}}) == {"subset": subset}


def test_used_config_is_pure_and_leaves_other_sections():
    config = {
        "family": "spectrum",
        "subset": {**{k: 1 for k in ROW_SUBSET_FIELDS}, "params": ["*"]},
        "data": {"b": 2},
    }
    before = json.dumps(config)
    assert used_config(config) == {
        "family": "spectrum",
        "subset": {"params": ["*"]},
        "data": {"b": 2},
    }
    assert json.dumps(config) == before
    assert used_config({"subset": {"layer_name": "fc1", "all_layers": False}}) == {
        "subset": {"layer_name": "fc1", "all_layers": False}
    }
