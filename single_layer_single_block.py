"""Exact Hessian of perplexity for the first t weights of row 0 of one linear layer in one block (paper Sec. 4.1, Fig. 1a)."""

from __future__ import annotations

import argparse

from lib import batch_study, cli, subsets

T_DEFAULT = (128, 768)  # (embedded model, paper's OPT-125M: the whole first row of q_proj)


def parser() -> argparse.ArgumentParser:
    """This script's flags (also used by ``reproduce.py`` to check flags before any run)."""
    p = cli.base_parser(__doc__, T_DEFAULT)
    p.add_argument("--layer_name", default="self_attn.q_proj", help="linear layer inside a block, e.g. self_attn.q_proj (OPT/Llama), attn.c_attn (GPT-2)")
    p.add_argument("--block_index", type=int, default=0, help="which block")
    batch_study.add_flags(p)
    return p


def run(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    cli.resolve_defaults(args, T_DEFAULT)
    build = lambda m: subsets.single_layer_single_block(m, args.layer_name, args.block_index, args.t)  # noqa: E731
    return cli.run_exact("single_layer_single_block", args, build, lambda: f"{args.layer_name}_block{args.block_index}")


if __name__ == "__main__":
    cli.main(run)
