"""The product strategy is a declared abstract base (:class:`lib.products.base.Products`): every capability the jobs
and the operator read is an attribute or method of it, and no module tests for a concrete strategy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lib.products.base import Products
from lib.products.finite_difference import FDSettings, FDStats, FiniteDifference
from lib.products.operator import REVERSE_OVER_REVERSE, products_for

LIB = Path(__file__).resolve().parent.parent / "lib"


def test_products_is_abstract_and_both_strategies_declare_their_capabilities():
    with pytest.raises(TypeError):
        Products()  # type: ignore[abstract]
    fd = FiniteDifference(FDSettings(richardson=True))
    assert isinstance(REVERSE_OVER_REVERSE, Products) and isinstance(fd, Products)
    assert (
        products_for("exact") is REVERSE_OVER_REVERSE
        and products_for("finite_difference").exact is False
    )
    caps = ("exact", "batched", "double_backward", "keeps_graphs", "layer_outputs")
    assert [getattr(REVERSE_OVER_REVERSE, c) for c in caps] == [True] * 5
    assert [getattr(fd, c) for c in caps] == [False] * 5
    assert REVERSE_OVER_REVERSE.vector_dtype(torch.bfloat16) is torch.bfloat16
    assert fd.vector_dtype(torch.bfloat16) is torch.float32
    assert REVERSE_OVER_REVERSE.method_name("autograd") == "autograd"
    assert fd.method_name("rev-rev") == "finite_difference"
    assert REVERSE_OVER_REVERSE.stats({}) is None and isinstance(fd.stats({}), FDStats)
    assert REVERSE_OVER_REVERSE.report(torch.float64, None) == {"hvp": "exact"}
    assert REVERSE_OVER_REVERSE.fd_settings is None and fd.fd_settings == fd.settings


def test_no_module_probes_a_strategy_or_tests_for_a_concrete_one():
    probe = re.compile(
        r"isinstance\([^)]*FiniteDifference\)|getattr\(self\.products|products\.name\s*[!=]="
    )
    found = [
        f"{p.relative_to(LIB)}:{i}"
        for p in LIB.rglob("*.py")
        if p.name != "finite_difference.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if probe.search(line)
    ]
    assert found == []
    assert probe.search("if isinstance(products, FiniteDifference):")  # the pattern can match
