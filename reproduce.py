"""Every figure of the report from one command: ``python reproduce.py --figure 1a|1b|1c|1d|2|3a|3b|all [--model ...]``.

Runs the scripts' ``run(argv)`` with preset flags: for ``--model embedded`` (default) configurations
scaled to the bundled model (about 30-60 s per figure on a 2-core CPU, README "Results"); for any
other model the report's configurations for OPT-125M (seqlen 2048, every sample of the WikiText-2 test
split). Flags this script does not know (``--devices cuda:0,cuda:1``, ``--resume``, ``--dtype``, ...) are
checked against every run's script first, then passed on to every run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lib import cli
from lib.models import EMBEDDED

FIGURES = ("1a", "1b", "1c", "1d", "2", "3a", "3b")
K_SWEEP = {"embedded": (1, 10, 100), "paper": (1, 10, 100, 1000)}
"""Fig. 3b: Hutchinson diagonals at these k (HVPs per sample), and XDiag at the largest."""


@dataclass(frozen=True)
class Run:
    """One script run: ``script`` (top-level module), its flags, and the output name's suffix."""

    script: str
    argv: tuple[str, ...]
    suffix: str = ""


def _exact(figure: str, kind: str) -> list[Run]:
    """Figs. 1a-1d and 2 (the exact-Hessian scripts)."""
    e = kind == "embedded"
    table = {
        "1a": Run("single_layer_single_block", ("--t", "128" if e else "768")),
        "1b": Run("several_layers_several_blocks", ("--num_blocks", "1", "--t", "16" if e else "300")),
        "1c": Run("single_layer_several_blocks", ("--t", "32" if e else "150")),
        "1d": Run("several_layers_several_blocks", ("--t", "8", "--b", "6") if e else ("--t", "25")),
        "2": Run("single_layer_single_block", ("--t", "16", "--b", "160", "--batch_study") if e else ("--t", "768", "--batch_study")),
    }
    return [table[figure]]


def _diagonal(figure: str, kind: str) -> list[Run]:
    """Fig. 3a (convergence on row 0 of block-0 q_proj) and 3b (diagonal heatmaps along a k sweep)."""
    e = kind == "embedded"
    if figure == "3a":
        return [Run("hessian_diagonal", ("--track_rows", "1", "--estimator", "hutchinson", "xdiag", "fisher", "--vhp_samples", "200" if e else "1000", *(("--b", "4") if e else ())))]
    ks = K_SWEEP[kind]
    b = ("--b", "8") if e else ()
    runs = [Run("hessian_diagonal", ("--estimator", "hutchinson", "--vhp_samples", str(k), *b), f"_hutchinson_k{k}") for k in ks]
    return runs + [Run("hessian_diagonal", ("--estimator", "xdiag", "--vhp_samples", str(ks[-1]), *b), f"_xdiag_k{ks[-1]}")]


def runs(figure: str, model: str) -> list[Run]:
    """The preset runs of ``figure`` for ``model`` (embedded preset for the bundled model, the report's otherwise)."""
    kind = "embedded" if model == EMBEDDED else "paper"
    return _diagonal(figure, kind) if figure.startswith("3") else _exact(figure, kind)


QUICK = {"--t": "2", "--seqlen": "16", "--b": "2"}
"""``--quick``: tiny versions of every run (tests)."""


def shrink(run: Run) -> Run:
    """The tiny version of ``run``: t=2, seqlen 16, b=2 (b=5 for the batch study), at most 4 HVPs per sample."""
    argv = list(run.argv)
    quick = dict(QUICK, **({"--b": "5"} if "--batch_study" in argv else {}))
    if run.script == "hessian_diagonal":
        quick.pop("--t")
        if "--vhp_samples" in argv:
            k = int(argv[argv.index("--vhp_samples") + 1])
            quick["--vhp_samples"] = str(k if k <= 2 else 4)
    suffix = run.suffix
    if "--vhp_samples" in quick and suffix:
        suffix = suffix.replace(f"_k{argv[argv.index('--vhp_samples') + 1]}", f"_k{quick['--vhp_samples']}")
    for flag, value in quick.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return Run(run.script, tuple(argv), suffix)


