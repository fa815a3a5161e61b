"""``oat-plugins gdws``: GDWS-convert a trained model and save it (weights_only-safe).

Examples::

    oat-plugins gdws --checkpoint model.pt --lambda 1.0 --beta 0.01 --out gdws.pt
    oat-plugins gdws --checkpoint resnet18_sd.pt --timm-model resnet18 --num-classes 10 \\
        --budget 0.25 --out gdws.pt

Input: a checkpoint written by ``oat_plugins.save`` (loaded with ``oat_plugins.load`` and
exported at ``--lambda``), or with ``--timm-model NAME`` a plain state dict of that timm model.

Output (``oat_plugins.gdws.save_converted``): a dict with the header every oat-plugins model
file shares (the timm spec of the source architecture, with its create_model kwargs), the
constructor config of every ``GDWSConv2d``, the state dict and the conversion report; it loads
with ``torch.load(weights_only=True)``. Rebuild with ``oat_plugins.gdws.load_converted(path)``,
or ``load_converted(path, build=factory)`` when the exported model is not a bare timm model.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any

from torch import nn

import oat_plugins
from oat_plugins.checkpoint import read_checkpoint, timm_spec

logger = logging.getLogger(__name__)


def _budget(text: str) -> int | float:
    """``"16"`` -> G = 16 per layer; ``"0.25"`` -> a quarter of each layer's full rank."""
    try:
        return float(text) if any(ch in text for ch in ".eE") else int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from e


def register(subparsers: Any) -> None:
    """Add the ``gdws`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "gdws",
        help="post-training GDWS approximation for faster robust inference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="oat_plugins.save file (or a state "
                   "dict with --timm-model)")
    p.add_argument("--timm-model", default=None, metavar="NAME",
                   help="treat --checkpoint as a state dict of this timm model")
    p.add_argument("--num-classes", type=int, default=None,
                   help="num_classes for --timm-model (default: timm's)")
    p.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="condition to export at (default: the model's current lambda)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--beta", type=float, help="network-level error bound (LEGO), >= 0")
    g.add_argument("--budget", type=_budget,
                   help="MEGO: int G per layer, or a fraction in (0, 1] of each layer's rank")
    p.add_argument("--alphas", default=None,
                   help="torch file with {layer: (C,) tensor} from gdws.compute_alphas "
                   "(default: alpha = 1)")
    p.add_argument("--keep-first", action="store_true",
                   help="also convert the first conv (skipped by default)")
    p.add_argument("--out", required=True, help="output file (gdws.save_converted format)")
    p.set_defaults(func=run)


def _load_model(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any] | None]:
    """The plain model to convert and the timm spec that rebuilds its architecture."""
    if args.timm_model:
        import timm

        kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
        model = timm.create_model(args.timm_model, pretrained=False, **kwargs)
        sd = read_checkpoint(args.checkpoint)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
        model.load_state_dict(sd)
        return model.eval(), timm_spec(model, kwargs)
    cond = oat_plugins.load(args.checkpoint)
    model = cond.export() if args.lam is None else cond.export(args.lam)
    # The conditional model's spec holds the create_model kwargs of its (narrow, ...) backbone.
    return model.eval(), cond.backbone_spec


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status."""
    from oat_plugins.gdws import convert, format_report, save_converted

    try:
        model, spec = _load_model(args)
        alphas = None
        if args.alphas:
            alphas = read_checkpoint(args.alphas)
        new, report = convert(
            model, beta=args.beta, budget=args.budget, alphas=alphas,
            skip_first=not args.keep_first,
        )
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"oat-plugins gdws: error: {e}", file=sys.stderr)
        return 2
    extra = {
        "source": str(args.checkpoint),
        "lambda": args.lam,
        "beta": args.beta,
        "budget": args.budget,
        "report": [
            {k: (list(v) if isinstance(v, tuple) else v)
             for k, v in dataclasses.asdict(r).items() if k != "extra"}
            for r in report
        ],
    }
    save_converted(new, args.out, spec=spec, extra=extra)
    print(format_report(report))
    print(f"\nsaved to {args.out} (load with oat_plugins.gdws.load_converted)")
    return 0
