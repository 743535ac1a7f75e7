"""Every figure kind is drawn with no text outside the canvas, titles of at most two lines, no legend over a bar,
and heatmaps keep the sign of H (diverging colours, symmetric limits) unless asked for |H|."""

from __future__ import annotations

import pytest
import torch

from lib.app import plots
from lib.hessian import diagonality

LONG = (
    "first 16 weights of row 0 of the first 6 linear layers in block 0; embedded, data shakespeare-heldout.txt "
    "(3f2a91c0), float32, b=16, seqlen=128, self_attn.q_proj, self_attn.k_proj"
)


@pytest.fixture
def drawn(monkeypatch):
    """The layout problems of every figure drawn while the fixture is active, by figure path (not written to disk)."""
    found: dict[str, list[str]] = {}

    def checked(fig, path_stem):
        found[str(path_stem)] = plots.layout_problems(fig)
        plots._pyplot().close(fig)
        return []

    monkeypatch.setattr(plots, "_save", checked)
    return found


def _sym(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a + a.T


@pytest.mark.slow
def test_every_figure_kind_fits_its_canvas(tmp_path, drawn):
    h = _sym(48)
    plots.heatmap(h, tmp_path / "one", f"H: {LONG}\nembedded, b=16, seqlen=128")
    labels = [
        f"b{b} {n}"
        for b in range(4)
        for n in ("k_proj", "v_proj", "q_proj", "out_proj", "fc1", "fc2")
    ]
    plots.heatmap(
        _sym(96),
        tmp_path / "sliced",
        f"H: {LONG}",
        boundaries=list(range(4, 96, 4)),
        slice_labels=labels,
    )
    plots.heatmap(
        torch.randn(32, 64, dtype=torch.float64),
        tmp_path / "rect",
        f"diag H of {LONG}",
        axis_labels=("input index", "output unit"),
        value="H_ii",
    )
    for p in (6, 24):
        m = torch.rand(p, p, dtype=torch.float64)
        m = (m + m.T) / (m + m.T).sum()
        d = {"block_diag_share_fro2": 0.121, "same_block_share_fro2": 0.986}
        plots.slice_mass(
            m, labels[:p], tmp_path / f"mass{p}", diagonality.slice_mass_title(d, LONG)
        )
    block = {
        "b": list(range(1, 41)),
        "rel_to_full": [1 / b for b in range(1, 41)],
        "rel_consecutive": [None] + [0.5 / b for b in range(2, 41)],
    }
    plots.batch_study_figure(block, {1: h, 4: h, 16: h, 40: h}, tmp_path / "study", LONG)
    curves = {
        "hutchinson": {
            "k": [1, 2, 4, 8],
            "tracked relative l2 error": [4, 2, 1, 0.5],
            "consecutive relative l2 difference": [1, 0.5, 0.2, 0.1],
        }
    }
    plots.convergence(
        curves,
        tmp_path / "conv",
        f"Convergence on the first 1 output units of {LONG}",
        {"empirical_fisher": {"tracked relative l2 error": 0.9}},
    )
    plots.heatmap_grid(
        [(f"hutchinson, k = {k}", torch.randn(16, 16)) for k in (1, 10, 100, 1000)],
        tmp_path / "grid",
        f"diag H along k; {LONG}",
        ncols=4,
    )
    names = ["ggn", "fisher", "empirical_fisher", "gptq", "kfac", "diag"]
    metrics = {
        n: {
            "best_scale": 1.0,
            "rel_frobenius_scaled": 0.95,
            "cosine": 0.9,
            "top_k_overlap": 0.7,
            "pred_vs_exact_corr": 0.97,
            "pred_vs_measured_even_corr": 0.93,
        }
        for n in names
    }
    metrics["exact"] = {"pred_vs_measured_even_corr": 0.94}
    plots.comparison_figure(
        {"exact": h, **{n: h for n in names}}, metrics, tmp_path / "compare", LONG
    )
    plots.density_figure(
        torch.linspace(-1, 1, 200),
        torch.rand(200) + 1e-3,
        [0.5, 0.4, -0.06],
        tmp_path / "density",
        f"Hessian spectral density: {LONG}\nembedded, b=16, seqlen=128",
    )
    assert len(drawn) == 10
    assert {k: v for k, v in drawn.items() if v} == {}


def test_layout_check_sees_clipped_text_long_titles_and_covered_bars():
    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.set_title(
        "a title far too long to fit in a figure only three inches wide, so it runs off both edges"
    )
    ax.bar([0, 1, 2], [1.0, 1.0, 1.0], label="bars")
    ax.legend(loc="upper left")
    fig.suptitle("one\ntwo\nthree")
    problems = plots.layout_problems(fig)
    plt.close(fig)
    assert any("leave the canvas" in p for p in problems)
    assert any("3 lines" in p for p in problems)
    assert any("covers a bar" in p for p in problems)


def test_fit_title_wraps_into_two_lines_that_fit():
    plt = plots._pyplot()
    fig = plt.figure(figsize=(4, 3))
    t = plots.fit_title(fig, LONG)
    assert t.get_text().count("\n") <= 1
    assert plots.layout_problems(fig) == []
    plt.close(fig)


def test_heatmaps_are_signed_by_default_and_abs_on_request(tmp_path, monkeypatch):
    seen = {}
    save = plots._save

    def grab(fig, path_stem):
        im = fig.axes[0].images[0]
        seen[str(path_stem)] = (im.get_cmap().name, *im.get_clim(), float(im.get_array().min()))
        return save(fig, path_stem)

    monkeypatch.setattr(plots, "_save", grab)
    h = torch.tensor([[2.0, -1.0], [-1.0, -3.0]], dtype=torch.float64)
    plots.heatmap(h, tmp_path / "signed", "H")
    plots.heatmap(h, tmp_path / "abs", "|H|", signed=False)
    cmap, lo, hi, low_value = seen[str(tmp_path / "signed")]
    assert cmap == plots.DIVERGING and lo == -hi and hi > 0 and low_value == -3.0
    cmap, lo, hi, low_value = seen[str(tmp_path / "abs")]
    assert cmap == "viridis" and lo == 0 and low_value == 1.0
    assert "-" in plots.colour_text("H_ij", 0.2, 98, True) and "|H_ij|" in plots.colour_text(
        "H_ij", 0.2, 98, False
    )
