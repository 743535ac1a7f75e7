"""Estimators, one module each, registered by name.

* :mod:`lib.estimators.diagonal` -- estimators of a whole weight's Hessian diagonal (``hessian_diagonal.py``,
  :func:`lib.hessian.diagonal.hessian_diagonal`): ``hutchinson``, ``xdiag``, ``empirical_fisher``, ``ggn``, ``exact``;
* :mod:`lib.estimators.approximations` -- dense curvature matrices compared with the exact Hessian (``--compare``,
  :class:`lib.hessian.curvature.CurvatureJob`): ``ggn``, ``fisher`` (sampled), ``empirical_fisher``, ``gptq``, ``kfac``, ``diag``.

Each module states its formula and reference, its cost, what it computes per batch (its plan) and how it turns the
sums into its result (its finish step), and registers its class with the family's ``register`` decorator. The
family's package imports every module in its folder (:meth:`Registry.discover`), so adding an estimator is adding
one file (and its test): see ``docs/adding_an_estimator.md``.
"""

from .registry import Registry

__all__ = ["Registry"]
