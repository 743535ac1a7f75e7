"""Every figure of the report from one command: ``python reproduce.py --figure 1a|1b|1c|1d|2|3a|3b|all [--model ...]``.

Builds each script's run spec from preset field values (:class:`Run`) and runs it: for ``--model embedded``
(default) configurations scaled to the bundled model (about 30-60 s per figure on a 2-core CPU, README
"Results"); for any other model the report's configurations for OPT-125M (seqlen 2048, every sample of the
WikiText-2 test split). Flags this script does not know (``--devices cuda:0,cuda:1``, ``--resume``,
``--dtype``, ...) are checked against every run's script first, then override the presets of every run.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..commands import COMMANDS, execute
from . import cli
from .spec import EMBEDDED, RunSpec

FIGURES = ("1a", "1b", "1c", "1d", "2", "3a", "3b")
EXTRA_FIGURES = ("sweep",)
"""Figures beyond the report (not in ``--figure all``): ``sweep``, the whole-model sweep of docs/sweep.md."""
SWEEP_QUANTITIES = ("trace", "top", "bottom", "frobenius")
K_SWEEP = {"embedded": (1, 10, 100), "paper": (1, 10, 100, 1000)}
"""Fig. 3b: Hutchinson diagonals at these k (HVPs per sample), and XDiag at the largest."""


@dataclass(frozen=True)
class Run:
    """One script run: ``script`` (a :data:`lib.commands.COMMANDS` name), its preset spec fields
    (``(name, value)`` pairs, in flag order) and the output name's suffix."""

    script: str
    preset: tuple[tuple[str, Any], ...]
    suffix: str = ""

    @property
    def argv(self) -> list[str]:
        """The preset as the script's flags."""
        return cli.argv_of(COMMANDS[self.script].parser(), dict(self.preset))


def _exact(figure: str, kind: str) -> list[Run]:
    """Figs. 1a-1d and 2 (the exact-Hessian scripts)."""
    e = kind == "embedded"
    table = {
        "1a": Run("single_layer_single_block", (("t", 128 if e else 768),)),
        "1b": Run("several_layers_several_blocks", (("num_blocks", 1), ("t", 16 if e else 300))),
        "1c": Run("single_layer_several_blocks", (("t", 32 if e else 150),)),
        "1d": Run("several_layers_several_blocks", (("t", 8), ("b", 6)) if e else (("t", 25),)),
        "2": Run(
            "single_layer_single_block",
            (("t", 16), ("b", 160), ("batch_study", True))
            if e
            else (("t", 768), ("batch_study", True)),
        ),
    }
    return [table[figure]]


def _diagonal(figure: str, kind: str) -> list[Run]:
    """Fig. 3a (convergence on row 0 of block-0 q_proj) and 3b (diagonal heatmaps along a k sweep)."""
    e = kind == "embedded"
    if figure == "3a":
        return [
            Run(
                "hessian_diagonal",
                (
                    ("track_rows", 1),
                    ("estimator", ("hutchinson", "xdiag", "empirical_fisher")),
                    ("hvps", 200 if e else 1000),
                    *((("b", 4),) if e else ()),
                ),
            )
        ]
    ks = K_SWEEP[kind]
    b = (("b", 8),) if e else ()
    runs = [
        Run(
            "hessian_diagonal",
            (("estimator", ("hutchinson",)), ("hvps", k), *b),
            f"_hutchinson_k{k}",
        )
        for k in ks
    ]
    return runs + [
        Run(
            "hessian_diagonal",
            (("estimator", ("xdiag",)), ("hvps", ks[-1]), *b),
            f"_xdiag_k{ks[-1]}",
        )
    ]


def runs(figure: str, model: str) -> list[Run]:
    """The preset runs of ``figure`` for ``model`` (embedded preset for the bundled model, the report's otherwise)."""
    kind = "embedded" if model == EMBEDDED else "paper"
    if figure == "sweep":
        return [Run("hessian_sweep", (("quantities", SWEEP_QUANTITIES),))]
    return _diagonal(figure, kind) if figure.startswith("3") else _exact(figure, kind)


QUICK = {"t": 2, "seqlen": 16, "b": 2, "label": "quick"}
"""``--quick``: tiny versions of every run (tests), labelled ``quick`` in their titles and JSON and written under
names ending in ``_quick`` (:func:`stem`), so that they never take or block the real figures' names."""


def shrink(run: Run) -> Run:
    """The tiny version of ``run``: t=2, seqlen 16, b=2 (b=5 for the batch study), at most 4 HVPs per sample."""
    preset = dict(run.preset)
    quick = dict(QUICK, **({"b": 5} if preset.get("batch_study") else {}))
    suffix = run.suffix
    if run.script == "hessian_sweep":
        quick.pop("t")
    if run.script == "hessian_diagonal":
        quick.pop("t")
        if "hvps" in preset:
            k = preset["hvps"]
            quick["hvps"] = k if k <= 2 else 4
            suffix = suffix.replace(f"_k{k}", f"_k{quick['hvps']}")
    return Run(run.script, tuple({**preset, **quick}.items()), suffix)


def stem(figure: str, model: str, quick: bool = False) -> str:
    """The output stem of ``figure``'s runs: ``fig<figure>_<model>``, ``..._quick`` for ``--quick``."""
    return f"fig{figure}_{Path(model.rstrip('/')).name}{'_quick' if quick else ''}".replace(
        "/", "-"
    )


