"""The library's named choices, in one torch-free module: the command-line parsers (:mod:`lib.app.cli`) and ``--help``
read them from here without importing torch, and the library modules that use them import them from here (one
definition per concept)."""

from __future__ import annotations

HVP_METHODS = ("exact", "finite_difference")
"""How each Hessian-vector product is taken (``--hvp``): double backward, or finite differences of gradients."""
METHODS = ("rev-rev", "autograd")
"""How the exact scripts form the Hessian block (``--method``)."""
WHICH = ("largest", "smallest", "both")
"""Which end of the spectrum (``--which``)."""
REORTH = ("full", "selective", "none")
"""Lanczos reorthogonalization (``--reorth``), :data:`lib.spectrum.algorithms.REORTH`."""
STORAGES = ("device", "cpu", "disk")
"""Where remembered vectors are kept (``--vector_storage``, besides ``auto``)."""
VECTOR_DTYPES = ("float64", "float32", "working")
"""The dtype of the spectrum's vectors (``--vector_dtype``)."""
ESTIMATOR_RENAMED = {"fisher": "empirical_fisher"}
"""Old diagonal-estimator names and their new ones (accepted with a note)."""
