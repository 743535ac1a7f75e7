"""Exact Hessian of perplexity for the first t weights of row 0 of one linear layer in each of blocks 0..N-1 (paper Sec. 4.3, Fig. 1c)."""

from __future__ import annotations

import argparse

from lib import batch_study, cli, subsets

T_DEFAULT = (32, 150)  # (embedded model, paper's OPT-125M: 150 per block x 12 blocks)


def parser() -> argparse.ArgumentParser:
    """This script's flags (also used by ``reproduce.py`` to check flags before any run)."""
    p = cli.base_parser(__doc__, T_DEFAULT)
    p.add_argument("--layer_name", default="self_attn.q_proj", help="linear layer inside a block")
    p.add_argument("--num_blocks", type=int, default=None, help="use blocks 0..num_blocks-1 (default: all blocks)")
    batch_study.add_flags(p)
    return p


def run(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    cli.resolve_defaults(args, T_DEFAULT)

    def build(model):
        n = args.num_blocks = subsets.num_blocks(model) if args.num_blocks is None else args.num_blocks
        return subsets.single_layer_several_blocks(model, args.layer_name, n, args.t)

    return cli.run_exact("single_layer_several_blocks", args, build, lambda: f"{args.layer_name}_blocks{args.num_blocks}")


if __name__ == "__main__":
    cli.main(run)
