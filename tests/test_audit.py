"""The float64 audit of a run's products (issue 28): it measures an injected error, agrees with the error against an
independently computed float64 Hessian for bf16 and finite-difference products, and --matmul_precision is recorded
and part of the result's identity."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from conftest import LAYER, tiny_ids, tiny_model

import single_layer_single_block
from lib.app import cli
from lib.hessian.exact import ExactHessianJob
from lib.model.models import ModelSpec
from lib.objective.loss import SubsetLoss
from lib.objective.subsets import single_layer_single_block as row_subset
from lib.products import audit
from lib.products.finite_difference import FDSettings, FiniteDifference
from lib.products.operator import ReverseOverReverse
from lib.runtime.jobs import run_serial

FAST = ["--t", "3", "--seqlen", "16", "--b", "2", "--no_progress"]


@dataclass(frozen=True)
class Perturbed(ReverseOverReverse):
    """Exact products, each then moved by ``rel`` of its own norm: scaled by ``1 + rel`` (``how="scale"``) or pushed
    along a fixed random direction orthogonal to it (``how="orthogonal"``); either way ``||hv' - hv|| = rel ||hv||``."""

    name: str = "perturbed"
    rel: float = 0.03
    how: str = "scale"

    def __call__(self, graph, rows, count, sink, chunk, progress=None, start=0):
        def moved(a, v, hv):
            if self.how == "scale":
                return sink(a, v, hv * (1 + self.rel))
            gen = torch.Generator().manual_seed(a)
            r = torch.randn(hv.shape, generator=gen, dtype=torch.float64).to(hv.dtype)
            r = r - (r * hv).sum(1, keepdim=True) / (hv * hv).sum(1, keepdim=True) * hv
            r = r / r.norm(dim=1, keepdim=True) * hv.norm(dim=1, keepdim=True)
            sink(a, v, hv + self.rel * r)

        return super().__call__(graph, rows, count, moved, chunk, progress, start)


def _float64_hessian(model, subset, ids) -> torch.Tensor:
    """The independent reference: ``torch.autograd.functional.hessian`` of the mean NLL on a float64 copy."""
    m64 = audit.float64_copy(model)
    loss = SubsetLoss(m64, subset)
    x0 = loss.x0().detach()
    n_tokens = ids.shape[0] * (ids.shape[1] - 1)
    return torch.autograd.functional.hessian(lambda x: loss(x, ids) / n_tokens, x0)


@pytest.mark.parametrize("how", ["scale", "orthogonal"])
def test_the_audit_reports_an_injected_error_within_ten_percent(how):
    model = tiny_model("llama", torch.float64)
    subset = row_subset(model, LAYER["llama"], 0, 12)
    ids = tiny_ids(2, 8)
    rel = 0.03
    run_path = audit.operator_path(  # one batch: the per-batch perturbations do not average
        model, subset, ids, Perturbed(rel=rel, how=how), model_input_bs=2
    )
    reference = audit.float64_reference(model, subset, ids)
    res = audit.audit_products(run_path, reference, audit.rademacher_vectors(12, 4, 0), 2)
    assert len(res.rel_errors) == 4
    for e in res.rel_errors:
        assert abs(e - rel) <= 0.1 * rel, res.rel_errors
    assert abs(res.max_rel_error - rel) <= 0.1 * rel and not res.exceeds
    assert "max rel. error 3.0e-02 against float64 exact" in res.line()
    exact = audit.audit_products(
        audit.operator_path(model, subset, ids, ReverseOverReverse()),
        reference,
        audit.rademacher_vectors(12, 4, 0),
        2,
    )
    assert exact.max_rel_error < 1e-12  # the same path: no error to report


