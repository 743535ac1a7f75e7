"""The batch-size study and the curvature comparison are library calls returning frozen results that write nothing
(:func:`lib.hessian.batch_study.batch_study`, :func:`lib.hessian.curvature.compare`); :mod:`lib.app.exact_outputs` writes them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lib.hessian import batch_study
from lib.hessian.curvature import Comparison


def test_batch_study_result_is_the_studys_numbers_and_frozen(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    sums = torch.zeros(3, 3, dtype=torch.float64)
    snapshots = {}
    for u in range(1, 6):
        sums = sums + torch.randn(3, 3, generator=g, dtype=torch.float64)
        snapshots[u] = {"hessian_sum": sums.clone()}
    s = batch_study.batch_study(snapshots, 2, 9, torch.float32)
    bs, hs = batch_study.running_hessians(snapshots, 2, 8)
    assert s.b == bs == [2, 4, 6, 8, 10]
    assert s.rel_to_full == batch_study.rel_to_full(hs, hs[-1]) and s.rel_to_full[-1] == 0.0
    assert s.rel_consecutive[1:] == batch_study.rel_consecutive(hs)[1:]
    assert list(s.kept) == batch_study.kept_sizes(bs) and s.kept[10].dtype == torch.float32
    assert torch.equal(s.kept[10], (hs[-1]).float())
    assert s.as_json()["kept_b"] == list(s.kept)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.b = []  # type: ignore[misc]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_comparison_is_frozen():
    c = Comparison({"exact": torch.eye(2)}, {}, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.metrics = {"x": 1}  # type: ignore[misc]
