"""Curvature approximations next to the exact Hessian, on the same subset and samples, as one additive job.

Notation: ``f = sum_t l_t`` the summed next-token NLL over the predicted positions ``t`` of the samples,
``l_t = -log softmax(z_t)[y_t]``, ``z_t`` the logits (``(V,)``), ``p_t = softmax(z_t)``, ``J_t = dz_t/dx``
(``(V, n)``), ``N = b * (seqlen - 1)`` predicted tokens, ``P = b * seqlen`` positions. Every matrix is a sum
over samples, so each work unit (batch) returns its partial sums next to the exact Hessian's
(:class:`CurvatureJob` extends :class:`lib.hessian.ExactHessianJob`), and ``--devices``, checkpoints
and ``--resume`` apply unchanged. Normalized like the exact Hessian (divided by ``N``) unless stated:

* ``ggn`` -- ``sum_t J_t^T (diag p_t - p_t p_t^T) J_t / N`` (Schraudolph 2002; Martens 2020, "New insights
  and perspectives on the natural gradient method", JMLR 21). ``J_t`` is built one column per
  Jacobian-vector product of the LM head's inputs (through the fused head: ``J_t = W dh_t/dx``).
* ``fisher`` -- the sampled ("true") Fisher ``sum_t E_{y ~ p_t}[g_t g_t^T] / N``, ``g_t = J_t^T (p_t - e_y)``,
  estimated with ``S`` = ``--fisher_samples`` labels drawn from the model per position. Since
  ``E_y[(p - e_y)(p - e_y)^T] = diag p - p p^T``, it is an unbiased estimate of the GGN for softmax
  cross-entropy (its error falls like ``1/sqrt(S)``).
* ``empirical_fisher`` -- ``sum_samples g_s g_s^T / N`` with ``g_s`` the gradient of sample ``s``'s summed
  NLL at the true labels (the outer products the diagonal script's ``fisher`` estimator squares).
* ``gptq`` -- ``2/P * sum_positions x x^T`` with ``x`` the input of each slice's layer at its entries' input
  indices, one block per (layer, output row), zero elsewhere: the layer-wise proxy of OBS / GPTQ /
  SparseGPT (Frantar & Alistarh 2022, "Optimal Brain Compression"; Frantar et al. 2023, "GPTQ").
* ``kfac`` -- K-FAC ``A (x) G`` restricted to the subset, zero between layers (Martens & Grosse 2015;
  the "expand" form for weight sharing over positions, Eschenhagen et al. 2023): ``A = sum_positions
  x x^T / P`` and ``G = sum_positions E[delta delta^T] / N`` with ``delta`` the gradient of the sampled-label
  summed NLL w.r.t. the layer's outputs. For a single output row ``o`` it is ``gptq * G[o, o] / 2``.
* ``diag`` -- ``diag(H)`` as a matrix.

Jacobian-vector products use the double-backward identity ``J v = d/du <J^T u, v>`` (a backward of the
VJP graph, linear in ``u``): forward-mode AD (``torch.func.jvp``) through Hugging Face's eager attention gave
wrong tangents here (torch 2.13: ~15% off finite differences on OPT's and Llama's attention, exact on GPT-2).

Sampled labels of sample ``i``, draw ``j`` come from a generator seeded by ``sha256(f"{seed}/labels/{i}/{j}")``
(the same for every worker); the perturbations by ``sha256(f"{seed}/perturbations")``.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .hessian import ExactHessianJob, HessianResult, Progress
from .jobs import derived_seed
from .loss import SubsetLoss
from .subsets import Subset

APPROXIMATIONS = ("ggn", "fisher", "empirical_fisher", "gptq", "kfac", "diag")
JACOBIAN_BASED = ("ggn", "fisher", "empirical_fisher")
LAYER_BASED = ("gptq", "kfac")
SAMPLED = ("fisher", "kfac")
LOGIT_CHUNK_ELEMENTS = 2**23
"""Most elements of one chunk of logit-space Jacobians ``(tokens, V, n)`` held at a time."""


# ----------------------------------------------------------------------------- flags


def add_flags(p: argparse.ArgumentParser) -> None:
    """``--compare`` and its settings (the exact scripts)."""
    g = p.add_argument_group("curvature approximations (compared with the exact Hessian)")
    g.add_argument("--compare", nargs="+", choices=APPROXIMATIONS, default=None, help="also compute these approximations on the same subset and samples, compare them with the exact Hessian, write <name>_compare.pt/.pdf/.png and a 'comparison' section in the JSON")
    g.add_argument("--fisher_samples", type=int, default=SETTINGS["fisher_samples"], help="labels drawn from the model per token position for fisher and kfac")
    g.add_argument("--perturbations", type=int, default=SETTINGS["perturbations"], help="random rounding-noise perturbations d for the predicted vs measured loss change (0 = none)")
    g.add_argument("--perturbation_bits", type=int, default=SETTINGS["perturbation_bits"], help="the perturbations are uniform in [-s/2, s/2], s the min-max round-to-nearest step with this many bits of the entry's weight row")
    g.add_argument("--compare_top_k", type=int, default=SETTINGS["compare_top_k"], help="k of the top-k eigenvector subspace overlap")


SETTINGS = {"fisher_samples": 4, "perturbations": 64, "perturbation_bits": 4, "compare_top_k": 8}
"""The comparison's settings and their defaults (they apply only with ``--compare``)."""