def placement(run: Run, figure: str, args: argparse.Namespace) -> dict[str, str]:
    """Model, output directory and output name of ``run`` (fields beside its preset)."""
    return {
        "model": args.model,
        "output_dir": args.output_dir,
        "name": stem(figure, args.model, args.quick) + run.suffix,
    }


def spec_of(run: Run, figure: str, args: argparse.Namespace, extra: list[str]) -> RunSpec:
    """``run``'s spec: its preset and placement, overridden by the passed-on flags ``extra`` (checked by the
    script's own parser: an unknown or malformed flag exits with one line, status 2)."""
    return COMMANDS[run.script].spec(
        extra, presets={**dict(run.preset), **placement(run, figure, args)}
    )


def command_line(run: Run, figure: str, args: argparse.Namespace, extra: list[str]) -> str:
    """The equivalent shell command."""
    argv = (
        run.argv + cli.argv_of(COMMANDS[run.script].parser(), placement(run, figure, args)) + extra
    )
    return f"{script_command(run.script)} " + shlex.join(argv)


def script_command(script: str, package: str | None = __package__) -> str:
    """How a user runs ``script``: ``python <script>.py`` from a checkout, the console command (``pyproject.toml``'s
    ``[project.scripts]``, e.g. ``llm-hessian-diagonal``) when the package is installed as ``llm_hessian``."""
    if package == "llm_hessian":
        return "llm-hessian-" + script.removeprefix("hessian_").replace("_", "-")
    return f"python {script}.py"


def compose_3b(metas: list[dict[str, Any]], out: Path, name: str) -> list[Path]:
    """Fig. 3b: the diagonals of the k sweep side by side (one heatmap per run), each read after checking its files'
    recorded SHA-256 (:func:`lib.app.results.load_result`)."""
    from .plots import heatmap_grid
    from .results import load_result

    panels = []
    for m in metas:
        est = m["estimators"][0]
        panels.append((f"{est}, k = {m['hvps']}", load_result(out / m["files"]["json"])[1]))
    c = metas[0]["computed_on"]
    label = f" [{c['label']}]" if c.get("label") else ""
    title = (
        f"diag H of {metas[0]['parameter']} along k (HVPs per sample); {c['model']}, data {c['dataset']}, "
        f"{c['dtype']}, b={c['b']}, seqlen={c['seqlen']}{label}\nx: input index (column), y: output unit (row)"
    )
    return heatmap_grid(panels, out / name, title, ncols=len(panels))


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = cli.Parser(
        prog="reproduce.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--figure",
        required=True,
        choices=[*FIGURES, "all", *EXTRA_FIGURES],
        help="which figure of the report (all: every one of them); sweep: the whole-model sweep (docs/sweep.md)",
    )
    p.add_argument(
        "--model",
        default=EMBEDDED,
        help="embedded (default: scaled presets) or a HF model id / directory (the report's configurations)",
    )
    p.add_argument(
        "--output_dir",
        default="results",
        help="where every run writes <fig...>.pt/.json/.pdf/.png (default: results)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny configurations (t=2, seqlen 16, b=2): checks that every command runs end to end",
    )
    p.add_argument("--dry_run", action="store_true", help="print the script commands and exit")
    return p.parse_known_args(argv)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the figure(s); returns ``{figure: {"commands", "elapsed_s", "files"}}`` and records it in
    ``<output_dir>/reproduce_<model>.json``."""
    args, extra = parse(argv)
    figures = FIGURES if args.figure == "all" else (args.figure,)
    plans = {
        fig: list(dict.fromkeys(shrink(r) if args.quick else r for r in runs(fig, args.model)))
        for fig in figures
    }  # shrinking may merge runs
    specs = {
        (fig, r): spec_of(r, fig, args, extra) for fig, plan in plans.items() for r in plan
    }  # a bad passed-on flag fails now, not after the earlier figures
    done: dict[str, Any] = {}
    for fig, plan in plans.items():
        commands = [command_line(r, fig, args, extra) for r in plan]
        print(f"# Figure {fig}\n" + "\n".join(commands), flush=True)
        if args.dry_run:
            done[fig] = {"commands": commands}
            continue
        t0 = time.perf_counter()
        metas = [execute(specs[fig, r]) for r in plan]
        if not all(metas):  # torchrun ranks > 0 save nothing
            continue
        files = [
            f
            for m in metas
            for f in [
                *m["files"].values(),
                *m.get("table_files", []),
                *m["figures"],
                *m.get("batch_study_files", []),
                *m.get("side_files", []),
            ]
        ]
        if fig == "3b":
            files += [
                p.name
                for p in compose_3b(metas, Path(args.output_dir), stem(fig, args.model, args.quick))
            ]
        done[fig] = {"commands": commands, "elapsed_s": time.perf_counter() - t0, "files": files}
        print(f"# Figure {fig}: {done[fig]['elapsed_s']:.1f}s", flush=True)
    if not args.dry_run and done:
        model = Path(args.model.rstrip("/")).name.replace("/", "-")
        record(
            Path(args.output_dir) / f"reproduce_{model}{'_quick' if args.quick else ''}.json", done
        )
    return done


def record(path: Path, done: dict[str, Any]) -> None:
    """Merge this invocation's figures into the record at ``path`` (machine, date, timings, commands)."""
    import torch

    old = json.loads(path.read_text()) if path.exists() else {}
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    old.update({fig: {**v, "machine": machine, "finished": when} for fig, v in done.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old, indent=1) + "\n")


def main() -> None:
    """The console entry point (one-line errors, exit statuses: :func:`lib.app.cli.main`)."""
    cli.main(run, sys.argv[1:])
