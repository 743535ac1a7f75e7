"""Exact Hessian of perplexity for the first t weights of row 0 of the first K linear layers of each of blocks 0..N-1 (paper Sec. 4.2/4.4, Figs. 1b, 1d)."""

from __future__ import annotations

import argparse

from lib import batch_study, cli, subsets

T_DEFAULT = (8, 25)  # (embedded model, paper's OPT-125M: 25 per layer x 6 layers x 12 blocks)


def parser() -> argparse.ArgumentParser:
    """This script's flags (also used by ``reproduce.py`` to check flags before any run)."""
    p = cli.base_parser(__doc__, T_DEFAULT)
    p.add_argument("--num_layers", type=int, default=None, help="first K linear layers of each block, in module order (default: all)")
    p.add_argument("--num_blocks", type=int, default=None, help="use blocks 0..num_blocks-1 (default: all blocks)")
    batch_study.add_flags(p)
    return p


def run(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    cli.resolve_defaults(args, T_DEFAULT)

    def build(model):
        args.num_blocks = subsets.num_blocks(model) if args.num_blocks is None else args.num_blocks
        args.num_layers = len(subsets.layer_names(model, 0)) if args.num_layers is None else args.num_layers
        return subsets.several_layers_several_blocks(model, args.num_layers, args.num_blocks, args.t)

    return cli.run_exact("several_layers_several_blocks", args, build, lambda: f"layers{args.num_layers}_blocks{args.num_blocks}")


if __name__ == "__main__":
    cli.main(run)