def check_flags(args: argparse.Namespace) -> None:
    """Validate the comparison flags (no model needed): a setting changed without ``--compare`` is refused
    rather than silently ignored."""
    if getattr(args, "compare", None) is None:
        changed = [f"--{flag}" for flag, default in SETTINGS.items() if getattr(args, flag, default) != default]
        if changed:
            raise UserError(f"{', '.join(changed)} only apply with --compare APPROX [APPROX ...]")
        return
    for flag, low in (("fisher_samples", 1), ("perturbations", 0), ("perturbation_bits", 1), ("compare_top_k", 1)):
        if getattr(args, flag) < low:
            raise UserError(f"--{flag} must be at least {low}, got {getattr(args, flag)}")


# ----------------------------------------------------------------------------- pure math


def sample_labels(probs: torch.Tensor, seed: int, sample: int, draw: int) -> torch.Tensor:
    """Labels ``y_t ~ probs[t]`` (``probs``: ``(T, V)``) for sample index ``sample``, draw ``draw``; ``(T,)`` on the CPU."""
    g = torch.Generator().manual_seed(derived_seed(seed, "labels", sample, draw))
    return torch.multinomial(probs.detach().to("cpu", torch.float64), 1, generator=g).squeeze(-1)


def ggn_sum(c: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``sum_t C_t^T (diag p_t - p_t p_t^T) C_t`` for logit Jacobians ``c`` (``(T, V, n)``) and ``p`` (``(T, V)``); ``(n, n)``."""
    u = torch.bmm(p.unsqueeze(1), c).squeeze(1)
    flat = c.reshape(-1, c.shape[-1])
    return (flat * p.reshape(-1, 1)).T @ flat - u.T @ u


def label_gradients(c: torch.Tensor, p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token gradients ``g_t = C_t^T (p_t - e_{y_t})`` (``(T, n)``) of ``l_t`` at labels ``labels`` (``(T,)``)."""
    u = torch.bmm(p.unsqueeze(1), c).squeeze(1)
    return u - c[torch.arange(c.shape[0], device=c.device), labels.to(c.device)]


def frobenius_metrics(a: torch.Tensor, h: torch.Tensor) -> dict[str, float]:
    """Relative Frobenius error of ``a`` against ``h``, raw and after the best scalar fit ``c = <a, h> / <a, a>``, and the cosine."""
    a, h = a.to(torch.float64), h.to(torch.float64)
    hn, an, dot = float(h.norm()), float(a.norm()), float((a * h).sum())
    c = dot / an**2 if an > 0 else 0.0
    return {
        "rel_frobenius": float((a - h).norm()) / hn,
        "best_scale": c,
        "rel_frobenius_scaled": float((c * a - h).norm()) / hn,
        "cosine": dot / (an * hn) if an > 0 else 0.0,
    }


def top_eigvecs(a: torch.Tensor, k: int) -> torch.Tensor:
    """Eigenvectors (``(n, k)``) of the ``k`` largest eigenvalues of the symmetric part of ``a``."""
    a = a.to(torch.float64)
    _, v = torch.linalg.eigh((a + a.T) / 2)
    return v[:, -k:]


def subspace_overlap(a: torch.Tensor, h: torch.Tensor, k: int) -> float:
    """``||U_a^T U_h||_F^2 / k`` in ``[0, 1]``: overlap of the top-``k`` eigenvector subspaces (1 = the same subspace)."""
    k = min(k, h.shape[0])
    return float((top_eigvecs(a, k).T @ top_eigvecs(h, k)).pow(2).sum()) / k


def quadratic_forms(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``d_j^T A d_j / 2`` for the rows ``d_j`` of ``d`` (``(m, n)``); ``(m,)``."""
    d = d.to(torch.float64)
    return 0.5 * ((d @ a.to(torch.float64)) * d).sum(1)


def prediction_metrics(pred: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Pearson correlation and relative error ``||pred - ref|| / ||ref||`` of predicted loss changes (``(m,)``)."""
    pred, ref = pred.to(torch.float64), ref.to(torch.float64)
    if pred.numel() < 2:
        return {"corr": float("nan"), "rel_error": float("nan")}
    pc, rc = pred - pred.mean(), ref - ref.mean()
    den = float(pc.norm() * rc.norm())
    return {"corr": float((pc * rc).sum()) / den if den > 0 else float("nan"), "rel_error": float((pred - ref).norm() / ref.norm())}


def compare_matrices(exact: torch.Tensor, approx: dict[str, torch.Tensor], top_k: int, perturbations: torch.Tensor | None = None, measured: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
    """All metrics of each approximation against ``exact`` (``(n, n)``).

    With ``perturbations`` (``(m, n)``): ``pred_vs_exact_*`` compares ``d^T A d / 2`` with ``d^T H d / 2``; each
    ``measured[label]`` (``(m,)``, a measured loss change per perturbation) adds ``pred_vs_<label>_*``, and an
    ``exact`` entry of its own (how well the quadratic model itself predicts it).
    """
    out: dict[str, dict[str, float]] = {}
    q_exact = quadratic_forms(exact, perturbations) if perturbations is not None and len(perturbations) else None
    measured = measured if q_exact is not None else None
    for name, a in approx.items():
        m = {**frobenius_metrics(a, exact), "top_k": min(top_k, exact.shape[0]), "top_k_overlap": subspace_overlap(a, exact, top_k)}
        if q_exact is not None:
            q = quadratic_forms(a, perturbations)
            m.update({f"pred_vs_exact_{k}": v for k, v in prediction_metrics(q, q_exact).items()})
            m.update({f"pred_vs_exact_scaled_{k}": v for k, v in prediction_metrics(m["best_scale"] * q, q_exact).items()})
            for label, ref in (measured or {}).items():
                m.update({f"pred_vs_{label}_{k}": v for k, v in prediction_metrics(q, ref).items()})
        out[name] = m
    if measured:
        out["exact"] = {f"pred_vs_{label}_{k}": v for label, ref in measured.items() for k, v in prediction_metrics(q_exact, ref).items()}
    return out


# ----------------------------------------------------------------------------- subset layout (gptq, kfac)


@dataclass(frozen=True)
class EntryLayout:
    """For each entry of ``x``: its linear layer (index into ``modules``), output row and input index."""

    modules: tuple[str, ...]
    layer: torch.Tensor  # (n,) long
    out_index: torch.Tensor  # (n,) long
    in_index: torch.Tensor  # (n,) long

    def same_layer(self) -> torch.Tensor:
        """``(n, n)`` bool: entries ``k, l`` belong to the same layer."""
        return self.layer[:, None] == self.layer[None, :]

    def same_row(self) -> torch.Tensor:
        """``(n, n)`` bool: same layer and same output row (a GPTQ/OBS block)."""
        return self.same_layer() & (self.out_index[:, None] == self.out_index[None, :])


def entry_layout(model: nn.Module, subset: Subset) -> EntryLayout:
    """The layout of ``subset``; every slice must be the weight of an ``nn.Linear`` or GPT-2 ``Conv1D`` (else :class:`UserError`).

    ``nn.Linear`` stores ``(out, in)``, ``Conv1D`` ``(in, out)`` (its input index is the first one).
    """
    modules: list[str] = []
    layer, out_idx, in_idx = [], [], []
    for s in subset.slices:
        mod_name = s.param_name[: -len(".weight")] if s.param_name.endswith(".weight") else None
        module = model.get_submodule(mod_name) if mod_name else None
        kind = type(module).__name__ if module is not None else None
        if kind not in ("Linear", "Conv1D") or module.weight.ndim != 2:
            raise UserError(f"--compare gptq/kfac need weights of linear layers; {s.param_name} is not one")
        if mod_name not in modules:
            modules.append(mod_name)
        rows, cols = s.flat_index // module.weight.shape[1], s.flat_index % module.weight.shape[1]
        o, i = (cols, rows) if kind == "Conv1D" else (rows, cols)
        layer.append(torch.full_like(s.flat_index, modules.index(mod_name)))
        out_idx.append(o)
        in_idx.append(i)
    return EntryLayout(tuple(modules), torch.cat(layer), torch.cat(out_idx), torch.cat(in_idx))


def gather_columns(per_module: dict[str, torch.Tensor], layout: EntryLayout, index: torch.Tensor) -> torch.Tensor:
    """``(positions, n)``: column ``k`` is ``per_module[layer of k][..., index[k]]`` flattened over positions (float64)."""
    cols = []
    for j, name in enumerate(layout.modules):
        t = per_module[name]
        cols.append((j, t.reshape(-1, t.shape[-1]).to(torch.float64)))
    n = len(layout.layer)
    out = torch.empty(cols[0][1].shape[0], n, dtype=torch.float64)
    for j, t in cols:
        sel = (layout.layer == j).nonzero().squeeze(-1)
        out[:, sel] = t[:, index[sel].to(t.device)].cpu()
    return out


def layer_inputs_and_output_grads(model: nn.Module, layout: EntryLayout, input_ids: torch.Tensor, draws: int, seed: int, first_sample: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Inputs of the layout's layers (``(B, s, in)`` each) and, for each of ``draws`` sampled label sets, the
    gradients of the sampled-label summed NLL w.r.t. their outputs (``(B, s, out)`` each).

    Forward hooks record each input and add a zero tensor to each output, whose gradient is the gradient
    w.r.t. that output (the network's graph is unchanged). Row ``r`` of ``input_ids`` is sample ``first_sample + r``.
    """
    inputs: dict[str, torch.Tensor] = {}
    zeros: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(module, args, output):
            inputs[name] = args[0].detach()
            if draws:
                zeros[name] = torch.zeros_like(output, requires_grad=True)
                return output + zeros[name]
            return None

        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in layout.modules]
    try:
        with torch.set_grad_enabled(draws > 0):
            logits = model(input_ids=input_ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    grads: list[dict[str, torch.Tensor]] = []
    if draws:
        z = logits[:, :-1].reshape(-1, logits.shape[-1])
        probs = torch.softmax(z.detach().to(torch.float64), -1).view(input_ids.shape[0], -1, z.shape[-1])
        names = list(zeros)
        for j in range(draws):
            y = torch.cat([sample_labels(probs[r], seed, first_sample + r, j) for r in range(input_ids.shape[0])]).to(z.device)
            loss = F.cross_entropy(z, y, reduction="sum")
            gs = torch.autograd.grad(loss, [zeros[n] for n in names], retain_graph=j + 1 < draws)
            grads.append(dict(zip(names, gs)))
    return inputs, grads


# ----------------------------------------------------------------------------- Jacobians


def jacobian_columns(out: torch.Tensor, x: torch.Tensor, vectors: torch.Tensor, progress: Progress | None = None) -> torch.Tensor:
    """``J v`` for the rows ``v`` of ``vectors`` (``(m, n)``), ``J = d out / d x`` (``out`` built from ``x`` with a graph).

    Double backward: ``J^T u`` is built once with ``create_graph`` for a dummy ``u``; ``J v`` is its
    derivative w.r.t. ``u`` in direction ``v``. Returns ``(m, *out.shape)``.
    """
    u = torch.zeros_like(out, requires_grad=True)
    (jt_u,) = torch.autograd.grad(out, x, grad_outputs=u, create_graph=True)
    cols = torch.empty(vectors.shape[0], *out.shape, dtype=out.dtype, device=out.device)
    for j, v in enumerate(vectors):
        (cols[j],) = torch.autograd.grad(jt_u, u, grad_outputs=v.to(x), retain_graph=j + 1 < len(vectors))
        if progress is not None:
            progress(1)
    return cols


def logit_jacobian_chunks(jac: torch.Tensor, weight: torch.Tensor | None, max_elements: int = LOGIT_CHUNK_ELEMENTS):
    """Yield ``(token slice, C)`` with ``C = W J_t`` (``(chunk, V, n)``, float64) from feature Jacobians ``jac`` (``(T, m, n)``).

    ``weight=None``: the features are the logits (``C = J_t``).
    """
    t, _, n = jac.shape
    v = jac.shape[1] if weight is None else weight.shape[0]
    step = max(1, max_elements // max(1, v * n))
    for a in range(0, t, step):
        j = jac[a : a + step].to(torch.float64)
        yield slice(a, a + step), (j if weight is None else torch.matmul(weight.to(torch.float64), j))


class GGNOperator:
    """``v -> G v`` with ``G = sum_t J_t^T (diag p_t - p_t p_t^T) J_t`` the GGN of ``objective``'s summed NLL on one batch at ``x0``.

    Built once per batch (one forward and one ``create_graph`` VJP ``J^T u`` for a dummy ``u``); each product is
    one JVP ``J v`` (double backward, see the module doc), the softmax Hessian through the head, and one VJP:
    no Hessian of the network is formed. ``J`` is the Jacobian of the softmax's inputs (the head's inputs
    with the fused head). :attr:`nll` is the batch's summed NLL.
    """

    def __init__(self, objective: SubsetLoss, x0: torch.Tensor, input_ids: torch.Tensor):
        self.x = x0.detach().clone().requires_grad_(True)
        self.feats, self.weight, bias = objective.features(self.x, input_ids)
        f = self.feats.detach()
        logits = f if self.weight is None else f @ self.weight.detach().T + (0 if bias is None else bias.detach())
        self.p = torch.softmax(logits, -1)
        labels = input_ids[:, 1:].reshape(-1).to(logits.device)
        self.nll = F.cross_entropy(logits, labels, reduction="sum")
        self.u = torch.zeros_like(self.feats, requires_grad=True)
        (self.jt_u,) = torch.autograd.grad(self.feats, self.x, grad_outputs=self.u, create_graph=True)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``G v`` for ``v``: ``(n,)``."""
        (jv,) = torch.autograd.grad(self.jt_u, self.u, grad_outputs=v.to(self.x), retain_graph=True)
        w = self.weight.detach() if self.weight is not None else None
        a = jv if w is None else jv @ w.T
        k = self.p * (a - (self.p * a).sum(-1, keepdim=True))
        (gv,) = torch.autograd.grad(self.feats, self.x, grad_outputs=k if w is None else k @ w, retain_graph=True)
        return gv


# ----------------------------------------------------------------------------- the additive job


class CurvatureJob(ExactHessianJob):
    """The exact Hessian's job plus the partial sums of the approximations (and perturbed losses) per unit.

    Extra partial keys (all summed over samples, unnormalized): ``ggn_sum``, ``fisher_sum`` (summed over the
    ``fisher_samples`` draws too), ``empirical_fisher_sum``, ``input_gram`` (``sum x x^T`` over positions, masked
    to same-layer pairs), ``kfac_g_sum`` (``sum delta delta^T`` over positions and draws, same-layer pairs),
    ``loss_change_sum`` (``(m, 2)``: ``f(x0 +- d_j) - f(x0)`` per perturbation).
    """

    def __init__(self, subset: Subset, samples: torch.Tensor, approximations: list[str], fisher_samples: int = 4, perturbations: torch.Tensor | None = None, seed: int = 0, **exact: Any):
        super().__init__(subset, samples, **exact)
        unknown = set(approximations) - set(APPROXIMATIONS)
        if unknown:
            raise ValueError(f"unknown approximations {sorted(unknown)}; choose from {APPROXIMATIONS}")
        self.approximations, self.fisher_samples, self.seed = list(approximations), fisher_samples, seed
        self.perturbations = torch.zeros(0, subset.size, dtype=torch.float64) if perturbations is None else perturbations.to(torch.float64)

    def wants(self, group: tuple[str, ...]) -> bool:
        return any(a in group for a in self.approximations)

    def setup(self, device: torch.device) -> None:
        super().setup(device)
        self._layout = entry_layout(self.model, self.subset) if self.wants(LAYER_BASED) else None

    def steps_per_unit(self) -> int:
        return super().steps_per_unit() + (self.subset.size if self.wants(JACOBIAN_BASED) else 0)

    def run_unit(self, k: int, progress: Progress | None = None) -> dict[str, torch.Tensor]:
        out = super().run_unit(k, progress)
        batch = self.samples[k * self.model_input_bs : (k + 1) * self.model_input_bs].to(self._x0.device)
        first = k * self.model_input_bs
        if self.wants(JACOBIAN_BASED):
            out.update(self._jacobian_sums(batch, first, progress))
        if self._layout is not None:
            out.update(self._layer_sums(batch, first))
        if len(self.perturbations):
            out["loss_change_sum"] = self._loss_changes(batch)
        return out

    def _jacobian_sums(self, batch: torch.Tensor, first: int, progress: Progress | None) -> dict[str, torch.Tensor]:
        """GGN, sampled Fisher and empirical Fisher sums of one batch from the Jacobian of the softmax's inputs."""
        n = self.subset.size
        x = self._x0.detach().clone().requires_grad_(True)
        feats, weight, bias = self._objective.features(x, batch)
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        jac = jacobian_columns(feats, x, eye, progress).permute(1, 2, 0)  # (T, m, n)
        feats = feats.detach()
        logits = feats if weight is None else feats @ weight.T + (0 if bias is None else bias)
        p = torch.softmax(logits.to(torch.float64), -1)
        per_row = batch.shape[1] - 1
        true = batch[:, 1:].reshape(-1)
        want = set(self.approximations)
        labels = [torch.cat([sample_labels(p[r * per_row : (r + 1) * per_row], self.seed, first + r, j) for r in range(batch.shape[0])]) for j in range(self.fisher_samples)] if "fisher" in want else []
        ggn = torch.zeros(n, n, dtype=torch.float64)
        fisher = torch.zeros(n, n, dtype=torch.float64)
        grads = torch.zeros(batch.shape[0], n, dtype=torch.float64)
        rows = torch.arange(p.shape[0]) // per_row
        for sl, c in logit_jacobian_chunks(jac, None if weight is None else weight.detach()):
            pc = p[sl].to(c.device)
            if "ggn" in want:
                ggn += ggn_sum(c, pc).cpu()
            for y in labels:
                g = label_gradients(c, pc, y[sl])
                fisher += (g.T @ g).cpu()
            if "empirical_fisher" in want:
                grads.index_add_(0, rows[sl], label_gradients(c, pc, true[sl]).cpu())
        out = {}
        if "ggn" in want:
            out["ggn_sum"] = ggn
        if "fisher" in want:
            out["fisher_sum"] = fisher
        if "empirical_fisher" in want:
            out["empirical_fisher_sum"] = grads.T @ grads
        return out

    def _layer_sums(self, batch: torch.Tensor, first: int) -> dict[str, torch.Tensor]:
        """Gram of the layers' inputs and (K-FAC) of the sampled output gradients, on same-layer pairs."""
        layout = self._layout
        draws = self.fisher_samples if "kfac" in self.approximations else 0
        inputs, grads = layer_inputs_and_output_grads(self.model, layout, batch, draws, self.seed, first)
        mask = layout.same_layer()
        xs = gather_columns(inputs, layout, layout.in_index)
        out = {"input_gram": (xs.T @ xs) * mask}
        if draws:
            g = torch.zeros_like(out["input_gram"])
            for d in grads:
                ds = gather_columns(d, layout, layout.out_index)
                g += ds.T @ ds
            out["kfac_g_sum"] = g * mask
        return out

    @torch.no_grad()
    def _loss_changes(self, batch: torch.Tensor) -> torch.Tensor:
        """``(m, 2)``: ``f(x0 + d_j; batch) - f(x0; batch)`` and ``f(x0 - d_j; batch) - f(x0; batch)`` for each perturbation ``d_j``."""
        x0 = self._x0.detach()
        base = self._objective(x0, batch)
        return torch.stack([torch.stack([self._objective(x0 + sign * d.to(x0), batch) - base for sign in (1, -1)]) for d in self.perturbations]).to(torch.float64)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "kind": "exact_hessian+curvature",
            "approximations": self.approximations,
            "fisher_samples": self.fisher_samples,
            "seed": self.seed,
            "perturbations_sha256": hashlib.sha256(self.perturbations.numpy().tobytes()).hexdigest(),
        }


# ----------------------------------------------------------------------------- results


def rounding_perturbations(model: nn.Module, subset: Subset, count: int, bits: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d (count, n), s (n,))``: ``d`` uniform in ``[-s/2, s/2]`` per entry, ``s = (max - min) / (2^bits - 1)`` of the
    entry's weight row (output unit; the whole weight for parameters that are not matrices), the step of
    min-max round-to-nearest quantization with ``bits`` bits."""
    steps = []
    for sl in subset.slices:
        w = model.get_parameter(sl.param_name).detach().to("cpu", torch.float64)
        if w.ndim == 2:
            module = model.get_submodule(sl.param_name.rsplit(".", 1)[0])
            rows_first = type(module).__name__ != "Conv1D"
            by_row = w if rows_first else w.T
            step = (by_row.amax(1) - by_row.amin(1)) / (2**bits - 1)
            r, c = sl.flat_index // w.shape[1], sl.flat_index % w.shape[1]
            steps.append(step[r if rows_first else c])
        else:
            steps.append(torch.full((len(sl),), float(w.max() - w.min()) / (2**bits - 1), dtype=torch.float64))
    s = torch.cat(steps)
    g = torch.Generator().manual_seed(derived_seed(seed, "perturbations"))
    return (torch.rand(count, subset.size, generator=g, dtype=torch.float64) - 0.5) * s, s


def approximation_matrices(sums: dict[str, torch.Tensor], result: HessianResult, approximations: list[str], fisher_samples: int, layout: EntryLayout | None, seqlen: int) -> dict[str, torch.Tensor]:
    """``{"exact": H, approx: matrix}`` (float64, ``(n, n)``) from the summed partials, normalized as documented above."""
    n_tok, positions = result.n_tokens, result.n_samples * seqlen
    h = result.hessian_sum.to(torch.float64) / n_tok
    out = {"exact": h}
    for a in approximations:
        if a == "ggn":
            out[a] = sums["ggn_sum"] / n_tok
        elif a == "fisher":
            out[a] = sums["fisher_sum"] / (fisher_samples * n_tok)
        elif a == "empirical_fisher":
            out[a] = sums["empirical_fisher_sum"] / n_tok
        elif a == "gptq":
            out[a] = 2 * sums["input_gram"] * layout.same_row() / positions
        elif a == "kfac":
            out[a] = (sums["input_gram"] / positions) * (sums["kfac_g_sum"] / (fisher_samples * n_tok))
        elif a == "diag":
            out[a] = torch.diag(h.diagonal())
    return out


def make_job(args: argparse.Namespace, exact: ExactHessianJob) -> CurvatureJob:
    """The comparison job of a run: ``exact``'s work plus ``args.compare`` (validated before any heavy work)."""
    check_flags(args)
    if any(a in LAYER_BASED for a in args.compare):
        entry_layout(exact.model, exact.subset)
    d, _ = rounding_perturbations(exact.model, exact.subset, args.perturbations, args.perturbation_bits, args.seed)
    settings = dict(model_input_bs=exact.model_input_bs, method=exact.method, chunk=exact.chunk, fused_head=exact.fused_head, spec=exact.spec, model=exact.model, fd=exact.fd)
    return CurvatureJob(exact.subset, exact.samples, list(dict.fromkeys(args.compare)), args.fisher_samples, d, args.seed, **settings)


def write_comparison(out_dir: Path, name: str, job: CurvatureJob, sums: dict[str, torch.Tensor], result: HessianResult, title: str, top_k: int = 8) -> dict[str, Any]:
    """Write ``<name>_compare.pt`` (``{"exact": H, approx: matrix}``) and its figure.

    Returns the JSON additions: ``{"comparison": {approx: metrics}, "comparison_details": {...}}``.
    """
    from .plots import comparison_figure
    from .results import atomic_write_bytes

    layout = entry_layout(job.model, job.subset) if job.wants(LAYER_BASED) else None
    mats = approximation_matrices(sums, result, job.approximations, job.fisher_samples, layout, job.samples.shape[1])
    d = job.perturbations
    measured = None
    if "loss_change_sum" in sums:
        change = sums["loss_change_sum"] / result.n_tokens
        measured = {"measured": change[:, 0], "measured_even": change.mean(1)}
    metrics = compare_matrices(mats["exact"], {k: v for k, v in mats.items() if k != "exact"}, top_k, d if len(d) else None, measured)
    out_dir.mkdir(parents=True, exist_ok=True)
    pt = out_dir / f"{name}_compare.pt"
    atomic_write_bytes(pt, lambda p: torch.save({k: v.to(result.hessian.dtype) for k, v in mats.items()}, p))
    figures = comparison_figure(mats, metrics, out_dir / f"{name}_compare", title)
    details: dict[str, Any] = {
        "fisher_samples": job.fisher_samples,
        "perturbations": len(d),
        "perturbation_step": "uniform in [-s/2, s/2], s = (max - min) / (2^bits - 1) of the entry's weight row",
        "file": pt.name,
        "figures": [p.name for p in figures],
        "metrics": "against the exact Hessian H: rel_frobenius = ||A - H||_F / ||H||_F; rel_frobenius_scaled after the best scalar fit best_scale * A; cosine = <A, H> / (||A|| ||H||); top_k_overlap = ||U_A^T U_H||_F^2 / k (top-k eigenvectors); pred_vs_exact_*: d^T A d / 2 against d^T H d / 2 over the perturbations (corr, rel_error; _scaled after best_scale); pred_vs_measured_*: against the measured f(x0 + d) - f(x0) of the mean NLL (with its first-order term g^T d, which the quadratic proxies ignore); pred_vs_measured_even_*: against (f(x0 + d) + f(x0 - d)) / 2 - f(x0) = d^T H d / 2 + O(d^4), the measured second-order part ('exact': the quadratic model itself)",
        "normalizations": "ggn, fisher, empirical_fisher, kfac's G: divided by b*(seqlen-1) like H; gptq = 2/(b*seqlen) sum x x^T; kfac = A (x) G with A = sum x x^T / (b*seqlen), so on a single row kfac = gptq * G[o, o] / 2",
    }
    if measured is not None:
        details["loss_change_mean"] = {**{k: float(v.mean()) for k, v in measured.items()}, "quadratic_exact": float(quadratic_forms(mats["exact"], d).mean())}
    return {"comparison": metrics, "comparison_details": details}