@pytest.mark.parametrize(
    "arch, dtype, products",
    [
        ("opt", torch.bfloat16, ReverseOverReverse()),
        ("llama", torch.float32, FiniteDifference(FDSettings())),
        ("gpt2", torch.float64, FiniteDifference(FDSettings())),
    ],
    ids=["bf16-opt", "fd-float32-llama", "fd-float64-gpt2"],
)
def test_the_audited_error_is_the_error_against_an_independent_float64_hessian(
    arch, dtype, products
):
    """The exact scripts' audit (K of the block's own columns, as :class:`ExactHessianJob` computed them) and the
    operator's (Rademacher probes, as the diagonal and the spectrum take them) against
    ``torch.autograd.functional.hessian`` of a float64 copy."""
    model = tiny_model(arch, torch.float32).to(dtype)
    subset = row_subset(model, LAYER[arch], 0, 10)
    ids = tiny_ids(2, 8)
    h64 = _float64_hessian(model, subset, ids)
    reference = audit.float64_reference(model, subset, ids)

    job = ExactHessianJob(subset, ids, model=model, products=products)
    sums = run_serial(
        job, torch.device("cpu")
    )  # the products' float64 sums (the .pt stores them in the dtype)
    h_run = sums["hessian_sum"] / (ids.shape[0] * (ids.shape[1] - 1))
    vectors, cols = audit.column_vectors(subset.size, 4, 1)
    res = audit.audit_products(audit.matrix_path(h_run), reference, vectors, 2, columns=cols)
    truth = [float((h_run[:, i] - h64[:, i]).norm() / h64[:, i].norm()) for i in cols]
    assert min(truth) > (
        1e-9 if dtype == torch.float64 else 1e-4
    )  # an error there is to be measured
    for got, want in zip(res.rel_errors, truth, strict=True):
        assert abs(got - want) <= 0.1 * want, (res.rel_errors, truth)

    v = audit.rademacher_vectors(subset.size, 4, 2)
    run_path = audit.operator_path(model, subset, ids, products)
    res = audit.audit_products(run_path, reference, v, 2)
    hv, want_v = run_path(v), h64 @ v
    truth = ((hv - want_v).norm(dim=0) / want_v.norm(dim=0)).tolist()
    for got, want in zip(res.rel_errors, truth, strict=True):
        assert abs(got - want) <= 0.1 * want, (res.rel_errors, truth)
    delta = (hv - want_v).norm() / v.norm() * subset.size**0.5
    assert abs(res.delta_norm - float(delta)) <= 1e-6 * float(delta)


def test_fd_step_auto_takes_the_ladder_step_with_the_smallest_audited_error():
    model = tiny_model(
        "gpt2", torch.float64
    )  # float64: truncation and rounding balance inside the ladder
    subset = row_subset(model, LAYER["gpt2"], 0, 8)
    ids = tiny_ids(2, 8)
    v = audit.rademacher_vectors(8, 3, 0)
    ref = audit.float64_reference(model, subset, ids)(v)
    run_at = lambda h: audit.operator_path(  # noqa: E731
        model, subset, ids, FiniteDifference(FDSettings(False, h))
    )
    h, ladder = audit.choose_fd_step(run_at, ref, v, torch.float64)
    assert [r["relative_step"] for r in ladder] == list(audit.FD_LADDER)
    assert h == min(ladder, key=lambda r: r["max_rel_error"])["relative_step"]
    errs = {r["relative_step"]: r["max_rel_error"] for r in ladder}
    assert (
        errs[h] < errs[1e-6] and errs[h] < errs[1e-2]
    )  # rounding at the small end, truncation at the large one
    bf16 = audit.choose_fd_step(run_at, ref, v, torch.bfloat16)[1]
    assert [r["relative_step"] for r in bf16] == [1e-2]  # the others underflow bf16


def test_defaults_audit_only_the_approximate_paths():
    d = audit.default_products
    assert d("float64", "exact", "highest") == 0 and d("float32", "exact", "highest") == 0
    assert d("float32", "exact", "high") == d("bfloat16", "exact", "highest") == 4
    assert d("float64", "finite_difference", "highest") == 4
    assert d("float32", "finite_difference", "highest", fsdp=True) == 0


def test_eigenvalue_bounds_add_the_audited_product_error_to_the_residuals():
    res = audit.AuditResult(4, 2, "Rademacher", (0.1,), 0.1, 0.1, 0.1, 0.5, 0.1, 0.0, 0.0)
    b = audit.eigenvalue_bounds({"eigenvalues": [3.0, 2.0], "residuals": [1e-3, 2e-3]}, res)
    assert b["bounds"] == [0.501, 0.502]
    assert audit.eigenvalue_bounds({"eigenvalues": [3.0], "residuals": [1e-3]}, None)["bounds"] == [
        1e-3
    ]


