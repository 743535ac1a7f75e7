"""A wrong subset is refused from the weights on disk before torch is imported, with the messages of the checks
on the module tree (lib.objective.subsets), which stay the oracle."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cases import fake_hub
from conftest import ROOT, tiny_model

from lib.app import early_checks
from lib.errors import ParamError
from lib.model.models import EMBEDDED_MODEL_DIR, find_blocks, linear_layers
from lib.objective import subsets

ARCHS4 = ("opt", "llama", "gpt2", "qwen2")


@pytest.mark.parametrize("arch", ARCHS4)
def test_the_known_layouts_are_the_module_trees(arch):
    model = tiny_model(arch)
    prefix, blocks = find_blocks(model)
    kind = model.config.model_type
    assert [n for n, _ in linear_layers(blocks[0])] == list(early_checks.LINEAR_LAYERS[kind])
    assert prefix.endswith(early_checks.BLOCKS[kind])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny architecture saved as a Hugging Face folder (config.json + model.safetensors)."""
    out = {}
    for arch in ARCHS4:
        d = tmp_path_factory.mktemp(arch)
        tiny_model(arch).save_pretrained(d)
        out[arch] = d
    return out


def message(fn) -> str | None:
    try:
        fn()
    except ParamError as e:
        return f"{e.param}: {e}"
    return None


CASES = [  # (subset function of lib.objective.subsets, its arguments, the same fields for check_subset)
    (
        subsets.single_layer_single_block,
        ("q_prj", 0, 4),
        dict(layer_name="q_prj", block_index=0, t=4),
    ),
    (
        subsets.single_layer_single_block,
        ("LAYER", 2, 4),
        dict(layer_name="LAYER", block_index=2, t=4),
    ),
    (
        subsets.single_layer_single_block,
        ("LAYER", 1, 17),
        dict(layer_name="LAYER", block_index=1, t=17),
    ),
    (
        subsets.single_layer_single_block,
        ("LAYER", 1, 16),
        dict(layer_name="LAYER", block_index=1, t=16),
    ),
    (
        subsets.single_layer_several_blocks,
        ("LAYER", 3, 4),
        dict(layer_name="LAYER", num_blocks=3, t=4),
    ),
    (subsets.several_layers_several_blocks, (9, 2, 4), dict(num_layers=9, num_blocks=2, t=4)),
    (subsets.several_layers_several_blocks, (2, 2, 40), dict(num_layers=2, num_blocks=2, t=40)),
    (subsets.several_layers_several_blocks, (2, 2, 8), dict(num_layers=2, num_blocks=2, t=8)),
]


@pytest.mark.parametrize("arch", ARCHS4)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_refusals_from_disk_equal_the_module_tree_checks(arch, case, saved):
    model = tiny_model(arch)
    layer = early_checks.LINEAR_LAYERS[model.config.model_type][0]
    fn, args, fields = CASES[case]
    args = tuple(layer if a == "LAYER" else a for a in args)
    fields = {k: layer if v == "LAYER" else v for k, v in fields.items()}
    found = early_checks.layout(str(saved[arch]), None)
    assert found is not None and found.n_blocks == 2
    expected = message(lambda: fn(model, *args))
    assert message(lambda: early_checks.check_subset(found, **fields)) == expected
    if case in (0, 1, 2, 4, 5, 6):
        assert expected is not None  # the cases that must fail do


def test_a_layout_it_cannot_confirm_is_not_checked(saved, tmp_path):
    assert early_checks.layout(str(tmp_path), None) is None  # no config
    d = saved["opt"]
    config = json.loads((d / "config.json").read_text())
    for change, name in (
        (dict(model_type="bloom"), "unknown"),
        (dict(num_hidden_layers=3), "more_blocks"),
        (dict(num_hidden_layers=1), "fewer_blocks"),
    ):
        other = tmp_path / name
        other.mkdir()
        (other / "config.json").write_text(json.dumps({**config, **change}))
        (other / "model.safetensors").symlink_to(d / "model.safetensors")
        assert early_checks.layout(str(other), None) is None, name
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(config))  # weights as .bin only: nothing to read
    assert early_checks.layout(str(bare), None) is None


def test_a_hub_id_is_found_in_the_cache(saved, tmp_path):
    fake_hub(tmp_path, "org/tiny", {"main": saved["llama"]})
    found = early_checks.layout("org/tiny", str(tmp_path))
    assert found is not None and found.model_type == "llama"
    assert early_checks.layout("org/other", str(tmp_path)) is None
    assert early_checks.model_directory("embedded", None) == EMBEDDED_MODEL_DIR


def test_the_script_refuses_before_importing_torch(saved):
    code = (
        "import sys\n"
        "from lib.commands import single_layer_single_block as c\n"
        "from lib.errors import UserError\n"
        "try:\n"
        f"    c.run(['--model', {str(saved['opt'])!r}, '--layer_name', 'self_attn.q_prj', '--b', '1'])\n"
        "except UserError as e:\n"
        "    print(e)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert "did you mean 'self_attn.q_proj'?" in out.stdout, out.stdout + out.stderr
    assert "torch imported: False" in out.stdout
