"""The command line: the scripts' flags, their deprecated aliases, the run spec built from them, and ``main``.

Only this layer speaks of flags: it turns the parsed flags into a frozen :class:`lib.app.spec.RunSpec` (never
changing the ``argparse.Namespace``), and a library error naming a parameter (:class:`lib.errors.ParamError`)
into the same message naming the flag (:func:`flag_message`). Each flag takes its default from its spec field,
so the defaults live in :mod:`lib.app.spec` only. Neither torch, transformers nor matplotlib is imported here:
``--help`` and refusing a malformed flag take a fraction of a second.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import constants
from ..errors import Interrupted, ParamError, RunError, UserError
from .spec import (
    DEFAULT_LAYER,
    DTYPES,
    EMBEDDED,
    EMBEDDED_DEFAULTS,
    MATMUL_PRECISIONS,
    SWEEP_EMBEDDED_B,
    T_DEFAULTS,
    DiagonalSpec,
    ExactSpec,
    RunSpec,
    SpectrumSpec,
    SweepSpec,
    fd_step_arg,
    model_input_bs_arg,
    spec_class,
)

LOW_PRECISION_NOTE = {
    "bfloat16": (
        "Hessians computed in bfloat16 carry about 2% relative error (1.3-2.1% in Frobenius norm against "
        "float64 on the embedded model, benchmarks/low_precision.py); use --dtype float32 (about 6e-7) "
        "for exact values"
    ),
    "float16": (
        "Hessians computed in float16 carry about 0.3% relative error (0.23-0.29% in Frobenius norm against "
        "float64 on the embedded model, benchmarks/low_precision.py) and can overflow on large models; "
        "use --dtype float32 (about 6e-7) for exact values"
    ),
}
"""The one-line warning for a 16-bit ``--dtype``, with the measured error of the exact Hessian."""

PARAM_FLAGS = {
    "layer_name": "--layer_name",
    "block_index": "--block_index",
    "t": "--t",
    "num_blocks": "--num_blocks",
    "num_layers": "--num_layers",
    "n_blocks": "--num_blocks",  # the library's old names (third-party ParamErrors)
    "n_layers": "--num_layers",
    "globs": "--params",
    "seqlen": "--seqlen",
    "b": "--b",
    "dataset": "--dataset",
    "device": "--device",
    "device_map": "--device_map",
    "hvps": "--hvps",
    "vhp_samples": "--hvps",
    "track_rows": "--track_rows",
    "estimators": "--estimator",
    "model": "--model",
    "cache_dir": "--cache_dir",
    "threads": "--threads",
    "checkpoint_every": "--checkpoint_every",
    "resume": "--resume",
}
"""The flag that sets each library parameter named by a :class:`ParamError`."""

ESTIMATOR_ALIASES = constants.ESTIMATOR_RENAMED
"""Deprecated ``--estimator`` names, accepted (with a warning) when the library knows only the new name."""


def flag_message(e: ParamError, flags: dict[str, str] = PARAM_FLAGS) -> str:
    """``e``'s message with its parameter's name (its first whole-word occurrence) replaced by the flag, or with
    every parameter of its template (``{name}``) written as its flag."""
    if e.template is not None:
        return e.template.format_map(_Flags(flags))
    flag = flags.get(e.param)
    if flag is None:
        return e.message
    return re.sub(rf"(?<![\w-]){re.escape(e.param)}(?!\w)", flag, e.message, count=1)


class _Flags(dict):
    """A template's parameter without a flag stays its name."""

    def __missing__(self, key: str) -> str:
        return key


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` only where the help text does not already say the default and X is informative."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors (unknown or misspelt flag, bad value) are one line ``error: ...`` and
    exit status 2, like every other bad input, instead of the full usage block."""

    def error(self, message: str):  # type: ignore[override]
        from ..runtime.ranks import quiet_flag_error
        from .suggest import unknown_flags_hint

        if quiet_flag_error():  # torchrun: one command line for all local ranks
            self.exit(2)
        hint = unknown_flags_hint(message, self._option_string_actions, lambda: _others(self.prog))
        self.exit(2, f"error: {message}{hint} (see {self.prog} --help)\n")


def _others(prog: str | None) -> dict[str, list[str]]:
    """``{"script.py": its flags}`` of every script but ``prog`` (for did-you-mean across scripts)."""
    from ..commands import COMMANDS

    return {
        f"{s}.py": list(build_parser(s, "")._option_string_actions)
        for s in COMMANDS
        if f"{s}.py" != prog
    }


class DeprecatedAlias(argparse.Action):
    """An old flag name: stores into the new flag's ``dest`` and says once, on stderr, to use the new name."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        _warn(f"{option_string} is deprecated; use {self.new} (same meaning)")
        setattr(namespace, self.dest, values)


def _alias(group, old: str, new: str, dest: str, **kwargs) -> None:
    group.add_argument(
        old,
        dest=dest,
        action=DeprecatedAlias,
        new=new,
        help=argparse.SUPPRESS,
        default=argparse.SUPPRESS,
        **kwargs,
    )


def _new_parser(description: str) -> Parser:
    return Parser(
        description=description, formatter_class=HelpFormatter, allow_abbrev=False
    )  # --t must not mean --track_rows


def _add_fields(
    group: Any,
    spec: RunSpec,
    helps: dict[str, str],
    choices: dict[str, Sequence[str]] | None = None,
    types: dict[str, type] | None = None,
) -> None:
    """One flag per field of ``spec`` named in ``helps`` (in that order), with the field's default and type (a
    ``bool`` field is a switch; ``types``: the type of a field whose default is ``None``, else ``str``);
    ``choices``: the allowed values of some of them."""
    for name, text in helps.items():
        default = spec.get(name)
        if isinstance(default, bool):
            group.add_argument(f"--{name}", action="store_true", help=text)
            continue
        kind = (types or {}).get(name) or (str if default is None else type(default))
        group.add_argument(
            f"--{name}", type=kind, default=default, choices=(choices or {}).get(name), help=text
        )


MODEL_AND_DATA_HELP = {
    "model": "HF model id or local directory; 'embedded' = the bundled tiny trained OPT",
    "cache_dir": "where HF weights, datasets and tokenized text are cached",
    "dataset": "'embedded' (bundled held-out Shakespeare), 'wikitext2' (test split), or a path to a UTF-8 text "
    "file; auto = embedded for the embedded model, else wikitext2",
    "seqlen": f"tokens per sample (default {EMBEDDED_DEFAULTS['seqlen']} for the embedded model, else "
    "min(2048, model limit))",
    "b": f"number of samples (default {EMBEDDED_DEFAULTS['b']} for the embedded model, else all samples of the "
    "text)",
    "model_input_bs": "samples per forward/backward (a work unit); must divide --b; auto: batched when the job is "
    "long enough, up to 65536 activation elements per forward on CPU, 2097152 on a GPU (recorded in the JSON as "
    "model_input_bs_choice)",
    "seed": "random seed",
}
COMPUTATION_HELP = {
    "dtype": "model dtype; float64 (validation) computes every step in float64 for OPT, GPT-2, Llama, Qwen2, "
    "Mistral",
    "device": "cpu, cuda, cuda:1, ... (auto = cuda if available else cpu)",
    "attn_implementation": "eager (default) or sdpa (run with its math kernel); flash attention has no double "
    "backward",
    "no_fused_head": "differentiate the LM head + softmax with plain autograd instead of the fused kernel",
    "matmul_precision": "float32 matmul precision (torch.set_float32_matmul_precision, in every worker and rank): "
    "highest = exact float32; high / medium = TF32 / bf16 passes on GPUs that have them (faster, about 1e-2 to 1e-1 "
    "relative error of the products: audited, docs/numerics.md); no effect on float64 or on CPUs without them; part "
    "of the result's identity",
}
OUTPUT_HELP = {
    "output_dir": "where <name>.pt, <name>.json and the figures go",
    "name": "output file stem (default: derived from the configuration)",
    "overwrite": "replace a finished result of the same --name (refused otherwise)",
    "skip_existing": "if the same configuration's result is already finished under this name, check its files "
    "against their recorded SHA-256, print one line and exit 0 without computing (for sweeps and Makefiles)",
    "no_progress": "hide the progress bar",
    "label": "a word added to the figure titles and the JSON's computed_on, e.g. a sweep's tag",
    "abs": "heatmaps of |H| (viridis from 0, the report's view) instead of the signed H (diverging colours centred at 0)",
}
RUN_HELP = {
    "devices": "comma-separated devices, one worker process per entry, e.g. cuda:0,cuda:1,cuda:2,cuda:3 (cpu,cpu "
    "for tests); overrides --device; under torchrun, entry LOCAL_RANK is the rank's device",
    "device_map": "split one model over the GPUs of its worker with this Hugging Face device_map: a strategy (e.g. "
    'auto) or a JSON object {module: device or "disk"} (disk: offloaded by accelerate to <cache_dir>/offload/; the '
    "subset must not be there); exact HVPs, one GPU at a time; needs accelerate; one worker (or one torchrun rank per "
    "node)",
    "checkpoint_every": "write <output_dir>/<name>.ckpt every N units (batches of --model_input_bs samples), or "
    "every DURATION such as 120s, 10m; 0 = never",
    "resume": "continue from the checkpoint <output_dir>/<name>.ckpt (hessian_diagonal.py: also "
    "<name>.phase2.ckpt; hessian_spectrum.py: the pass log <name>.passes/), recomputing nothing finished (the "
    "configuration must be the same); starts afresh if there is none",
    "keep_checkpoint": "keep the checkpoint when the run completes (it is removed by default)",
    "unit_timeout": "with --devices: stop the run when one unit runs longer than this many seconds (a hung "
    "worker); default 0 = auto: 10x the median unit time and at least 5 minutes",
    "setup_timeout": "with --devices: stop the run when a worker takes longer than this many seconds to load its "
    "model and set up (a hung worker); default 0 = auto: 15 minutes, or 10x the fastest worker's set-up if longer",
    "threads": "intra-op CPU threads per process; default: OMP_NUM_THREADS if set, else the CPUs free now (affinity, "
    "cgroup quota, load) shared among --devices workers or torchrun's local ranks (recorded in the JSON as threads)",
}
"""Help of the flags every script has, by field (defaults and types come from the spec's fields)."""


PRODUCTS_HELP = {
    "hvp": "exact: double backward (default; needs eager or math-kernel SDPA attention); finite_difference: "
    "(g(x+ev) - g(x-ev)) / 2e from two first-order gradients, no graph kept: runs with fused SDPA kernels, in bf16 "
    "and sharded (implied by --fsdp); on the exact scripts it gives an approximate Hessian, labelled so",
    "fd_richardson": "with --hvp finite_difference: Richardson extrapolation over steps e and e/2 (error O(e^4) "
    "instead of O(e^2), 4 gradients per product instead of 2)",
    "fd_step": "with --hvp finite_difference: relative step, the fraction of the subset's norm by which the weights "
    "move (default eps^(1/3) of --dtype, eps^(1/5) with --fd_richardson); retried smaller where ReLU inputs change "
    "side; auto: the step of the ladder 1e-2 .. 1e-6 with the smallest audited error (recorded in the JSON)",
    "audit": "K: products taken both by the run's path and by exact float64 double backward on the same samples (the "
    "exact block's columns, Rademacher probes for the diagonal and the spectrum), their relative errors in the JSON "
    "(audit) and one printed line; default: 0 (off) for exact products in float32 at --matmul_precision highest or in "
    "float64, 4 for lower matmul precision, bfloat16 / float16 and --hvp finite_difference (0 with --device_map: "
    "the float64 copy of a split model may not fit); not with --fsdp; an audit that fails (out of memory) warns, "
    "the results are saved",
    "audit_b": "the audit uses the first N samples of the run (default: every sample for the exact scripts, which "
    "then read K of the block's own columns; min(--b, 4) for the diagonal and the spectrum)",
    "audit_tol": "warn (and still save) when the audit's largest relative error is above this",
}
"""How every Hessian-vector product is taken (:class:`lib.app.spec.ProductMethod`), on every script."""


def _model_and_data(
    p: argparse.ArgumentParser, spec: RunSpec, t_default: tuple[int, int] | None
) -> Any:
    """The model, data and computation flags (and ``--t``, ``--method``); returns the computation group.

    ``spec``: the fields' own defaults (``type(spec)()``), before the model-dependent ones are resolved."""
    g = p.add_argument_group("model and data")
    _add_fields(
        g,
        spec,
        MODEL_AND_DATA_HELP,
        types={"seqlen": int, "b": int, "model_input_bs": model_input_bs_arg},
    )
    c = p.add_argument_group("computation")
    if t_default is not None:
        t_help = f"entries per selected row (default {t_default[0]} for the embedded model, {t_default[1]} otherwise)"
        method_help = (
            "rev-rev: fast exact (default); autograd: the paper's torch.autograd.functional.hessian"
        )
        _add_fields(g, spec, {"t": t_help}, types={"t": int})
        _add_fields(c, spec, {"method": method_help}, {"method": constants.METHODS})
    _add_fields(c, spec, COMPUTATION_HELP, {"dtype": DTYPES, "matmul_precision": MATMUL_PRECISIONS})
    hvp = {"hvp": constants.HVP_METHODS}
    _add_fields(
        c,
        spec,
        PRODUCTS_HELP,
        hvp,
        {"fd_step": fd_step_arg, "audit": int, "audit_b": int},
    )
    return c


def _chunk(group: Any, spec: RunSpec, products: str) -> None:
    """``--chunk``: the one name of the product batch in every script."""
    group.add_argument(
        "--chunk",
        type=int,
        default=spec.get("chunk"),
        help=(
            f"{products} per batched backward; 0 = auto: the smallest of 1, 2, 4, ... within 5%% of the fastest, "
            "timed on the first batch's first products (recorded in the JSON); halved on CUDA OOM"
        ),
    )


def _output_and_run(p: argparse.ArgumentParser, spec: RunSpec) -> None:
    _add_fields(p.add_argument_group("output"), spec, OUTPUT_HELP)
    _add_fields(
        p.add_argument_group("parallel runs and checkpoints"),
        spec,
        RUN_HELP,
        types={"threads": int},
    )


COMPARE_HELP = {
    "fisher_samples": "labels drawn from the model per token position for fisher and kfac",
    "perturbations": "random rounding-noise perturbations d for the predicted vs measured loss change (0 = none)",
    "perturbation_bits": "the perturbations are uniform in [-s/2, s/2], s the min-max round-to-nearest step with "
    "this many bits of the entry's weight row",
    "compare_top_k": "k of the top-k eigenvector subspace overlap",
}
SPECTRUM_HELP = {
    "top_k": "eigenvalues wanted (per end with --which both)",
    "which": "largest or smallest by value, or both ends",
    "block_size": "Lanczos block size: vectors per pass over the samples",
    "tol": "converged when ||Hv - lambda v|| <= tol * max|Ritz value|",
    "max_iter": "most Lanczos passes",
    "eigenvectors": "save the eigenvectors (columns in the subset's entry order) in the .pt",
    "trace": "Hutchinson and Hutch++ trace estimates with standard errors",
    "trace_hvps": "HVPs per trace estimator",
    "density": "spectral density by stochastic Lanczos quadrature",
    "slq_probes": "SLQ probes (advanced together, one pass per step)",
    "lanczos_steps": "SLQ Lanczos steps per probe",
    "density_points": "grid points of the density",
    "keep_graphs": "keep each batch's gradient graph in memory between passes (b/model_input_bs graphs), so a "
    "pass costs only its HVPs; auto: when they fit in a quarter of the free host (CPU) or GPU memory, measured "
    "on the first graph (recorded in the JSON); worker processes (--devices) always rebuild them",
    "exact_below": "form H exactly and use eigvalsh when the subset has at most this many entries (0 = always "
    "iterative)",
    "reorth": "Lanczos reorthogonalization: full (every step against all stored vectors, O(n m^2) work and m vectors "
    "kept), selective (only against converged Ritz vectors; the basis still kept, may be on the host or disk), none "
    "(3 vectors, no basis: the scale choice; ghost copies of converged eigenvalues removed by the Cullum-Willoughby "
    "test; SLQ then runs without reorthogonalization too); selective and none need --block_size 1",
    "vector_dtype": "dtype of the stored and working vectors: float64, float32 (half the memory; orthogonality to "
    "~1e-7), or the model's --dtype (working: bf16 keeps Lanczos orthogonal to only ~1e-3)",
    "vector_storage": "where the Lanczos basis and stored probe vectors live: device (with the products: the GPU "
    "under --fsdp, else host memory), cpu (host memory), disk (memory-mapped files in <output_dir>/<name>.vectors/, "
    "read back block by block); auto: the device when they fit in half its free memory, else the host, else disk "
    "(counted by the memory pre-flight)",
    "fsdp": "under torchrun: shard the model over the ranks with FSDP2 (one unit per transformer block), keep every "
    "Lanczos / probe vector sharded the same way and take finite-difference HVPs on the shards (implies --hvp "
    "finite_difference; whole parameters via --params; always the iterative path); rank 0 writes the outputs",
}
"""The flags of the ``compare`` settings and of the spectrum, from their fields, with their help."""


def _compare(p: argparse.ArgumentParser, spec: ExactSpec) -> None:
    """``--compare`` and its settings (the exact scripts; :mod:`lib.hessian.curvature`)."""
    g = p.add_argument_group("curvature approximations (compared with the exact Hessian)")
    g.add_argument(
        "--compare",
        nargs="+",
        choices=approximation_choices(),
        default=None,
        help=(
            "also compute these approximations on the same subset and samples, compare them with the "
            "exact Hessian, write <name>_compare.pt/.pdf/.png and a 'comparison' section in the JSON"
        ),
    )
    _add_fields(g, spec, COMPARE_HELP)


def _batch_study(p: argparse.ArgumentParser) -> None:
    dense, n_log = (
        constants.BATCH_STUDY_DENSE_UPTO,
        constants.BATCH_STUDY_N_LOG,
    )
    p.add_argument(
        "--batch_study",
        action="store_true",
        help=(
            f"batch-size study (report Fig. 2): keep the running Hessian at every b <= {dense} and ~{n_log} "
            f"log-spaced b beyond, report ||H^b - H^B||/||H^B|| and consecutive differences; one pass, "
            f"memory n^2 x 8 bytes per recorded b"
        ),
    )


EXACT_SUBSET_HELP = {
    "single_layer_single_block": {
        "layer_name": "linear layer inside a block, e.g. self_attn.q_proj (OPT/Llama), attn.c_attn (GPT-2)",
        "block_index": "which block",
    },
    "single_layer_several_blocks": {
        "layer_name": "linear layer inside a block",
        "num_blocks": "use blocks 0..num_blocks-1 (default: all blocks)",
    },
    "several_layers_several_blocks": {
        "num_layers": "first K linear layers of each block, in module order (default: all)",
        "num_blocks": "use blocks 0..num_blocks-1 (default: all blocks)",
    },
}
"""Each exact script's subset flags (in its --help order) and their help."""


def exact_parser(script: str, description: str) -> Parser:
    """The flags of an exact-Hessian script (``single_layer_single_block`` etc.)."""
    raw, spec = ExactSpec(script=script), ExactSpec.build(script)
    p = _new_parser(description)
    c = _model_and_data(p, raw, T_DEFAULTS[script])
    _chunk(c, raw, "Hessian columns")
    _output_and_run(p, raw)
    _compare(p, raw)
    for name, text in EXACT_SUBSET_HELP[script].items():
        p.add_argument(
            f"--{name}",
            type=str if name == "layer_name" else int,
            default=spec.get(name),
            help=text,
        )
    _batch_study(p)
    return p


def _declared(family: str) -> dict[str, dict[str, Any]]:
    """The estimators of ``lib/estimators/<family>/`` as declared in their source (no import: no torch)."""
    from ..estimators.registry import INFRASTRUCTURE, declared

    return declared(Path(__file__).parent.parent / "estimators" / family, INFRASTRUCTURE[family])


def estimator_summaries() -> dict[str, str]:
    """``{name: summary}`` of the diagonal estimators, in registry order."""
    return {name: attrs.get("summary", "") for name, attrs in _declared("diagonal").items()}


def approximation_choices() -> list[str]:
    """The ``--compare`` approximations, in registry order."""
    return list(_declared("approximations"))


def estimator_choices() -> list[str]:
    """The diagonal estimators (:func:`estimator_summaries`) and the deprecated names that stand for one of them."""
    known = list(estimator_summaries())
    return known + [
        old for old, new in ESTIMATOR_ALIASES.items() if old not in known and new in known
    ]


def resolve_estimators(names: Sequence[str] | None, known: Sequence[str]) -> list[str] | None:
    """``--estimator`` names with deprecated aliases replaced (one warning each) by the names in ``known``."""
    if names is None:
        return None
    out = []
    for name in names:
        new = ESTIMATOR_ALIASES.get(name)
        if name not in known and new in known:
            _warn(
                f"--estimator {name} is deprecated: it is the empirical Fisher, now called {new} ('fisher' is the "
                f"sampled Fisher of --compare)"
            )
            name = new
        out.append(name)
    return out


def diagonal_parser(description: str) -> Parser:
    """The flags of ``hessian_diagonal.py`` (no ``--t``, ``--method`` or ``--compare``: whole weights)."""
    spec = DiagonalSpec()
    p = _new_parser(description)
    _model_and_data(p, spec, None)
    _output_and_run(p, spec)
    d = p.add_argument_group("Hessian diagonal")
    d.add_argument(
        "--layer_name",
        default=None,
        help=(
            f"linear layer inside a block, e.g. self_attn.q_proj (OPT/Llama), attn.c_attn (GPT-2) (default "
            f"{DEFAULT_LAYER}; not with --all_layers)"
        ),
    )
    d.add_argument(
        "--block_index",
        type=int,
        default=None,
        help="which block (default 0; with --all_layers: every block unless given)",
    )
    d.add_argument(
        "--all_layers",
        action="store_true",
        help="every linear layer of every block (or of --block_index), in one run that loads the model and data once",
    )
    d.add_argument(
        "--estimator",
        nargs="+",
        default=None,
        metavar="ESTIMATOR",
        help=(
            "one or more of: "
            + "; ".join(f"{n} ({summary})" for n, summary in estimator_summaries().items())
            + "; default xdiag, or hutchinson xdiag with --track_rows"
        ),
    )
    d.add_argument(
        "--hvps",
        type=int,
        default=spec.compute.hvps,
        help=(
            "K: Hessian-vector products per sample and weight for hutchinson (K probes) and xdiag (K/2 "
            "probes + K/2 basis vectors; K even)"
        ),
    )
    _alias(d, "--vhp_samples", "--hvps", "hvps", type=int)
    d.add_argument(
        "--track_rows",
        type=int,
        default=spec.compute.track_rows,
        help=(
            "convergence study (paper Fig. 3): exact diagonal of the weights of the first R output units, "
            "and the estimators' error and consecutive difference after each probe"
        ),
    )
    _chunk(d, spec, "HVPs")
    _alias(d, "--probe_batch", "--chunk", "chunk", type=int)
    return p


def spectrum_parser(description: str) -> Parser:
    """The flags of ``hessian_spectrum.py``."""
    raw, spec = SpectrumSpec(script="hessian_spectrum"), SpectrumSpec.build("hessian_spectrum")
    p = _new_parser(description)
    comp = _model_and_data(p, raw, T_DEFAULTS["hessian_spectrum"])
    _chunk(comp, raw, "Hessian columns (products)")
    _output_and_run(p, raw)
    s = p.add_argument_group("subset (the exact scripts' flags, or --params)")
    s.add_argument(
        "--params",
        nargs="+",
        default=None,
        metavar="GLOB",
        help=(
            "whole parameters whose names match these shell-style globs, e.g. "
            "'model.decoder.layers.0.self_attn.q_proj.weight'; "
            "'*' = every parameter (overrides the flags below)"
        ),
    )
    s.add_argument(
        "--layer_name",
        default=spec.subset.layer_name,
        help="linear layer inside a block (first --t weights of row 0)",
    )
    s.add_argument(
        "--block_index",
        type=int,
        default=spec.subset.block_index,
        help="which block (single layer, single block)",
    )
    s.add_argument(
        "--num_blocks",
        type=int,
        default=None,
        help="blocks 0..N-1 (as single_layer_several_blocks.py; with --num_layers as several_layers_several_blocks.py)",
    )
    s.add_argument(
        "--num_layers",
        type=int,
        default=None,
        help="the first K linear layers of each block (as several_layers_several_blocks.py)",
    )
    e = p.add_argument_group("spectrum")
    _add_fields(
        e,
        raw,
        SPECTRUM_HELP,
        {
            "which": constants.WHICH,
            "keep_graphs": ("auto", "on", "off"),
            "reorth": constants.REORTH,
            "vector_dtype": constants.VECTOR_DTYPES,
            "vector_storage": ("auto", *constants.STORAGES),
        },
    )
    return p


SWEEP_HELP = {
    "quantities": "per unit: trace (Hutchinson, standard error), top / bottom (Lanczos eigenvalue, Ritz residual), "
    "density (SLQ: negative mass, moments 1 and 2), frobenius (||H||_F from E||Hz||^2), diagonal (Hutchinson "
    "diagonal's min, max, mean |.|, negative fraction)",
    "trace_rel": "probes are added until each trace's standard error is at most this fraction of it (or --max_probes)",
    "min_probes": "probes per unit (and shared probes) before the trace estimator is chosen",
    "max_probes": "most probes per unit (and shared probes)",
    "tol": "Lanczos: converged when the Ritz residual <= tol * |top eigenvalue|",
    "max_iter": "most Lanczos steps per unit",
    "slq_probes": "SLQ probes per unit (--quantities density)",
    "lanczos_steps": "SLQ Lanczos steps per probe",
    "trace_estimator": "per_unit: Hutchinson on each unit's block; shared: one whole-union product per probe gives "
    "every unit's trace (its variance carries the off-diagonal blocks); auto: both measured on --min_probes probes, "
    "the one needing fewer products chosen (both variances in the JSON)",
    "strategy": "per_unit (default): one operator per unit, model and samples shared, each unit's graphs kept while "
    "it runs (its products cost 2-9x less than the union's on the bundled model); union: one operator on the union "
    "of the units, its graphs kept for the whole sweep, each unit's products on block-restricted vectors",
    "chunk": "vectors per batched backward (fixed, so that a resumed sweep is bitwise the same; 1 is fastest on CPU)",
    "keep_graphs": "keep each batch's gradient graph between passes; auto: when they fit in a quarter of the free "
    "memory",
    "fsdp": "under torchrun, --over block only: shard the model over the ranks with FSDP2 and take each block's "
    "finite-difference HVPs on the shards (implies --hvp finite_difference); the unit's vectors are held whole on "
    "every rank; rank 0 writes the outputs",
}


def sweep_parser(description: str) -> Parser:
    """The flags of ``hessian_sweep.py``."""
    raw = SweepSpec(script="hessian_sweep")
    p = _new_parser(description)
    comp = _model_and_data(p, raw, None)
    for a in p._actions:
        if a.dest == "b":
            a.help = f"number of samples (default {SWEEP_EMBEDDED_B} for the embedded model, else all samples of the text)"
        if a.dest == "model":  # several checkpoints
            a.nargs, a.metavar = "+", "MODEL"
            a.help = (
                "HF model id or local directory ('embedded' = the bundled tiny trained OPT); several: one sweep per "
                "checkpoint, on the same samples and probes"
            )
    _add_fields(
        comp,
        raw,
        {k: SWEEP_HELP[k] for k in ("chunk", "keep_graphs", "fsdp")},
        {"keep_graphs": ("auto", "on", "off")},
    )
    _output_and_run(p, raw)
    u = p.add_argument_group("units and checkpoints")
    u.add_argument(
        "--over",
        default=raw.subset.over,
        help="layer: each linear weight of each block; block: all linear weights of a block; head: one attention "
        "head's rows of q/k/v and columns of the output projection",
    )
    u.add_argument(
        "--params",
        nargs="+",
        default=raw.subset.params,
        metavar="GLOB",
        help="only the linear weights whose names match these shell-style globs, e.g. '*.self_attn.*'",
    )
    u.add_argument(
        "--revisions",
        nargs="+",
        default=None,
        metavar="REV",
        help="Hugging Face revisions of --model (e.g. Pythia's step1000): one sweep per revision, same samples "
        "and probes",
    )
    q = p.add_argument_group("quantities")
    q.add_argument(
        "--quantities",
        nargs="+",
        default=raw.compute.quantities,
        help=SWEEP_HELP["quantities"],
    )
    _add_fields(
        q,
        raw,
        {
            k: v
            for k, v in SWEEP_HELP.items()
            if k not in ("quantities", "chunk", "keep_graphs", "fsdp")
        },
    )
    return p


def build_parser(script: str, description: str) -> Parser:
    """The parser of ``script`` (a top-level script's name without ``.py``)."""
    cls = spec_class(script)
    if cls is DiagonalSpec:
        p = diagonal_parser(description)
    elif cls is SpectrumSpec:
        p = spectrum_parser(description)
    elif cls is SweepSpec:
        p = sweep_parser(description)
    else:
        p = exact_parser(script, description)
    p.prog = f"{script}.py"
    return p


# ----------------------------------------------------------------------------- spec


def spec_from_args(script: str, args: argparse.Namespace) -> RunSpec:
    """The frozen, validated run spec of ``script`` from its parsed flags (``args`` is only read).

    A parsed value that is not a field of the spec is an error of this module (every flag has its field)."""
    cls = spec_class(script)
    values = dict(vars(args))
    if cls is DiagonalSpec:
        values["estimator"] = resolve_estimators(
            values.get("estimator"), list(estimator_summaries())
        )
    spec = cls.build(script, **values)
    spec.validate()
    return spec


def parse(
    script: str, argv: Sequence[str] | None, description: str, presets: dict[str, Any] | None = None
) -> RunSpec:
    """Parse ``argv`` (``None``: ``sys.argv[1:]``) into the validated spec of ``script``; ``presets``: defaults
    that the flags in ``argv`` override (``reproduce.py``'s figure configurations)."""
    p = build_parser(script, description)
    if presets:
        p.set_defaults(**presets)
    return spec_from_args(script, p.parse_args(argv))


def argv_of(parser: argparse.ArgumentParser, values: dict[str, Any]) -> list[str]:
    """The flags that set ``values`` (``{dest: value}``) with ``parser``: ``--flag v``, ``--flag a b`` or a bare
    ``--flag`` for store-true flags (``False`` values are left out)."""
    by_dest = {
        a.dest: a
        for a in parser._actions
        if a.option_strings and not isinstance(a, DeprecatedAlias)
    }
    out: list[str] = []
    for dest, value in values.items():
        action = by_dest[dest]
        flag = action.option_strings[0]
        if action.nargs == 0:  # a switch (store_true)
            out += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


# ----------------------------------------------------------------------------- main


def main(fn: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> Any:
    """Run a script's ``fn(argv)``, turning :class:`UserError` into one line on stderr and exit status 2
    (:class:`RunError`, a run stopped while computing: exit status 1; SIGINT / SIGTERM: 130 / 143, one line,
    no traceback)."""
    import signal

    # SIGTERM before or after the computation (lib.runtime.parallel handles it during)
    def terminate(signum, frame):  # noqa: ARG001
        raise Interrupted(signum)

    old = (
        signal.signal(signal.SIGTERM, terminate)
        if threading.current_thread() is threading.main_thread()
        else None
    )
    try:
        return fn(argv)
    except (Interrupted, KeyboardInterrupt) as e:
        e = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
        print(f"error: {e.message}", file=sys.stderr)
        raise SystemExit(e.code) from None
    except UserError as e:
        from ..runtime.ranks import quiet_on_this_rank

        if not quiet_on_this_rank(e):  # an error all torchrun ranks share: rank 0's line only
            print(f"error: {flag_message(e) if isinstance(e, ParamError) else e}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunError as e:
        from ..runtime.ranks import quiet_on_this_rank

        if not quiet_on_this_rank(e):
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as e:  # a file that could not be read or written, not caught closer to its cause
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except (
        RuntimeError
    ) as e:  # under torchrun: a collective that lost a rank is one line, not a traceback
        from ..runtime.ranks import lost_rank_message

        line = lost_rank_message(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


__all__ = [
    "EMBEDDED",
    "LOW_PRECISION_NOTE",
    "Parser",
    "argv_of",
    "build_parser",
    "flag_message",
    "main",
    "parse",
    "spec_from_args",
]
