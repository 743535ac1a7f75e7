"""The whole-model sweep (lib.hessian.sweep): every unit's quantities against dense eigvalsh of its exact Hessian block."""

from __future__ import annotations

import math

import pytest
import torch
from cases import SWEEP_FLAGS
from conftest import tiny_ids, tiny_model

from lib.errors import ParamError
from lib.hessian import sweep as sw

F64 = torch.float64


@pytest.fixture(scope="module")
def opt_block0():
    """The tiny float64 OPT, its samples, the layer units of block 0 and their union's dense Hessian."""
    model, ids = tiny_model("opt"), tiny_ids(2, 8)
    units = sw.make_units(model, "layer", ["*.layers.0.*"])
    prod = sw.UnitProducts(model, ids, units, sw.SweepSettings(chunk=64))
    h = prod.union_op.matmat(torch.eye(prod.n, dtype=F64))
    return model, ids, units, (h + h.T) / 2, prod.ranges


def test_units_of_each_granularity_and_refusals():
    model = tiny_model("opt")
    layers = sw.make_units(model, "layer")
    assert len(layers) == 12 and layers[0].name == "0.self_attn.k_proj"
    blocks = sw.make_units(model, "block", ["*.self_attn.*"])
    assert [u.name for u in blocks] == ["0", "1"] and blocks[0].size == 4 * 256
    heads = sw.make_units(model, "head")
    assert [u.name for u in heads] == ["0.head0", "0.head1", "1.head0", "1.head1"]
    assert heads[0].size == 4 * 128  # 8 rows of q, k, v (16 wide) and 8 columns of out_proj
    for bad, msg in (("rows", "over 'rows' is unknown"), ("layer", "matches no linear weight")):
        with pytest.raises(ParamError, match=msg):
            sw.make_units(model, bad, ["*.nothing.*"])
    with pytest.raises(ParamError, match="quantities 'eig' is unknown"):
        sw.check_quantities(["trace", "eig"])
    with pytest.raises(ParamError, match="shares k/v heads"):
        sw.make_units(tiny_model("llama"), "head")


def test_every_units_quantities_against_its_exact_block(opt_block0):
    """trace (within 4 standard errors), top / bottom eigenvalue (to the residual), Frobenius norm (within 4 standard
    errors) and SLQ's first moment, each against dense eigvalsh of the unit's exact block H_uu."""
    model, ids, units, h, ranges = opt_block0
    settings = sw.SweepSettings(
        chunk=16, tol=1e-7, max_iter=150, trace_estimator="per_unit", max_probes=60, probe_round=25
    )
    res = sw.sweep(model, ids, units, sw.QUANTITIES, settings, checkpoint="c0")
    assert {r.checkpoint for r in res.rows} == {"c0"}
    for u, (a, b) in zip(units, ranges):
        hu = h[a:b, a:b]
        ev = torch.linalg.eigvalsh(hu)
        scale = float(ev.abs().max())
        tr = res.value(u.name, "trace")
        assert abs(tr.estimate - float(hu.trace())) <= 4 * tr.error, u.name
        for q, exact in (("top", ev[-1]), ("bottom", ev[0])):
            r = res.value(u.name, q)
            assert r.error_kind == "residual" and r.error <= 1e-6 * scale
            assert abs(r.estimate - float(exact)) <= 1e-5 * scale, (u.name, q)
        f = res.value(u.name, "frobenius")
        assert abs(f.estimate - float(hu.norm())) <= 4 * f.error, u.name
        m1 = res.value(u.name, "density_moment1")
        assert abs(m1.estimate - float(hu.trace()) / u.size) <= 4 * m1.error + 1e-12
        d = res.value(u.name, "diag_max")
        assert d.error > 0 and d.hvps >= settings.min_probes
        assert 0 <= res.value(u.name, "density_negative_mass").estimate <= 1


