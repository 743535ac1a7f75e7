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
WIKITEXT2 = "wikitext2"
"""The ``--dataset`` name of WikiText-2's test split (:mod:`lib.model.data`)."""
DEFAULT_CHECKPOINT_EVERY = "120s"
"""Default ``--checkpoint_every``: at most about two minutes of work is lost on a kill (:mod:`lib.runtime.checkpoint`)."""
MAX_DENSITY_POINTS = 100_000
"""Most grid points of a spectral density (``--density_points``): the grid and the values go into the JSON and the
.pt (a figure is a few thousand pixels wide); refused above it before any work (:mod:`lib.spectrum.algorithms`)."""
BATCH_STUDY_DENSE_UPTO = 64
"""The batch study records every ``b`` up to this (:mod:`lib.hessian.batch_study`)."""
BATCH_STUDY_N_LOG = 32
"""... and about this many log-spaced ``b`` beyond it."""
