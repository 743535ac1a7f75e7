"""``tools/compare_outputs.py compare``: the bitwise guard of refactorings must see a one-ulp change, a dtype
change, a missing file and a missing key, and accept NaN at the same place."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

TOOL = Path(__file__).resolve().parent.parent / "tools" / "compare_outputs.py"


def _tool():
    spec = importlib.util.spec_from_file_location("compare_outputs", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_sees_every_kind_of_difference(tmp_path, capsys):
    tool = _tool()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    x = torch.tensor([1.0, float("nan"), 3.0], dtype=torch.float64)
    torch.save({"h": x, "meta": {"k": 2, "v": [x.clone()]}}, a / "r.pt")
    torch.save({"h": x.clone(), "meta": {"k": 2, "v": [x.clone()]}}, b / "r.pt")
    assert tool.compare(a, b) == 0
    y = x.clone()
    y[0] = torch.nextafter(y[0], torch.tensor(2.0, dtype=torch.float64))  # one ulp
    for changed in (
        {"h": y, "meta": {"k": 2, "v": [x]}},
        {"h": x.float(), "meta": {"k": 2, "v": [x]}},
        {"h": x, "meta": {"k": 3, "v": [x]}},
        {"h": x, "meta": {"k": 2, "v": []}},
    ):
        torch.save(changed, b / "r.pt")
        assert tool.compare(a, b) == 1
    (b / "r.pt").unlink()
    assert tool.compare(a, b) == 1
    assert "MISSING" in capsys.readouterr().out