# ----------------------------------------------------------------------------- the scripts


def _json(tmp_path, name):
    return json.loads((tmp_path / f"{name}.json").read_text())


@pytest.mark.slow
def test_matmul_precision_is_recorded_audited_and_restored_on_cpu(tmp_path, capsys):
    """On CPU, high and medium run (no TF32 there: float32's error) and are recorded; the process's precision is
    the run's only while it runs."""
    for precision in ("high", "medium"):
        single_layer_single_block.run(
            [
                *FAST,
                "--output_dir",
                str(tmp_path),
                "--name",
                precision,
                "--matmul_precision",
                precision,
            ]
        )
        js = _json(tmp_path, precision)
        assert js["config"]["model"]["matmul_precision"] == precision
        assert js["computed_on"]["matmul_precision"] == precision
        assert js["audit"]["products"] == 3 and js["audit"]["columns"] == sorted(
            js["audit"]["columns"]
        )
        assert 0 < js["audit"]["max_rel_error"] < 0.1 and js["audit"]["cost_relative_to_run"] > 0
        assert torch.get_float32_matmul_precision() == "highest"
        out = capsys.readouterr().out
        assert "audit: 3 products, max rel. error" in out and f"(matmul {precision})" in out
    single_layer_single_block.run([*FAST, "--output_dir", str(tmp_path), "--name", "default"])
    assert _json(tmp_path, "default")["audit"] == {
        "products": 0,
        "why": "exact products at full precision: nothing to audit",
    }
    assert "audit:" not in capsys.readouterr().out


