"""``oat-plugins info``: the methods available, or what a checkpoint holds."""

from __future__ import annotations

import argparse

import oat_plugins


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="list the methods, or describe a checkpoint",
        description="Without arguments, list the registered methods and their options. "
        "With --checkpoint, load it and print what the method conditioned.",
    )
    parser.add_argument("--checkpoint", help="a file written by oat_plugins.save / train")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.checkpoint:
        model = oat_plugins.load(args.checkpoint)
        print(model.summary())
        print(f"  λ: {model.lam}")
        return 0
    for name in oat_plugins.available_methods():
        method = oat_plugins.get_method(name)
        doc = " ".join((method.__doc__ or "").split("\n\n")[0].split())
        print(f"{name}: {doc}")
    return 0
