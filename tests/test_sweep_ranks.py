"""``hessian_sweep.py`` under torchrun (issue 26, item 5): two gloo ranks, a rank killed mid-unit and --resume, the
table bitwise the one-process table; the stage store shared by the ranks."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import ROOT, torchrun

import hessian_sweep

FLAGS = [
    "--dataset",
    "embedded",
    "--params",
    "*.layers.3.self_attn.q_proj.weight",
    "*.layers.3.fc2.weight",
    "--b",
    "2",
    "--seqlen",
    "16",
    "--model_input_bs",
    "1",  # one batch per rank
    "--dtype",
    "float64",
    "--max_probes",
    "20",
    "--quantities",
    "trace",
    "top",
    "--trace_estimator",
    "per_unit",  # auto chooses by measured seconds: two separate runs may choose differently
    "--name",
    "s",
    "--no_progress",
    "--device",
    "cpu",
]


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