def test_shared_probe_trace_is_unbiased_on_a_dense_matrix():
    """The shared estimator's mean over many probes is within 4 standard errors of each block's trace, and its
    variance exceeds the per-block estimator's by the off-diagonal blocks' ||H_uw||_F^2 (the formula in the docs)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=g, dtype=F64)
    h = a + a.T
    ranges = [(0, 10), (10, 25), (25, 30)]
    samples = sw.shared_trace_samples(lambda v: h @ v, 30, ranges, 4000, 0, seed=3)
    for (lo, hi), x in zip(ranges, samples):
        m, se, var = sw.mean_stderr(x)
        assert abs(m - float(h[lo:hi, lo:hi].trace())) <= 4 * se
        block = h[lo:hi, lo:hi]
        off = float((h[lo:hi] ** 2).sum() - (block**2).sum())
        within = 2 * float((block**2).sum() - (block.diagonal() ** 2).sum())
        assert abs(var - (within + off)) <= 0.15 * (within + off)
    # combined with independent per-block probes: still unbiased, and a smaller standard error than either
    own = sw.shared_trace_samples(lambda v: h[:10, :10] @ v, 10, [(0, 10)], 400, 0, seed=4)[0]
    m, se = sw.combined_trace(samples[0][:400], own)
    assert abs(m - float(h[:10, :10].trace())) <= 4 * se
    assert se < min(sw.mean_stderr(samples[0][:400])[1], sw.mean_stderr(own)[1])


def test_krylov_deflated_trace_is_unbiased_with_less_variance():
    """Hutchinson on (I - QQ^T) H (I - QQ^T) plus the exact tr(Q^T H Q), Q a Lanczos basis: unbiased (mean of many
    probes within 4 standard errors of tr(H)) and, on a spectrum with a few dominant eigenvalues, far less variance
    than plain Hutchinson."""
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=F64))
    ev = torch.cat(
        [torch.tensor([50.0, -30.0, 20.0], dtype=F64), torch.randn(57, generator=g, dtype=F64)]
    )
    h = (u * ev) @ u.T
    rec = sw.Recorder(lambda v: h @ v)
    from lib.spectrum import algorithms as spectrum

    spectrum.lanczos(rec, 60, 1, "both", tol=1e-3, max_iter=8, seed=0, eigenvectors=False)
    q, hq = torch.cat(rec.v, 1), torch.cat(rec.hv, 1)
    assert torch.allclose(q.T @ q, torch.eye(q.shape[1], dtype=F64), atol=1e-10)
    x = sw.deflated_trace_samples(lambda v: h @ v, 60, q, hq, 3000, 0, seed=5)
    m, se, var = sw.mean_stderr(x)
    assert abs(m - float(ev.sum())) <= 4 * se
    plain = sw.shared_trace_samples(lambda v: h @ v, 60, [(0, 60)], 3000, 0, seed=5)[0]
    assert var < 0.1 * sw.mean_stderr(plain)[2]


def test_plain_samples_deflated_without_products_are_unbiased():
    """The pilot's plain samples z . Hz turned into deflated ones (Q^T H z = (HQ)^T z): equal to the deflated samples
    computed with products on the same probes, and their mean over many probes within 4 standard errors of tr(H)."""
    g = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=F64))
    ev = torch.cat(
        [torch.tensor([40.0, -25.0], dtype=F64), torch.randn(38, generator=g, dtype=F64)]
    )
    h = (u * ev) @ u.T
    rec = sw.Recorder(lambda v: h @ v)
    from lib.spectrum import algorithms as spectrum
    from lib.spectrum.vectors import local_space

    spectrum.lanczos(rec, 40, 1, "both", tol=1e-3, max_iter=6, seed=0, eigenvectors=False)
    q, hq = torch.cat(rec.v, 1), torch.cat(rec.hv, 1)
    stats = sw.ProbeStats()
    sw.probe_round(lambda v: h @ v, 40, stats, 3000, seed=7)
    z = local_space(40).random(3000, 7, "rademacher", first=0)
    x = sw.deflate_plain_samples(stats.trace, z, q, hq)
    direct = sw.deflated_trace_samples(lambda v: h @ v, 40, q, hq, 3000, 0, seed=7)
    assert torch.allclose(torch.tensor(x), torch.tensor(direct), atol=1e-8)
    m, se, var = sw.mean_stderr(x)
    assert abs(m - float(ev.sum())) <= 4 * se
    assert var < 0.2 * sw.mean_stderr(stats.trace)[2]


def test_per_head_exact_traces_sum_to_the_layers():
    """sum over heads of tr(H_head) = sum over q, k, v, out_proj of tr(H_layer), each from the exact diagonal."""
    model, ids = tiny_model("opt"), tiny_ids(2, 8)
    heads = sw.make_units(model, "head", ["*.layers.1.*"])
    layers = sw.make_units(model, "layer", ["*.layers.1.self_attn.*"])

    def exact_traces(units):
        prod = sw.UnitProducts(model, ids, units, sw.SweepSettings(chunk=64))
        h = prod.union_op.matmat(torch.eye(prod.n, dtype=F64))
        return [float(h[a:b, a:b].trace()) for a, b in prod.ranges]

    th, tl = exact_traces(heads), exact_traces(layers)
    assert len(th) == 2 and math.isclose(sum(th), sum(tl), rel_tol=1e-9)


def test_auto_trace_choice_and_both_variances_reported(opt_block0):
    model, ids, units, _, _ = opt_block0
    res = sw.sweep(model, ids, units, ["trace"], sw.SweepSettings(chunk=8, max_probes=20))
    t = res.trace
    assert t["chosen"] in ("shared", "per_unit") and len(t["variance_shared"]) == len(units)
    assert all(v > 0 for v in t["variance_per_unit"])
    assert t["chosen"] == ("shared" if t["score_shared"] <= t["score_per_unit"] else "per_unit")
    # the shared estimator's variance carries the off-diagonal blocks: never much below the per-unit one
    assert sum(t["variance_shared"]) >= 0.5 * sum(t["variance_per_unit"])
    forced = sw.sweep(
        model,
        ids,
        units,
        ["trace"],
        sw.SweepSettings(chunk=8, max_probes=20, trace_estimator="shared"),
    )
    assert (
        forced.trace["chosen"] == "shared"
        and forced.value(units[0].name, "trace").error_kind == "stderr"
    )


def test_store_resume_gives_the_same_rows_and_per_unit_strategy_agrees(opt_block0):
    """A sweep resumed from a store holding its first stages gives the same numbers; the per-unit strategy (one
    operator per unit) gives the same eigenvalues as the union operator."""
    model, ids, units, _, _ = opt_block0
    units = units[:3]
    s = sw.SweepSettings(chunk=8, max_probes=20)
    full = sw.sweep(model, ids, units, ["trace", "top"], s)
    t = full.trace
    assert sw.KRYLOV_REASON in t["reason"]
    assert t["chosen"] == ("shared" if t["score_shared"] <= t["score_per_unit"] else "per_unit")
    store = sw.MemoryStore()
    stages: list[str] = []

    class Stop(Exception):
        pass

    def stop_after_two(stage: str) -> None:
        stages.append(stage)
        if len(stages) == 2:
            raise Stop

    with pytest.raises(Stop):
        sw.sweep(model, ids, units, ["trace", "top"], s, store=store, progress=stop_after_two)
    again = sw.sweep(model, ids, units, ["trace", "top"], s, store=store)
    key = lambda r: (r.unit, r.quantity, r.estimate, r.error, r.hvps)  # noqa: E731
    assert [key(r) for r in again.rows] == [key(r) for r in full.rows]
    per = sw.sweep(
        model, ids, units, ["top"], sw.SweepSettings(chunk=8, strategy="per_unit", tol=1e-9)
    )
    for u in units:
        assert math.isclose(
            per.value(u.name, "top").estimate, full.value(u.name, "top").estimate, rel_tol=1e-5
        )


def test_a_unit_killed_mid_way_replays_its_finished_products_bitwise(opt_block0, monkeypatch):
    """A stage interrupted after some of its products (the pass log) resumes by replaying them and computing the rest:
    the rows equal an uninterrupted sweep's bitwise, the replayed products are counted, and the finished stage's pass
    log is dropped."""
    model, ids, units, _, _ = opt_block0
    units = units[:2]
    s = sw.SweepSettings(chunk=8, max_probes=20, trace_estimator="per_unit")
    qs = ["trace", "top", "frobenius"]
    full = sw.sweep(model, ids, units, qs, s)

    class Stop(Exception):
        pass

    class Killed(sw.MemoryStore):
        def put_pass(self, stage: str, k: int, value) -> None:
            super().put_pass(stage, k, value)
            if stage == f"unit:{units[1].name}" and k == 6:
                raise Stop  # mid-way through the second unit's Lanczos

    store = Killed()
    with pytest.raises(Stop):
        sw.sweep(model, ids, units, qs, s, store=store)
    logged = [k for k in store if "#" in k]
    assert logged and all(k.startswith(f"unit:{units[1].name}#") for k in logged)
    store.__class__ = sw.MemoryStore
    replays: list[int] = []
    orig = sw.UnitProducts.end

    def end(self, stage: str) -> None:
        replays.append(self.replayed)
        orig(self, stage)

    monkeypatch.setattr(sw.UnitProducts, "end", end)
    again = sw.sweep(model, ids, units, qs, s, store=store)
    assert replays == [
        7
    ]  # products 0..6 of the interrupted unit; the first unit's stage was stored
    assert not [k for k in store if "#" in k]
    key = lambda r: (r.unit, r.quantity, r.estimate, r.error, r.hvps)  # noqa: E731
    assert [key(r) for r in again.rows] == [key(r) for r in full.rows]


# ----------------------------------------------------------------------------- the script


def test_an_unknown_revision_is_refused_offline_from_the_cache_and_online_by_the_hub(
    tmp_path, monkeypatch
):
    """Offline, a revision is looked up in the local hub cache (refs and snapshot commits, prefixes of 7+ characters);
    online, the hub's answer refuses a missing one and an unanswerable question lets the load decide."""
    from lib.app import sweep_family as sf
    from lib.errors import UserError

    repo = tmp_path / "models--org--m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "step1000").write_text("a" * 40)
    (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sf.check_revisions("org/m", ("step1000", "a" * 40, "aaaaaaa"), str(tmp_path))
    with pytest.raises(
        UserError, match=r"--revisions step9: not in the local cache of org/m \(a+, step1000\)"
    ):
        sf.check_revisions("org/m", ("step1000", "step9"), str(tmp_path))
    with pytest.raises(UserError, match="no revision cached"):
        sf.check_revisions("org/other", ("main",), str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("lib.model.inputs._HUB_CHECKED", True)  # no probe: the hub is mocked
    asked: list[str] = []

    def hub(model_id: str, r: str) -> bool | None:
        asked.append(r)
        return {"step1000": True, "gated": None}.get(r, False)

    sf.check_revisions("org/m", ("step1000", "gated"), None, hub)
    with pytest.raises(UserError, match="org/m has no such revision on the hub"):
        sf.check_revisions("org/m", ("step1000", "step9"), None, hub)
    assert asked == ["step1000", "gated", "step1000", "step9"]


def test_a_revision_resolves_to_its_commit_online_from_the_hub_offline_from_the_cache(
    tmp_path, monkeypatch
):
    """A branch or tag is pinned to the commit it names (the hub's answer online, ``refs/`` of the cache offline or
    when the hub cannot say); a full commit is itself, a unique 7+ character prefix of a cached snapshot its commit;
    an unknown name or an ambiguous prefix resolves to None (loaded by name)."""
    from cases import fake_hub

    from lib.model.revisions import loaded_commit, resolve_commit

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    c = fake_hub(tmp_path, "org/m", {"step1": a, "v1": a, "main": b})
    assert c["step1"] == c["v1"] != c["main"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked: list[str] = []

    def hub(model_id: str, r: str) -> str | None:
        asked.append(r)
        return {"main": "f" * 40}.get(r)

    commit = lambda r: resolve_commit("org/m", r, str(tmp_path), hub)  # noqa: E731
    assert [commit(r) for r in ("step1", "v1", "main")] == [c["step1"], c["v1"], c["main"]]
    assert commit(c["main"][:7]) == c["main"] and commit("e" * 40) == "e" * 40
    assert commit("step9") is None and commit(c["main"][:6]) is None and asked == []
    for d in ("1", "2"):
        (tmp_path / "models--org--m" / "snapshots" / ("abcdef0" + d * 33)).mkdir()
    assert commit("abcdef0") is None and commit("abcdef01") == "abcdef0" + "1" * 33
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    # the hub first, else the cache
    assert commit("main") == "f" * 40 and commit("step1") == c["step1"]
    assert asked == ["main", "step1"]
    # a model loaded by name: the cache's main (written by the load), none for a directory or the bundled model
    assert loaded_commit("org/m", str(tmp_path)) == c["main"]
    assert loaded_commit("org/other", str(tmp_path)) is None
    assert loaded_commit(str(a), str(tmp_path)) is None and loaded_commit("embedded", None) is None


def test_the_table_schema_reads_back_typed(opt_block0):
    """The CSV has the documented columns in order, one row per checkpoint x unit x quantity, and every value reads
    back as its type (numbers as numbers, a missing step or commit as an empty field); the JSON lines hold the same."""
    import csv
    import io
    import json

    from lib.app import sweep_family as sweep_cli

    model, ids, units, _, _ = opt_block0
    res = sw.sweep(
        model, ids, units[:2], ["trace", "top", "density"], sw.SweepSettings(max_probes=20)
    )
    ident = {"checkpoint": "c", "step": 3, "commit": None, "fingerprint": "ab"}
    rows = [{**r.as_dict(), **ident} for r in res.rows]
    text = sweep_cli.table_csv(rows)
    back = list(csv.DictReader(io.StringIO(text)))
    assert (
        list(back[0])
        == list(sweep_cli.TABLE_COLUMNS)
        == ["checkpoint", "step", "commit", "fingerprint", *sw.ROW_FIELDS[1:]]
    )
    assert len(back) == 2 * (1 + 1 + 3)
    for r, b in zip(rows, back):
        assert (
            float(b["estimate"]) == r["estimate"]
            and int(b["hvps"]) == r["hvps"]
            and b["commit"] == ""
        )
        assert (
            b["error_kind"] in ("stderr", "residual")
            and int(b["head"]) == -1
            and int(b["step"]) == 3
        )
    assert [
        json.loads(json.dumps({k: r[k] for k in sweep_cli.TABLE_COLUMNS}))["unit"] for r in rows
    ] == [b["unit"] for b in back]
    assert (
        sweep_cli.checkpoint_step("runs/checkpoint-1500") == 1500
        and sweep_cli.checkpoint_step("step64000") == 64000
    )
    assert sweep_cli.checkpoint_step("main") is None


def _checkpoints(tmp, steps=(0, 1, 2)) -> list[str]:
    """Three training checkpoints of the bundled model: a few SGD steps each, saved with save_pretrained (with the
    tokenizer), in directories named step<N>."""
    import shutil

    import lib
    from lib.paths import resolve_model_path

    src = resolve_model_path("embedded")
    model = lib.load_model("embedded")
    ids = lib.load_samples("embedded", seqlen=32, b=4)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = []
    for k in steps:
        d = tmp / f"step{2 * k}"
        model.save_pretrained(d)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(f"{src}/{f}", d / f)
        out.append(str(d))
        for _ in range(2):
            opt.zero_grad()
            model(ids, labels=ids, use_cache=False).loss.backward()
            opt.step()
    return out


@pytest.mark.slow
def test_three_checkpoint_sweep_killed_and_resumed_bitwise(tmp_path):
    """A sweep over three local checkpoints, SIGKILLed once the second checkpoint's first stages are written, then
    resumed on ``--devices cpu,cpu`` (every product's batches spread over two worker processes, each loading its
    checkpoint and checking its fingerprint): its table equals an uninterrupted one-process run's bitwise (estimates,
    errors, products); a resume with another seed is refused in one line; the table reads with the documented schema
    and the steps from the names."""
    import csv
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT, subprocess_env

    models = _checkpoints(tmp_path)
    # --model_input_bs 1: two batches, one per worker on the resume
    flags = ["--model", *models, *SWEEP_FLAGS, "--model_input_bs", "1"]
    cmd = [sys.executable, str(ROOT / "hessian_sweep.py"), *flags]
    env = subprocess_env()
    full = tmp_path / "full"
    subprocess.run([*cmd, "--output_dir", str(full)], env=env, check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, "--output_dir", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if len(list((out / "s.sweep").glob("*.pt"))) >= 4 and any(
            (out / "s.sweep").glob("passes/*/*.pt")
        ):  # checkpoint 0's three stages, one of checkpoint 1, and a product of the next (mid-unit)
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "s.csv").exists(), (
        "finished before the kill"
    )
    bad = subprocess.run(
        [*cmd, "--output_dir", str(out), "--resume", "--seed", "7"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "another configuration" in bad.stderr.strip().splitlines()[-1]
    subprocess.run(
        [*cmd, "--output_dir", str(out), "--resume", "--devices", "cpu,cpu"],
        env=env,
        check=True,
        capture_output=True,
    )

    def table(d):
        with open(d / "s.csv") as f:
            return list(csv.DictReader(f))

    a, b = table(full), table(out)
    keys = (
        "checkpoint",
        "step",
        "fingerprint",
        "unit",
        "quantity",
        "estimate",
        "error",
        "error_kind",
        "hvps",
    )
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert list(a[0]) == ["checkpoint", "step", "commit", "fingerprint", *sw.ROW_FIELDS[1:]]
    assert [r["step"] for r in a if r["quantity"] == "top"] == ["0", "0", "2", "2", "4", "4"]
    assert len({r["fingerprint"] for r in a}) == 3 and len(a) == 3 * 2 * 2
    meta = __import__("json").loads((out / "s.json").read_text())
    assert sum(c["stages_reused"] for c in meta["checkpoints"]) >= 4
    assert "s_steps.png" in meta["figures"] and (out / "s_steps.png").exists()
    w = [c["workers"] for c in meta["checkpoints"][1:]]  # computed by the workers after the kill
    assert all(x["workers"] == 2 and x["units_run"] == 2 * x["passes"] > 0 for x in w), w


@pytest.mark.slow
def test_revisions_on_devices_workers_give_the_one_process_table_and_pin_commits(
    tmp_path, monkeypatch
):
    """``--revisions step0 step2 dev`` of a local hub cache without ``main`` (``dev`` a second name of step2's
    commit), offline: ``--devices cpu,cpu`` (each worker loads the revision's commit and checks its fingerprint) gives
    bitwise the one-process table; every row carries its commit, ``dev``'s rows are step2's; once ``dev`` moves to
    another commit (with the same weights), ``--resume`` refuses its stages in one line instead of reusing them."""
    import csv

    from cases import _stderr_of, fake_hub

    import hessian_sweep

    step0, step2 = _checkpoints(tmp_path, steps=(0, 1))
    hub = tmp_path / "hub"
    commits = fake_hub(hub, "org/tiny", {"step0": step0, "step2": step2, "dev": step2})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--model", "org/tiny", "--cache_dir", str(hub), "--revisions", "step0", "step2", "dev"]
    argv += [*SWEEP_FLAGS, "--params", "*.layers.3.fc2.weight", "--quantities", "trace"]
    argv += ["--min_probes", "2", "--max_probes", "4", "--model_input_bs", "1"]
    tables = []
    for extra in (["--keep_checkpoint"], ["--devices", "cpu,cpu"]):
        out = tmp_path / ("workers" if "--devices" in extra else "one")
        code, err = _stderr_of(hessian_sweep, [*argv, *extra, "--output_dir", str(out)])
        assert code == 0, err
        with open(out / "s.csv") as f:
            tables.append(
                [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]
            )
    one, workers = tables
    assert one == workers and len(one) == 3
    assert [(r["checkpoint"], r["commit"]) for r in one] == list(commits.items())
    assert one[0]["fingerprint"] != one[1]["fingerprint"]
    assert {**one[2], "checkpoint": "step2", "step": "2"} == one[1]
    skip = [*argv, "--output_dir", str(tmp_path / "one"), "--skip_existing"]
    assert _stderr_of(hessian_sweep, skip)[0] == 0  # the config read at step0's commit: no main
    fake_hub(hub, "org/tiny", {"dev": tmp_path / "moved"})
    (tmp_path / "moved").symlink_to(step2)
    code, err = _stderr_of(
        hessian_sweep, [*argv, "--output_dir", str(tmp_path / "one"), "--resume", "--overwrite"]
    )
    assert code == 2 and len(err) == 1 and "(stage" in err[0] and "of 2:dev)" in err[0], err
    assert "another commit" in err[0]


def test_workers_take_revisions():
    """``--devices`` is accepted (worker processes), with ``--revisions`` too (each worker loads the revision's
    commit; torchrun runs: tests/test_sweep_ranks.py)."""
    from lib.app import cli

    spec = cli.parse("hessian_sweep", ["--devices", "cpu,cpu"], "")
    spec.validate()
    cli.parse(
        "hessian_sweep",
        ["--devices", "cpu,cpu", "--model", "org/m", "--revisions", "a", "b"],
        "",
    ).validate()


def test_auto_pilot_takes_the_shared_variance_from_paired_probes(opt_block0):
    """Under ``auto`` the shared pilot is 2 union probes made of the units' own first probes: the shared variance it
    reports is the per-unit variance plus ``||(H z)_u - H_uu z_u||^2``, an estimate of the off-diagonal blocks'
    ``sum_w ||H_uw||_F^2`` (the exact decomposition), here within 35 % of the dense value for every unit."""
    model, ids, units, h, ranges = opt_block0
    res = sw.sweep(model, ids, units, ["trace"], sw.SweepSettings(chunk=8, max_probes=20))
    t = res.trace
    assert t["pilot_hvps"] == sw.PAIRED + 10 * len(units)
    for (a, b), vs, vp in zip(ranges, t["variance_shared"], t["variance_per_unit"]):
        off = float((h[a:b] ** 2).sum() - (h[a:b, a:b] ** 2).sum())
        assert abs((vs - vp) - off) <= 0.35 * off


def test_the_estimator_choice_compares_cost_per_error_when_both_stop_at_max_probes():
    """Two units whose traces cannot reach 5 % within max_probes under either estimator: the shared run costs 50
    union products, the per-unit run 50 products per unit. Compared by seconds only (both 'at the cap'), a cheap
    shared run with a larger error would win or lose by accident; the score seconds x worst relative variance picks
    the per-unit estimator when its variance is far smaller (attention layers), the shared one when it is not
    much larger and a union product serves many units (heads)."""
    s = sw.SweepSettings(min_probes=10, max_probes=50, trace_rel=0.05)
    stats = [
        sw.ProbeStats(trace=[1.0, 3.0] * 5),
        sw.ProbeStats(trace=[0.5, 2.5] * 5),
    ]  # means 2, 1.5
    var_p = [sw.mean_stderr(p.trace)[2] for p in stats]
    for var_shared, expected in (
        ([v * 100 for v in var_p], "per_unit"),
        ([v * 1.5 for v in var_p], "shared"),
    ):
        got = {
            "variance_shared": var_shared,
            "shared_seconds": 2 * 0.02,  # 2 paired union probes at 20 ms
            "shared_probes": 2,
            "unit_seconds": [10 * 0.02, 10 * 0.02],  # 10 pilot probes per unit at 20 ms
            "hvps": 22,
        }
        t = sw._choose_estimator(s, got, [[], []], stats, krylov=False)
        assert t["cost_shared"] == 50 and t["cost_per_unit"] == 100  # both capped
        assert t["seconds_shared"] == pytest.approx(1.0) and t["seconds_per_unit"] == pytest.approx(
            2.0
        )
        worst = max(v / (k * m * m) for v, k, m in zip(var_shared, (50, 50), (2.0, 1.5)))
        assert t["worst_rel_variance_shared"] == pytest.approx(worst)
        assert t["chosen"] == expected, t
