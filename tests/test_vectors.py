"""Spectra of whole models at scale (issue 16, item 2) on dense matrices: where the Lanczos and probe vectors live
(sharded draws, host / disk storage, the working dtype) and the reorthogonalization choice with ghosts filtered."""

from __future__ import annotations

import pytest
import torch

from lib.app import preflight
from lib.spectrum import algorithms as spectrum
from lib.spectrum import vectors

F64 = torch.float64


def _dense(n: int = 300, top=(10.0, 9.0, 8.0), seed: int = 0) -> torch.Tensor:
    """A symmetric matrix with separated top eigenvalues ``top`` over a bulk uniform in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    ev = torch.cat([torch.tensor(top, dtype=F64), torch.rand(n - len(top), generator=g, dtype=F64)])
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q @ torch.diag(ev) @ q.T


def test_random_draws_are_global_whatever_the_sharding(monkeypatch):
    monkeypatch.setattr(vectors, "CHUNK", 8)  # segments cross several chunks
    n = 37
    whole = vectors.local_space(n).random(3, seed=5, kind="rademacher")
    segs = ((0, 5), (13, 17), (30, 7))
    part = vectors.VectorSpace(n, segs).random(3, seed=5, kind="rademacher")
    torch.testing.assert_close(part, torch.cat([whole[a : a + k] for a, k in segs]), rtol=0, atol=0)
    g = vectors.local_space(n).random(2, seed=5, kind="gaussian")
    assert not torch.equal(g, vectors.local_space(n).random(2, seed=6, kind="gaussian"))
    torch.testing.assert_close(
        vectors.local_space(n).random(1, 5, "gaussian", first=1), g[:, 1:], rtol=0, atol=0
    )


def test_cullum_willoughby_removes_the_ghosts_of_lanczos_without_reorthogonalization(monkeypatch):
    h = _dense()
    exact = torch.linalg.eigvalsh(h).flip(0)[:3]
    run = lambda: spectrum.lanczos(
        lambda v: h @ v, 300, 3, tol=1e-17, max_iter=120, seed=0, reorth="none", eigenvectors=False
    )  # noqa: E731
    r = run()
    assert r.ghosts > 0 and r.stored_vectors == 0
    torch.testing.assert_close(r.eigenvalues, exact, rtol=1e-12, atol=0)
    top = r.ritz_values[r.ritz_values > 5]
    assert top.numel() == 3  # one copy each
    monkeypatch.setattr(spectrum, "cullum_willoughby", lambda t, *a: torch.arange(t.shape[0]))
    raw = run()
    assert (
        raw.ritz_values > 9.5
    ).sum() >= 2  # unfiltered, the converged top eigenvalue comes back as ghost copies


@pytest.mark.parametrize("reorth", ["full", "selective", "none"])
def test_every_reorthogonalization_finds_the_top_eigenvalues(reorth):
    h = _dense()
    r = spectrum.lanczos(lambda v: h @ v, 300, 3, tol=1e-10, max_iter=120, seed=1, reorth=reorth)
    torch.testing.assert_close(
        r.eigenvalues, torch.linalg.eigvalsh(h).flip(0)[:3], rtol=1e-10, atol=0
    )
    assert bool(r.converged.all()) and r.reorth == reorth
    y = r.eigenvectors
    torch.testing.assert_close(h @ y, y * r.eigenvalues, rtol=0, atol=1e-7)
    if reorth == "selective":
        assert r.stored_vectors > r.passes  # the basis plus the converged Ritz vectors


def test_selective_and_none_need_block_size_one():
    with pytest.raises(ValueError, match="block_size 1"):
        spectrum.lanczos(lambda v: v, 10, 1, block_size=2, reorth="none")


def test_host_and_disk_storage_give_the_same_numbers_and_clean_up(tmp_path):
    h = _dense(120)
    runs = {}
    for storage in ("device", "cpu", "disk"):
        runs[storage] = spectrum.lanczos(
            lambda v: h @ v,
            120,
            3,
            tol=1e-10,
            max_iter=60,
            seed=2,
            storage=storage,
            storage_dir=tmp_path,
        )
        d = spectrum.slq(lambda v: h @ v, 120, 3, 8, seed=3, storage=storage, storage_dir=tmp_path)
        runs[storage + "slq"] = d
    for storage in ("cpu", "disk"):
        assert torch.equal(runs[storage].eigenvalues, runs["device"].eigenvalues)
        assert torch.equal(runs[storage + "slq"].ritz_values, runs["deviceslq"].ritz_values)
    assert list(tmp_path.iterdir()) == []  # memory-mapped blocks removed


def test_vectors_in_float32_still_give_the_top_eigenvalues():
    h = _dense(200)
    space = vectors.local_space(200, dtype=torch.float32)
    r = spectrum.lanczos(
        lambda v: (h @ v.double()).float(), 200, 3, tol=1e-5, max_iter=80, seed=0, space=space
    )
    torch.testing.assert_close(
        r.eigenvalues, torch.linalg.eigvalsh(h).flip(0)[:3], rtol=1e-5, atol=0
    )
    assert r.eigenvectors.dtype == torch.float32


def test_slq_without_reorthogonalization_keeps_the_moments():
    h = _dense(150)
    full = spectrum.slq(lambda v: h @ v, 150, 8, 20, seed=4)
    none = spectrum.slq(lambda v: h @ v, 150, 8, 20, seed=4, reorth="none")
    for m in (1, 2, 3):
        assert none.moment(m)[0] == pytest.approx(full.moment(m)[0], rel=1e-8)


def test_storage_choice_and_preflight_count_the_vectors():
    assert vectors.choose_storage("auto", 10, None, 100) == "device"
    assert vectors.choose_storage("auto", 80, None, 100) == "disk"
    assert vectors.choose_storage("auto", 10, 100, 1000) == "device"
    assert vectors.choose_storage("auto", 80, 100, 1000) == "cpu"
    assert vectors.choose_storage("auto", 800, 100, 1000) == "disk"
    assert vectors.choose_storage("cpu", 800, 100, 1000) == "cpu"
    count = dict(
        block_size=1,
        max_iter=100,
        eigenvectors=False,
        top_k=5,
        trace_hvps=30,
        density=True,
        slq_probes=4,
        lanczos_steps=30,
    )
    assert preflight.stored_vectors(reorth="full", **count) == 120  # SLQ's 4 x 30
    assert (
        preflight.stored_vectors(reorth="selective", **count) == 110
    )  # Lanczos' 100 + 2 x 5 Ritz vectors
    assert preflight.stored_vectors(reorth="none", **count) == 30  # Hutch++ only
    n = 10**6
    full = preflight.spectrum_estimate(n, 1, 120, 4)
    assert full.host >= 120 * n * 8 and full.disk == 0
    assert preflight.spectrum_estimate(n, 1, 30, 4).host < full.host / 3
    assert preflight.spectrum_estimate(n, 1, 120, 4, vector_bytes=4).host < full.host
    sharded = preflight.spectrum_estimate(n, 1, 120, 4, world=2)
    assert sharded.host == pytest.approx(full.host / 2, rel=1e-6)
    disk = preflight.spectrum_estimate(n, 1, 120, 4, storage="disk", pass_log_vectors=10)
    assert disk.disk == 120 * n * 8 and disk.host < full.host / 10 and disk.checkpoint == 10 * n * 8
    gpu = preflight.spectrum_estimate(n, 1, 120, 4, on_gpu=True)
    assert gpu.device > 120 * n * 8 > gpu.host


def test_ghost_filter_keeps_a_dense_bulk_whatever_the_tolerance():
    """Loose convergence tolerances must not merge distinct Ritz values of a packed bulk: the filter's tolerance is the
    vectors' rounding, not --tol."""
    h = _dense(
        300, top=(3.0, 2.5, 2.0)
    )  # bulk spacing ~3e-3: within --tol 1e-3 of the top value's scale
    r = spectrum.lanczos(
        lambda v: h @ v, 300, 3, tol=1e-3, max_iter=60, seed=0, reorth="none", eigenvectors=False
    )
    torch.testing.assert_close(
        r.eigenvalues, torch.linalg.eigvalsh(h).flip(0)[:3], rtol=1e-6, atol=0
    )
    assert r.ghosts == 0 and r.ritz_values.numel() == r.passes
