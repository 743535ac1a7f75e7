"""One curvature-operator protocol (:mod:`lib.products.linop`): the Hessian and GGN operators take ``(n, p)`` blocks, and
the SciPy view refuses in one line where a process holds no result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import LAYER, tiny_ids, tiny_model

from lib.estimators.diagonal.ggn import GGNOperator
from lib.objective import subsets
from lib.objective.loss import SubsetLoss
from lib.products.linop import CurvatureOperator, NoResultHere, OperatorViews
from lib.products.operator import HessianOperator


def test_hessian_and_ggn_operators_share_the_protocol_and_the_block_convention():
    model = tiny_model("opt")
    sub = subsets.single_layer_single_block(model, LAYER["opt"], 0, 5)
    ids = tiny_ids(b=2)
    h = HessianOperator(model, sub, ids, keep_graphs=False)
    g = GGNOperator(SubsetLoss(model, sub), sub.gather(model), ids)
    v = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for op in (h, g):
        assert isinstance(op, CurvatureOperator) and op.shape == (5, 5)
        out = op.matmat(v)
        assert out.shape == (5, 3) and out.dtype == op.dtype and out.device == op.device
        cols = torch.stack([op.matvec(v[:, j]) for j in range(3)], dim=1)
        torch.testing.assert_close(out, cols, rtol=1e-10, atol=1e-13)
    hv = h.to_scipy().matvec(v[:, 0].numpy())
    np.testing.assert_allclose(hv, h.matvec(v[:, 0]).numpy(), rtol=1e-12)


class NothingHere(OperatorViews):
    """An operator on a torchrun rank other than 0: its products stay on rank 0."""

    shape = (3, 3)

    def matmat(self, v):
        return None


def test_the_scipy_view_refuses_in_one_line_where_no_result_is_held():
    lin = NothingHere().to_scipy()
    for call in (lambda: lin.matvec(np.ones(3)), lambda: lin.matmat(np.ones((3, 2)))):
        with pytest.raises(NoResultHere, match="rank other than 0") as e:
            call()
        assert "\n" not in str(e.value)
