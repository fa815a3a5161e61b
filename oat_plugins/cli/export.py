"""``oat-plugins export``: write the plain model a checkpoint computes at one λ."""

from __future__ import annotations

import argparse
import logging

from .. import load
from ..exported import save_exported
from ._common import unit_float

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="fold a conditional model at one λ into a plain timm model file",
        description="Load a conditional model (a file from oat_plugins.save or a training "
        "checkpoint), fold it at --lambda into a plain timm model with the backbone's "
        "parameter count, and write its weights, timm spec and normalisation to --out. "
        "Rebuild it with oat_plugins.load_exported(path) (torch.load(weights_only=True)).",
        epilog="example: oat-plugins export --checkpoint runs/demo/model.pt --lambda 0.5 "
        "--out runs/demo/model_lam0.5.pt",
    )
    parser.add_argument("--checkpoint", required=True, help="conditional model or training "
                        "checkpoint file")
    parser.add_argument("--lambda", dest="lam", required=True, type=unit_float,
                        help="the λ in [0, 1] to fix (0: clean accuracy, 1: robustness)")
    parser.add_argument("--out", required=True, help="output file (.pt)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model = load(args.checkpoint)
    save_exported(model, args.lam, args.out)
    n_params = sum(p.numel() for p in model.export(args.lam).parameters())
    print(f"exported {model.backbone_name or 'model'} ({model.method_name}) at λ={args.lam:g} "
          f"to {args.out} ({n_params:,} parameters); load with "
          "oat_plugins.load_exported(path)")
    return 0
