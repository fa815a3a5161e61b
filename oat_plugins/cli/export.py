"""``oat-plugins export``: write the plain model a checkpoint computes at one λ."""

from __future__ import annotations

import argparse
import logging

from .. import load
from ..exported import FORMATS, save_exported
from ._common import add_density_argument, apply_density, positive_int, unit_float

logger = logging.getLogger(__name__)

_LOAD_HINT = {
    "oat": "oat_plugins.load_exported(path)",
    "safetensors": "plain timm: timm.create_model(<architecture>, pretrained=True, "
    "pretrained_cfg_overlay=dict(<config pretrained_cfg>, file='<out>/model.safetensors'), "
    "...) (see docs/export.md)",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="fold a conditional model at one λ into a plain timm model",
        description="Load a conditional model (a file from oat_plugins.save or a training "
        "checkpoint), fold it at --lambda into a plain timm model with the backbone's "
        "parameter count, and write it to --out. --format oat (default): one weights-only "
        "file with the timm spec and normalisation, rebuilt by oat_plugins.load_exported(path). "
        "--format safetensors: a folder (model.safetensors + config.json, the Hugging Face Hub "
        "layout of timm's push_to_hub) that plain timm loads without oat-plugins; config.json "
        "holds the input mean/std, the λ and the method.",
        epilog="examples: oat-plugins export --checkpoint runs/demo/model.pt --lambda 0.5 "
        "--out runs/demo/model_lam0.5.pt; oat-plugins export --checkpoint runs/demo/model.pt "
        "--lambda 0.5 --format safetensors --image-size 32 --out runs/demo/timm_lam0.5",
    )
    parser.add_argument("--checkpoint", required=True, help="conditional model or training "
                        "checkpoint file")
    parser.add_argument("--lambda", dest="lam", required=True, type=unit_float,
                        help="the λ in [0, 1] to fix (0: clean accuracy, 1: robustness)")
    parser.add_argument("--format", choices=FORMATS, default="oat",
                        help="oat: one .pt file for oat_plugins.load_exported; safetensors: a "
                        "timm-native folder (default: %(default)s)")
    parser.add_argument("--image-size", type=positive_int, default=None, metavar="N",
                        help="with --format safetensors: the input size for timm's data "
                        "config, e.g. 32 for CIFAR (default: a ViT's img_size, else timm's "
                        "default for the architecture)")
    add_density_argument(parser)
    parser.add_argument("--out", required=True,
                        help="output file (.pt), or folder with --format safetensors")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.image_size is not None and args.format != "safetensors":
        raise ValueError("--image-size applies to --format safetensors only")
    model = load(args.checkpoint)
    apply_density(model, args.density, args.checkpoint)
    save_exported(model, args.lam, args.out, format=args.format, image_size=args.image_size)
    n_params = sum(p.numel() for p in model.export(args.lam).parameters())
    print(f"exported {model.backbone_name or 'model'} ({model.method_name}) at λ={args.lam:g} "
          f"to {args.out} ({n_params:,} parameters); load with {_LOAD_HINT[args.format]}")
    return 0
