"""``--device_map`` on the CPU with accelerate's CPU and disk offload (issue 16, item 4): a model whose blocks are
placed on ``cpu`` and ``disk`` gives bitwise the plain run's Hessian; a subset on a disk-offloaded block is refused."""

from __future__ import annotations

import json

import pytest
import torch
from cases import _tiny_opt  # a 2-block random OPT saved with the embedded tokenizer

import hessian_diagonal
import hessian_spectrum
import single_layer_single_block
from lib.app import cli
from lib.model.models import load_model

pytest.importorskip("accelerate")
MAP = {
    "model.decoder.embed_tokens": "cpu",
    "model.decoder.embed_positions": "cpu",
    "model.decoder.final_layer_norm": "cpu",
    "model.decoder.layers.0": "cpu",
    "model.decoder.layers.1": "disk",
    "lm_head": "cpu",
}
FLAGS = [
    "--dataset",
    "embedded",
    "--t",
    "8",
    "--b",
    "2",
    "--seqlen",
    "12",
    "--dtype",
    "float64",
    "--no_progress",
    "--name",
    "h",
    "--device",
    "cpu",
    "--chunk",
    "2",
]  # a fixed chunk: a measured one may differ between the runs (other bits)


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    return _tiny_opt(tmp_path_factory.mktemp("model") / "tiny-opt")


def test_cpu_and_disk_offload_equal_the_plain_run(tiny_opt, tmp_path):
    common = ["--model", str(tiny_opt), *FLAGS, "--cache_dir", str(tmp_path / "cache")]
    single_layer_single_block.run([*common, "--output_dir", str(tmp_path / "plain")])
    single_layer_single_block.run(
        [*common, "--output_dir", str(tmp_path / "mapped"), "--device_map", json.dumps(MAP)]
    )
    plain, mapped = (
        torch.load(tmp_path / "plain" / "h.pt"),
        torch.load(tmp_path / "mapped" / "h.pt"),
    )
    assert torch.equal(plain, mapped) and plain.abs().max() > 0
    model = load_model(
        str(tiny_opt), str(tmp_path / "cache"), torch.float64, device_map=json.dumps(MAP)
    )
    assert model.get_parameter(
        "model.decoder.layers.1.fc1.weight"
    ).is_meta  # block 1 is really on disk (read in the forward)
    assert not model.get_parameter("model.decoder.layers.0.fc1.weight").is_meta
    hessian_spectrum.run(
        [
            *common,
            "--output_dir",
            str(tmp_path / "fd"),
            "--device_map",
            json.dumps(MAP),
            "--hvp",
            "finite_difference",
            "--exact_below",
            "0",
            "--max_iter",
            "6",
            "--top_k",
            "1",
        ]
    )
    fd = json.loads((tmp_path / "fd" / "h.json").read_text())
    top = float(torch.linalg.eigvalsh(plain.double())[-1])
    assert abs(fd["eigenvalues"][0] - top) < 1e-6 * abs(
        top
    )  # finite differences on the split model too


def test_a_subset_on_a_disk_block_and_a_bad_map_are_refused(tiny_opt, tmp_path, capsys):
    common = [
        "--model",
        str(tiny_opt),
        *FLAGS,
        "--cache_dir",
        str(tmp_path / "cache"),
        "--output_dir",
        str(tmp_path),
    ]
    for extra, text in (
        (
            ["--block_index", "1", "--device_map", json.dumps(MAP)],
            "offloads model.decoder.layers.1.self_attn.q_proj.weight to disk",
        ),
        (["--device_map", "{not json"], "not a valid JSON object"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(single_layer_single_block.run, [*common, *extra])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and text in err and err.startswith("error: ") and "\n" not in err
    # the diagonal of a disk-offloaded block's layer is refused too
    diag = [
        "--model",
        str(tiny_opt),
        "--dataset",
        "embedded",
        "--b",
        "2",
        "--seqlen",
        "12",
        "--hvps",
        "2",
    ]
    diag += [
        "--dtype",
        "float64",
        "--no_progress",
        "--device",
        "cpu",
        "--cache_dir",
        str(tmp_path / "cache"),
    ]
    with pytest.raises(SystemExit) as e:
        cli.main(
            hessian_diagonal.run,
            [
                *diag,
                "--output_dir",
                str(tmp_path),
                "--block_index",
                "1",
                "--device_map",
                json.dumps(MAP),
            ],
        )
    err = capsys.readouterr().err.strip()
    assert (
        e.value.code == 2
        and "offloads model.decoder.layers.1.self_attn.q_proj.weight to disk" in err
    )
