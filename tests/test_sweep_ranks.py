"""``hessian_sweep.py`` under torchrun (issue 26, item 5): a stopped one-process sweep resumed by two gloo ranks gives the
one-process table bitwise; ``--fsdp --over block`` on two ranks equals the one-process sweep to 1e-8; its refusals."""

from __future__ import annotations

import csv
import json

import pytest
from cases import SWEEP_FLAGS
from conftest import ROOT, torchrun

import hessian_sweep

FLAGS = [*SWEEP_FLAGS, "--model_input_bs", "1", "--device", "cpu"]  # one batch per rank


class Killed(Exception):
    """Stands for a kill in the middle of a unit."""


def _table(path):
    """The CSV's rows without the timing column."""
    with open(path) as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_resumed_under_torchrun_from_a_killed_run_gives_the_one_process_table_bitwise(
    tmp_path, monkeypatch
):
    """A one-process sweep stopped after the first unit's stage and one product of the second are stored, then resumed
    by two gloo ranks (each a whole model, the batches of every product split over them; rank 0 reads and writes the
    stages): the stages are reused, the product replayed, the rest computed on both ranks, and the table is bitwise
    the uninterrupted one-process table; rank 0 alone prints."""
    from lib.hessian import sweep as sw

    hessian_sweep.run([*FLAGS, "--output_dir", str(tmp_path / "one")])
    one = _table(tmp_path / "one" / "s.csv")
    out = tmp_path / "two"
    product = sw.UnitProducts._product

    def killed(self, compute, v):
        if self.stage == "unit:3.fc2" and self._k == 1:
            raise Killed
        return product(self, compute, v)

    monkeypatch.setattr(sw.UnitProducts, "_product", killed)
    with pytest.raises(Killed):
        hessian_sweep.run([*FLAGS, "--output_dir", str(out)])
    assert not (out / "s.csv").exists() and any((out / "s.sweep").glob("passes/*/*.pt"))
    done = torchrun(
        ROOT / "hessian_sweep.py", *FLAGS, "--output_dir", str(out), "--resume", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _table(out / "s.csv") == one and len(one) == 2 * 2
    assert done.stdout.count("largest top") == 1  # rank 0 prints
    entry = json.loads((out / "s.json").read_text())["checkpoints"][0]
    assert entry["stages_reused"] >= 2 and entry["products_replayed"] == 1
    w = entry["workers"]
    assert w["ranks"] == 2 and w["units_run"] == 2 * w["passes"] > 0


@pytest.mark.slow
def test_fsdp_block_sweep_on_two_ranks_equals_the_one_process_sweep(tmp_path):
    """``--fsdp --over block`` on two gloo ranks (the model sharded, each block's finite-difference products on the
    shards, the vectors whole on every rank) gives the one-process finite-difference table to 1e-8 relative (float64:
    only the order of the gradients' sums differs), the same products per row, and weights bitwise restored."""
    flags = [*FLAGS, "--over", "block", "--params"]
    flags += ["*.layers.2.self_attn.q_proj.weight", "*.layers.3.self_attn.q_proj.weight"]
    flags += [
        "--min_probes",
        "4",
        "--max_probes",
        "4",
        "--max_iter",
        "8",
    ]  # argparse: the last wins
    hessian_sweep.run(
        [
            *flags,
            "--hvp",
            "finite_difference",
            "--audit",
            "0",
            "--output_dir",
            str(tmp_path / "one"),
        ]
    )
    done = torchrun(
        ROOT / "hessian_sweep.py",
        *flags,
        "--fsdp",
        "--output_dir",
        str(tmp_path / "two"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _table(tmp_path / "one" / "s.csv"), _table(tmp_path / "two" / "s.csv")
    assert [r["unit"] for r in one] == ["2", "2", "3", "3"] and len(two) == len(one)
    for a, b in zip(one, two):
        assert (a["unit"], a["quantity"], a["hvps"]) == (b["unit"], b["quantity"], b["hvps"])
        for k in ("estimate", "error"):
            scale = max(abs(float(a[k])), abs(float(a["estimate"])))  # a residual: the eigenvalue's
            assert abs(float(a[k]) - float(b[k])) <= 1e-8 * scale, (a, b)
    op = json.loads((tmp_path / "two" / "s.json").read_text())["checkpoints"][0]["operator"]
    assert op["fsdp"]["world_size"] == 2 and op["fsdp"]["weights_bitwise_restored"] == [True, True]
    assert op["hvp"]["hvp"] == "finite_difference"


def test_fsdp_other_granularities_are_refused_in_one_line_before_the_model_loads(
    tmp_path, capsys, monkeypatch
):
    """``--fsdp`` with ``--over layer`` or ``head`` (exit 2, one line, nothing loaded), and outside torchrun."""
    from lib.app import cli, pipeline

    def refused(argv):
        for name in ("load_model", "model_skeleton"):
            monkeypatch.setattr(
                pipeline, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded"))
            )
        with pytest.raises(SystemExit) as e:
            cli.main(hessian_sweep.run, [*argv, "--output_dir", str(tmp_path)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err
        return err

    assert "use --over block, not --over layer" in refused(["--fsdp", "--over", "layer"])
    assert "not --over head" in refused(["--fsdp", "--over", "head"])
    assert "launch with torchrun" in refused(["--fsdp", "--over", "block"])


def test_rank_store_writes_on_rank_0_only_and_shares_its_refusal(one_rank_env):
    """:class:`lib.app.sweep_ranks.RankStore` in a one-rank gloo group: only rank 0 writes; what rank 0 read comes back;
    a stage of another configuration is refused as an error every rank shares (rank 0 prints it)."""
    import torch

    from lib.app.sweep_ranks import RankStore
    from lib.errors import UserError
    from lib.runtime import parallel, ranks

    class Inner:  # a DirStore stand-in
        reused = replayed = 0

        def __init__(self):
            self.kept = {}

        def get(self, key):
            if key == "other":
                raise UserError("stage other was made with another configuration")
            return self.kept.get(key)

        def put(self, key, value):
            self.kept[key] = value

        def put_pass(self, stage, k, value):
            self.kept[f"{stage}#{k}"] = value

    parallel.init_process_group(torch.device("cpu"))
    try:
        inner = Inner()
        RankStore(inner, 1).put("a", 1)
        RankStore(inner, 1).put_pass("a", 0, 2)
        assert inner.kept == {}
        zero = RankStore(inner, 0)
        zero.put("a", {"x": torch.arange(3)})
        assert torch.equal(zero.get("a")["x"], torch.arange(3)) and zero.get("b") is None
        with pytest.raises(UserError, match="another configuration") as e:
            zero.get("other")
        assert e.value.shared_by_ranks and not ranks.quiet_on_this_rank(e.value)
        assert zero.agree({"seconds": 1.5}) == {"seconds": 1.5}
    finally:
        ranks.end_process_group()
