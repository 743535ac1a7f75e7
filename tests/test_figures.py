"""The batch-size study, the diagonality metrics, the labelled figures and ``reproduce.py``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cases import ToyJob

import reproduce
import single_layer_single_block
from lib.app.plots import slice_label
from lib.errors import RunError
from lib.hessian import batch_study, diagonality
from lib.hessian.exact import exact_hessian
from lib.model.data import load_samples
from lib.model.models import load_model
from lib.objective import subsets
from lib.runtime import checkpoint as ckpt
from lib.runtime import parallel
from lib.runtime.jobs import add_partials

# ----------------------------------------------------------------------------- diagonality, on hand-made matrices


def test_diagonality_metrics_on_hand_made_matrices():
    h = torch.tensor([[3.0, 0.0, 1.0], [0.0, -4.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    # ||H||_F^2 = 9 + 16 + 2 = 27, diagonal 25, off-diagonal 2
    assert diagonality.diag_share(h) == pytest.approx(25 / 27)
    assert diagonality.offdiag_ratio(h) == pytest.approx(math.sqrt(2 / 27))
    m = diagonality.slice_mass(h, [2, 1])
    assert torch.allclose(m, torch.tensor([[25.0, 1.0], [1.0, 0.0]], dtype=torch.float64) / 27)
    assert (
        diagonality.offdiag_ratio(torch.eye(4)) == 0.0
        and diagonality.diag_share(torch.eye(4)) == 1.0
    )
    d = diagonality.summary(h, [2, 1], ["a", "b"])
    assert d["block_diag_share_fro2"] == pytest.approx(25 / 27) and d["slice_labels"] == ["a", "b"]
    assert "slice_mass" not in diagonality.summary(h, [3])
    with pytest.raises(ValueError):
        diagonality.slice_mass(h, [2, 2])


def test_slice_labels_and_single_block_titles():
    assert slice_label("model.decoder.layers.3.self_attn.q_proj.weight") == "b3 q_proj"
    assert slice_label("transformer.h.11.attn.c_attn.weight") == "b11 c_attn"
    assert slice_label("lm_head.weight") == "lm_head"
    assert subsets.blocks_text(1) == "block 0" and subsets.blocks_text(4) == "blocks 0..3"


# ----------------------------------------------------------------------------- batch study: pure parts


def test_recorded_batch_sizes():
    assert batch_study.wanted_sizes(5) == [1, 2, 3, 4, 5]
    big = batch_study.wanted_sizes(10_000)
    assert big[:64] == list(range(1, 65)) and big[-1] == 10_000 and len(big) == 64 + 32
    assert all(a < b for a, b in zip(big, big[1:]))
    ratios = [b / a for a, b in zip(big[64:], big[65:])]
    assert max(ratios) / min(ratios) < 1.2  # log-spaced beyond 64
    # units of 4 samples: each wanted b rounded up to a unit boundary
    assert batch_study.snapshot_units(12, 4) == [1, 2, 3]
    assert [u * 4 for u in batch_study.snapshot_units(400, 4)][:16] == list(range(4, 68, 4))


def test_batch_metrics_on_hand_made_matrices():
    hs = [torch.eye(2) * 2, torch.eye(2), torch.diag(torch.tensor([1.0, 0.0]))]
    study = batch_study.study([1, 2, 3], hs)
    assert study["rel_to_full"] == pytest.approx([math.sqrt(5), 1.0, 0.0])
    assert study["rel_consecutive"][0] is None
    assert study["rel_consecutive"][1:] == pytest.approx([1.0, 1.0])
    bs, running = batch_study.running_hessians(
        {1: {"hessian_sum": torch.ones(2, 2) * 6}, 2: {"hessian_sum": torch.ones(2, 2) * 12}},
        model_input_bs=2,
        tokens_per_sample=3,
    )
    assert (
        bs == [2, 4]
        and torch.equal(running[0], torch.ones(2, 2))
        and torch.equal(running[1], torch.ones(2, 2))
    )
    assert batch_study.kept_sizes(list(range(1, 41))) == [1, 4, 16, 40]


def _prefix_sums(parts, upto):
    total = None
    for p in parts[:upto]:
        total = add_partials(total, p)
    return total


def test_run_state_snapshots_are_prefix_sums_whatever_the_arrival_order_and_survive_a_checkpoint(
    tmp_path,
):
    g = torch.Generator().manual_seed(0)
    parts = [{"h": torch.randn(3, 3, generator=g, dtype=torch.float64)} for _ in range(6)]
    state = ckpt.RunState(6, record=frozenset({1, 2, 4, 6}))
    for k in [2, 0, 1, 4]:
        state.add(k, parts[k])
    ckpt.save(tmp_path / "s.ckpt", state, {"kind": "x"})
    back = ckpt.load(tmp_path / "s.ckpt", {"kind": "x"}, 6)
    back.record = state.record
    for k in [5, 3]:
        back.add(k, parts[k])
    assert sorted(back.snapshots) == [1, 2, 4, 6]
    for u, snap in back.snapshots.items():
        assert torch.equal(snap["h"], _prefix_sums(parts, u)["h"])


@pytest.mark.slow
def test_snapshots_with_two_workers_torchrun_and_resume_equal_one_process(tmp_path, one_rank_env):
    units = (1, 2, 3, 5)
    serial = parallel.RunSettings([torch.device("cpu")], snapshot_units=units)
    parallel.run_job(ToyJob(5), serial)
    assert sorted(serial.snapshots) == list(units)
    assert torch.equal(
        serial.snapshots[3]["s"], torch.full((3,), 3.0, dtype=torch.float64)
    )  # 0 + 1 + 2

    workers = parallel.RunSettings([torch.device("cpu")] * 2, snapshot_units=units)
    parallel.run_job(ToyJob(5), workers)
    assert all(torch.equal(workers.snapshots[u]["s"], serial.snapshots[u]["s"]) for u in units)

    # torchrun (one gloo rank) stops at unit 3 with units 0..2 (and their snapshots) checkpointed; --resume finishes
    cfg = ckpt.CheckpointConfig(tmp_path / "t.ckpt", every_units=100)
    dist = parallel.RunSettings([torch.device("cpu")], cfg, snapshot_units=units)
    with pytest.raises(RunError, match="boom in unit 3"):
        parallel._run_distributed(ToyJob(5, {3: "raise"}), dist, (0, 0, 1))
    assert sorted(ckpt.read(cfg.path)["snapshots"]) == [1, 2, 3]
    cfg.resume = True
    with pytest.raises(
        Exception, match="differs in: snapshot_units"
    ):  # the snapshot plan is part of the configuration
        parallel._run_distributed(
            ToyJob(5),
            parallel.RunSettings([torch.device("cpu")], cfg, snapshot_units=(1, 5)),
            (0, 0, 1),
        )
    parallel._run_distributed(ToyJob(5), dist, (0, 0, 1))
    assert dist.stats["units_run"] == 2
    assert all(torch.equal(dist.snapshots[u]["s"], serial.snapshots[u]["s"]) for u in units)


# ----------------------------------------------------------------------------- batch study end to end (float64)

STUDY = [
    "--t",
    "3",
    "--seqlen",
    "16",
    "--dtype",
    "float64",
    "--no_progress",
    "--batch_study",
    "--name",
    "s",
]


@pytest.mark.parametrize(
    "b,bs", [(5, 1), pytest.param(6, 2, marks=pytest.mark.slow)], ids=["bs1", "bs2"]
)
def test_batch_study_equals_hessians_computed_separately_for_each_b(b, bs, tmp_path):
    meta = single_layer_single_block.run(
        [*STUDY, "--b", str(b), "--model_input_bs", str(bs), "--output_dir", str(tmp_path)]
    )
    study = meta["batch_study"]
    assert study["b"] == list(range(bs, b + 1, bs))
    model = load_model("embedded", dtype=torch.float64)
    sub = subsets.single_layer_single_block(model, "self_attn.q_proj", 0, 3)
    samples = load_samples("embedded", 16, b)
    separate = [
        exact_hessian(model, sub, samples[:n], method="autograd", fused_head=False).hessian
        for n in study["b"]
    ]
    assert study["rel_to_full"] == pytest.approx(
        batch_study.rel_to_full(separate, separate[-1]), rel=1e-9, abs=1e-12
    )
    assert study["rel_consecutive"][0] is None
    assert study["rel_consecutive"][1:] == pytest.approx(
        batch_study.rel_consecutive(separate)[1:], rel=1e-9
    )
    assert min(study["rel_to_full"][:-1]) > 1e-3  # the running Hessians do differ
    kept = torch.load(tmp_path / "s_batch_study.pt")
    assert kept["b"] == study["kept_b"] and kept["b"][-1] == b
    for n, h in kept["hessian"].items():
        assert torch.allclose(h, separate[study["b"].index(n)], rtol=1e-10, atol=1e-14)
    js = json.loads((tmp_path / "s.json").read_text())
    assert js["batch_study"]["b"] == study["b"] and js["diagonality"][
        "offdiag_fro_ratio"
    ] == pytest.approx(diagonality.offdiag_ratio(separate[-1]))
    for f in meta["batch_study_files"]:
        assert (tmp_path / f).stat().st_size > 500


@pytest.mark.slow
def test_batch_study_on_two_workers_equals_one_process(tmp_path):
    one = single_layer_single_block.run([*STUDY, "--b", "4", "--output_dir", str(tmp_path / "one")])
    two = single_layer_single_block.run(
        [*STUDY, "--b", "4", "--output_dir", str(tmp_path / "two"), "--devices", "cpu,cpu"]
    )
    assert two["run"]["workers"] == 2 and one["batch_study"] == two["batch_study"]
    a, b = (
        torch.load(tmp_path / "one" / "s_batch_study.pt"),
        torch.load(tmp_path / "two" / "s_batch_study.pt"),
    )
    assert all(torch.equal(a["hessian"][n], b["hessian"][n]) for n in a["b"])


# ----------------------------------------------------------------------------- reproduce.py


def test_reproduce_presets_are_the_reports_configurations():
    flags = {
        f: [list(r.argv) for r in reproduce.runs(f, "facebook/opt-125m")] for f in reproduce.FIGURES
    }
    t = {f: a[0][a[0].index("--t") + 1] for f, a in flags.items() if not f.startswith("3")}
    assert t == {"1a": "768", "1b": "300", "1c": "150", "1d": "25", "2": "768"}
    assert "--batch_study" in flags["2"][0] and flags["1b"][0][:2] == ["--num_blocks", "1"]
    assert not any(
        "--b" in a or "--seqlen" in a for runs in flags.values() for a in runs
    )  # seqlen 2048, every sample
    assert [a[a.index("--hvps") + 1] for a in flags["3b"]] == ["1", "10", "100", "1000", "1000"]
    embedded = {f: [list(r.argv) for r in reproduce.runs(f, "embedded")] for f in reproduce.FIGURES}
    assert embedded["1a"] == [["--t", "128"]] and "--batch_study" in embedded["2"][0]


@pytest.mark.slow
def test_every_figure_command_runs_end_to_end_on_a_tiny_configuration(tmp_path, capsys):
    done = reproduce.run(
        ["--figure", "all", "--quick", "--output_dir", str(tmp_path), "--no_progress"]
    )
    assert list(done) == list(reproduce.FIGURES)
    for fig, d in done.items():
        assert d["commands"] and all((tmp_path / f).exists() for f in d["files"]), fig
        assert any(f.endswith(".png") for f in d["files"])
    assert "fig1b_embedded_quick_slice_mass.png" in done["1b"]["files"]
    assert "fig2_embedded_quick_batch_study.png" in done["2"]["files"]
    assert (
        "fig3b_embedded_quick.png" in done["3b"]["files"]
        and "fig3a_embedded_quick_convergence.png" in done["3a"]["files"]
    )
    js = json.loads((tmp_path / "fig2_embedded_quick.json").read_text())
    assert js["config"]["compute"]["batch_study"] and js["batch_study"]["b"] == [1, 2, 3, 4, 5]
    assert js["computed_on"]["label"] == "quick" and js["computed_on"]["b"] == 5
    # a quick run neither takes nor blocks the real figures' names
    assert (
        not list(tmp_path.glob("fig1a_embedded.*"))
        and not (tmp_path / "reproduce_embedded.json").exists()
    )
    record = json.loads((tmp_path / "reproduce_embedded_quick.json").read_text())
    assert set(record) == set(reproduce.FIGURES) and record["1a"]["elapsed_s"] > 0
    out = capsys.readouterr().out
    assert (
        "python single_layer_single_block.py --t 2" in out
        and "diagonality: ||offdiag||_F/||H||_F" in out
    )
