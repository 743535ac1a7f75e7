"""What a newcomer hits (issue 18): typo suggestions, and diagonality shares per block and per layer type."""

from __future__ import annotations

import pytest
import torch

import single_layer_several_blocks
from lib.app.suggest import did_you_mean, glob_suggestion, unknown_flags_hint
from lib.errors import UserError
from lib.hessian import diagonality
from lib.model.models import load_model
from lib.objective import subsets


def test_misspelt_flag_gets_a_suggestion(capsys):
    with pytest.raises(SystemExit) as e:
        single_layer_several_blocks.parser().parse_args(["--num_block", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "unrecognized arguments: --num_block 2" in err and "did you mean --num_blocks?" in err


def test_suggestions_are_close_matches_only():
    assert (
        did_you_mean("self_attn.qproj", ["self_attn.q_proj", "self_attn.k_proj", "fc1"])
        == " (did you mean 'self_attn.q_proj'?)"
    )
    assert did_you_mean("zzz", ["self_attn.q_proj"]) == ""
    names = ["model.decoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.0.fc1.weight"]
    assert "layers.0.self_attn.q_proj.weight" in glob_suggestion(
        "model.decoder.layers.0.self_attn.qproj*", names
    )
    assert (
        unknown_flags_hint("unrecognized arguments: --sedd=3", ["--seed", "--b"])
        == " (did you mean --seed?)"
    )
    assert unknown_flags_hint("argument --b: invalid int value", ["--seed"]) == ""


def test_layer_name_and_params_typos_get_suggestions():
    model = load_model("embedded")
    with pytest.raises(UserError, match=r"did you mean 'self_attn.q_proj'\?"):
        subsets.single_layer_single_block(model, "self_attn.qproj", 0, 4)
    with pytest.raises(
        UserError, match=r"did you mean 'model.decoder.layers.0.self_attn.q_proj.weight'"
    ):
        subsets.params_subset(model, ["model.decoder.layers.0.self_attn.qproj.weight"])


def test_block_and_layer_type_shares_on_a_hand_made_matrix():
    # slices: b0 q, b0 k, b1 q, b1 k, one entry each; H's squared entries give the slice-pair mass directly
    h = torch.tensor(
        [[1.0, 2.0, 0.0, 0.0], [2.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]],
        dtype=torch.float64,
    )
    names = [
        f"model.decoder.layers.{b}.self_attn.{t}_proj.weight" for b in (0, 1) for t in ("q", "k")
    ]
    d = diagonality.summary(
        h, [1, 1, 1, 1], ["b0 q_proj", "b0 k_proj", "b1 q_proj", "b1 k_proj"], names
    )
    total = (
        4 + 4 * 2 + 1 * 2
    )  # diagonal 4, the (q0, k0) pair 4 each side, the (k0, k1) pair 1 each side
    assert d["block_diag_share_fro2"] == pytest.approx(4 / total)
    assert d["same_block_share_fro2"] == pytest.approx((4 + 8) / total)
    assert d["same_layer_type_share_fro2"] == pytest.approx((4 + 2) / total)
    assert d["layer_type_pair_share_fro2"] == pytest.approx(
        {"k_proj x q_proj": 8 / total, "k_proj x k_proj": 4 / total, "q_proj x q_proj": 2 / total}
    )
    line = diagonality.one_line(d)
    assert "same-block squares 0.857" in line and "k_proj x q_proj 0.571" in line
    assert diagonality.slice_keys("lm_head.weight") == (None, "lm_head")
    assert diagonality.slice_keys("transformer.h.11.attn.c_attn.weight") == ("11", "c_attn")


def test_titles_summary_and_json_name_what_was_computed_on(tmp_path, monkeypatch, capsys):
    import hashlib
    import json

    import single_layer_single_block
    from lib.app import plots

    titles = []
    save = plots._save

    def grab(fig, path_stem):
        titles.append(fig._suptitle.get_text())
        return save(fig, path_stem)

    monkeypatch.setattr(plots, "_save", grab)
    text = (
        "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. "
        * 20
    )
    data = tmp_path / "my_text.txt"
    data.write_text(text, encoding="utf-8")
    fast = ["--t", "2", "--b", "1", "--seqlen", "8", "--no_progress", "--output_dir", str(tmp_path)]
    own = single_layer_single_block.run([*fast, "--dataset", str(data), "--name", "own"])
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert own["computed_on"] == {
        "model": "embedded",
        "dataset": "my_text.txt",
        "dataset_flag": str(data),
        "dataset_sha256": digest,
        "dtype": "float32",
        "b": 1,
        "seqlen": 8,
    }
    low = single_layer_single_block.run(
        [*fast, "--dtype", "bfloat16", "--name", "low", "--label", "sweep-3"]
    )
    assert (
        low["computed_on"]["dataset"] == "shakespeare-heldout.txt"
        and low["computed_on"]["dtype"] == "bfloat16"
    )
    assert json.loads((tmp_path / "low.json").read_text())["computed_on"]["label"] == "sweep-3"
    out = capsys.readouterr().out
    assert f"computed on embedded, data my_text.txt ({digest[:8]}), float32, b=1, seqlen=8" in out
    assert "bfloat16" in out and "[sweep-3]" in out
    own_title, low_title = titles[0].replace("\n", " "), titles[-1].replace("\n", " ")
    assert (
        "my_text.txt" in own_title
        and digest[:8] in own_title
        and "float32" in own_title
        and "b=1" in own_title
    )
    assert (
        "bfloat16" in low_title
        and "shakespeare-heldout.txt" in low_title
        and "sweep-3" in low_title
    )
    assert own_title != low_title


def test_skip_existing_exits_0_on_a_verified_finished_result_and_refuses_anything_else(
    tmp_path, monkeypatch, capsys
):
    import single_layer_single_block
    from lib.app import cli, pipeline

    args = ["--t", "2", "--b", "1", "--seqlen", "8", "--no_progress", "--output_dir", str(tmp_path)]
    first = single_layer_single_block.run([*args, "--name", "a"])
    single_layer_single_block.run([*args, "--t", "3", "--name", "b"])
    capsys.readouterr()

    def rerun(*extra):
        with pytest.raises(SystemExit) as e:
            cli.main(
                lambda argv: (single_layer_single_block.run(argv), exit(0))[1], [*args, *extra]
            )
        return e.value.code, capsys.readouterr()

    monkeypatch.setattr(
        pipeline,
        "load_model",
        lambda *a, **k: (_ for _ in ()).throw(AssertionError("the model was loaded")),
    )
    code, out = rerun("--name", "a", "--skip_existing")
    assert (
        code == 0
        and out.out
        == f"skipped: {tmp_path / 'a.json'} holds this configuration's finished result (its files match their SHA-256)\n"
    )
    code, out = rerun("--name", "a")  # the default still refuses a rerun
    assert code == 2 and "holds a finished result; pass --overwrite" in out.err
    code, out = rerun(
        "--name", "a", "--t", "3", "--skip_existing"
    )  # another configuration under the same name
    assert code == 2 and "holds the result of another configuration" in out.err
    code, out = rerun("--name", "a", "--skip_existing", "--overwrite")
    assert code == 2 and "give one or the other" in out.err
    (tmp_path / first["files"]["tensor"]).write_bytes(
        (tmp_path / "b.pt").read_bytes()
    )  # another run's tensor
    code, out = rerun("--name", "a", "--skip_existing")
    assert code == 2 and out.err.startswith(
        f"error: {tmp_path / 'a.pt'} does not match the SHA-256 recorded in"
    )