def test_a_resume_with_another_matmul_precision_is_refused(tmp_path, capsys):
    argv = [
        *FAST,
        "--output_dir",
        str(tmp_path),
        "--name",
        "h",
        "--keep_checkpoint",
        "--checkpoint_every",
        "1",
    ]
    single_layer_single_block.run([*argv, "--matmul_precision", "high"])
    with pytest.raises(SystemExit) as exc:
        cli.main(single_layer_single_block.run, [*argv, "--resume", "--overwrite"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "different configuration" in err and "matmul_precision" in err, err


def test_worker_processes_load_with_the_run_precision():
    spec = ModelSpec(matmul_precision="medium")
    assert spec.identity()["matmul_precision"] == "medium"
    assert "matmul_precision" not in ModelSpec().identity()  # default runs keep their identity
    before = torch.get_float32_matmul_precision()
    try:
        spec.load()
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)


def test_finite_difference_runs_are_audited_with_their_step_and_truncation(tmp_path, capsys):
    single_layer_single_block.run(
        [
            *FAST,
            "--output_dir",
            str(tmp_path),
            "--name",
            "fd",
            "--hvp",
            "finite_difference",
            "--fd_step",
            "auto",
        ]
    )
    js = _json(tmp_path, "fd")
    fd = js["audit"]["fd"]
    assert fd["auto"] and fd["relative_step"] in audit.FD_LADDER
    assert (
        fd["relative_step"] == min(fd["ladder"], key=lambda r: r["max_rel_error"])["relative_step"]
    )
    assert fd["truncation_error_estimate"] >= 0 and js["config"]["compute"]["fd_step"] == "auto"
    assert js["hvp"]["relative_step"] == fd["relative_step"]
    assert "audited: max rel. error" in capsys.readouterr().out


def test_audit_flags_are_checked_before_anything_loads(no_model_load, tmp_path):
    from lib.errors import UserError

    for argv, msg in [
        (["--audit", "-1"], "--audit must be at least 0"),
        (["--audit_b", "3"], "--audit_b 3 is more than the run's --b 2"),
        (["--audit_tol", "0"], "--audit_tol must be a positive number"),
        (
            ["--hvp", "finite_difference", "--fd_step", "auto", "--audit", "0"],
            "--fd_step auto chooses",
        ),
    ]:
        with pytest.raises(UserError, match=msg):
            single_layer_single_block.run([*FAST, "--output_dir", str(tmp_path), *argv])


def test_fsdp_refuses_the_audit_and_fd_step_auto_in_one_line(
    one_rank_env, no_model_load, tmp_path, monkeypatch
):
    import hessian_spectrum
    from lib.errors import UserError

    base = [*FAST, "--output_dir", str(tmp_path), "--fsdp", "--params", "*"]
    with pytest.raises(UserError, match="--audit is not available with --fsdp"):
        hessian_spectrum.run([*base, "--audit", "4"])
    with pytest.raises(UserError, match="--fd_step auto chooses the step by the float64 audit"):
        hessian_spectrum.run([*base, "--fd_step", "auto"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # ranks must not choose their own steps
    with pytest.raises(UserError, match="--fd_step auto under torchrun would let each rank choose"):
        hessian_spectrum.run(
            [
                *FAST,
                "--output_dir",
                str(tmp_path),
                "--hvp",
                "finite_difference",
                "--fd_step",
                "auto",
            ]
        )


@pytest.mark.slow
def test_diagonal_and_spectrum_runs_carry_their_audited_errors(tmp_path, capsys):
    """bf16 diagonal: the audit, and the bound on the error the products add to the diagonal; finite-difference
    spectrum: eigenvalue bounds = residual + the audit's ||dH||_F estimate, the figure title says it was audited."""
    import hessian_diagonal
    import hessian_spectrum

    out = ["--seqlen", "16", "--b", "2", "--no_progress", "--output_dir", str(tmp_path)]
    hessian_diagonal.run(
        [*out, "--name", "d", "--dtype", "bfloat16", "--hvps", "4", "--audit_b", "1"]
    )
    js = _json(tmp_path, "d")
    assert js["audit"]["products"] == 4 and js["audit"]["audit_b"] == 1
    assert js["audit"]["probes"] == "Rademacher" and js["audit"]["max_rel_error"] > 1e-3
    n = 128 * 128  # the embedded model's q_proj
    assert js["diagonal_product_error"]["per_entry_rms_bound"] == pytest.approx(
        js["audit"]["delta_norm"] / n**0.5
    )
    hessian_spectrum.run(
        [
            *out,
            "--name",
            "s",
            "--t",
            "8",
            "--top_k",
            "2",
            "--hvp",
            "finite_difference",
            "--audit",
            "2",
        ]
    )
    js = _json(tmp_path, "s")
    b = js["eigenvalue_error_bounds"]
    assert b["product_error_part"] == js["audit"]["delta_norm"] > 0
    assert b["bounds"] == [r + b["product_error_part"] for r in js["residuals"]]
    assert js["audit"]["fd"]["relative_step"] == js["hvp"]["relative_step"]
    printed = capsys.readouterr().out
    assert "audit: 2 products, max rel. error" in printed and "audited: max rel. error" in printed


def test_an_audit_that_fails_leaves_the_results_saved(tmp_path, capsys, monkeypatch):
    def no_memory(model):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(audit, "float64_copy", no_memory)
    single_layer_single_block.run(
        [*FAST, "--output_dir", str(tmp_path), "--name", "oom", "--dtype", "bfloat16"]
    )
    js = _json(tmp_path, "oom")
    assert js["audit"]["products"] == 0 and js["audit"]["why"].startswith(
        "the audit failed (OutOfMemoryError: CUDA out of memory (simulated))"
    )
    assert (tmp_path / "oom.pt").exists()
    assert "warning: the audit failed" in capsys.readouterr().err


def test_a_default_audit_that_would_not_fit_in_memory_is_left_out(tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "_free_bytes", lambda device: 2**20)  # 1 MiB free
    argv = [*FAST, "--output_dir", str(tmp_path), "--dtype", "bfloat16"]
    single_layer_single_block.run([*argv, "--name", "left"])
    why = _json(tmp_path, "left")["audit"]["why"]
    assert why.startswith("the float64 audit would take about") and "--audit K takes it" in why
    single_layer_single_block.run([*argv, "--name", "forced", "--audit", "2"])  # asked for: taken
    assert _json(tmp_path, "forced")["audit"]["products"] == 2
