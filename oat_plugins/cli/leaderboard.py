"""``oat-plugins leaderboard``: the bundled RobustBench leaderboard with our entries ranked in."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "leaderboard",
        help="rank our RobustBench entries against the bundled leaderboard snapshot",
        description="Print the RobustBench leaderboard snapshot shipped with oat-plugins "
        "(CIFAR-10 Linf/L2, CIFAR-100 Linf), ranked by AutoAttack accuracy, with the entries "
        "under --results (written by `oat-plugins benchmark`) marked as ours, one row per λ, "
        "and labelled with the data they were measured on.",
    )
    parser.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"])
    parser.add_argument("--threat-model", default="Linf", choices=["Linf", "L2"])
    parser.add_argument("--results", metavar="DIR",
                        help="folder with our entries (<DIR>/<dataset>/<threat-model>/*.json)")
    parser.add_argument("--format", default="markdown", choices=["markdown", "csv", "html"],
                        help="output format (default: markdown)")
    parser.add_argument("--top", type=int, default=None, metavar="K",
                        help="show only the first K rows, plus all of ours")
    parser.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of stdout")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from oat_plugins.robustbench.leaderboard import load_leaderboard, render_leaderboard

    rows = load_leaderboard(args.dataset, args.threat_model, results=args.results)
    if args.top is not None:
        if args.top < 0:
            raise ValueError("--top must be >= 0")
        rows = [r for r in rows if r.rank <= args.top or r.ours]
    text = render_leaderboard(rows, args.format)
    if args.output:
        from oat_plugins._io import atomic_write_text

        atomic_write_text(text, args.output)
    else:
        sys.stdout.write(text)
    return 0