def stem(figure: str, model: str) -> str:
    return f"fig{figure}_{Path(model.rstrip('/')).name}".replace("/", "-")


def argv_of(run: Run, figure: str, model: str, output_dir: str, extra: list[str]) -> list[str]:
    return [*run.argv, "--model", model, "--output_dir", output_dir, "--name", stem(figure, model) + run.suffix, *extra]


def check_flags(run: Run, argv: list[str]) -> None:
    """Parse ``argv`` with ``run.script``'s own parser: an unknown or malformed flag exits with one line (status 2)."""
    p = importlib.import_module(run.script).parser()
    p.prog = f"{run.script}.py"
    p.parse_args(argv)


def compose_3b(metas: list[dict[str, Any]], out: Path, name: str) -> list[Path]:
    """Fig. 3b: the diagonals of the k sweep side by side (one heatmap per run), each read after checking its files'
    recorded SHA-256 (:func:`lib.results.load_result`)."""
    from lib.plots import heatmap_grid
    from lib.results import load_result

    panels = []
    for m in metas:
        est = m["estimators"][0]
        panels.append((f"{est}, k = {m['vhp_samples']}", load_result(out / m["files"]["json"])[1]))
    c = metas[0]["config"]
    title = f"|diag H| of {metas[0]['parameter']} along k (HVPs per sample); {c['model']}, b={c['b']}, seqlen={c['seqlen']}\nx: input index (column), y: output unit (row)"
    return heatmap_grid(panels, out / name, title, ncols=len(panels))


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--figure", required=True, choices=[*FIGURES, "all"], help="which figure of the report")
    p.add_argument("--model", default=EMBEDDED, help="embedded (default: scaled presets) or a HF model id / directory (the report's configurations)")
    p.add_argument("--output_dir", default="results", help="where every run writes <fig...>.pt/.json/.pdf/.png (default: results)")
    p.add_argument("--quick", action="store_true", help="tiny configurations (t=2, seqlen 16, b=2): checks that every command runs end to end")
    p.add_argument("--dry_run", action="store_true", help="print the script commands and exit")
    return p.parse_known_args(argv)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the figure(s); returns ``{figure: {"commands", "elapsed_s", "files"}}`` and records it in ``<output_dir>/reproduce_<model>.json``."""
    args, extra = parse(argv)
    figures = FIGURES if args.figure == "all" else (args.figure,)
    plans = {fig: list(dict.fromkeys(shrink(r) if args.quick else r for r in runs(fig, args.model))) for fig in figures}  # shrinking may merge runs
    for fig, plan in plans.items():  # a flag passed on that some run does not take fails now, not after the earlier figures
        for r in plan:
            check_flags(r, argv_of(r, fig, args.model, args.output_dir, extra))
    done: dict[str, Any] = {}
    for fig, plan in plans.items():
        commands = [f"python {r.script}.py " + shlex.join(argv_of(r, fig, args.model, args.output_dir, extra)) for r in plan]
        print(f"# Figure {fig}\n" + "\n".join(commands), flush=True)
        if args.dry_run:
            done[fig] = {"commands": commands}
            continue
        t0 = time.perf_counter()
        metas = [importlib.import_module(r.script).run(argv_of(r, fig, args.model, args.output_dir, extra)) for r in plan]
        if not all(metas):  # torchrun ranks > 0 save nothing
            continue
        files = [f for m in metas for f in [*m["files"].values(), *m["figures"], *m.get("batch_study_files", [])]]
        if fig == "3b":
            files += [p.name for p in compose_3b(metas, Path(args.output_dir), stem(fig, args.model))]
        done[fig] = {"commands": commands, "elapsed_s": time.perf_counter() - t0, "files": files}
        print(f"# Figure {fig}: {done[fig]['elapsed_s']:.1f}s", flush=True)
    if not args.dry_run and done:
        record(Path(args.output_dir) / f"reproduce_{Path(args.model.rstrip('/')).name}.json", done)
    return done


def record(path: Path, done: dict[str, Any]) -> None:
    """Merge this invocation's figures into the record at ``path`` (machine, date, timings, commands)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    old.update({fig: {**v, "machine": machine, "finished": when} for fig, v in done.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    cli.main(run, sys.argv[1:])
