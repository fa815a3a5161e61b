"""``oat-plugins eval``: clean and robust accuracy of a checkpoint over a λ sweep."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..attacks import attack_names_help, find_attack
from ..data import DATASETS, load_dataset
from ..evaluate import DEFAULT_LAMBDAS, evaluate
from ..model import ConditionalModel
from ._common import (
    add_density_argument,
    apply_density,
    load_any_model,
    parse_lambdas,
    positive_int,
    positive_number,
)

logger = logging.getLogger(__name__)


def attack_name(text: str) -> str:
    """An attack name of :mod:`oat_plugins.attacks` (``argparse`` type for ``--attack``)."""
    if find_attack(text) is None:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {attack_names_help()})")
    return text


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="clean and robust accuracy over a λ sweep (table, JSON, CSV, plot)",
        description="Evaluate a checkpoint (conditional model, training checkpoint, or an "
        "exported plain model) on the test split of --data: clean accuracy and robust "
        "accuracy under --attack for each λ of --lambdas. Prints a markdown table and, for a "
        "sweep with λ values between its ends, whether the curve is a dial (monotone, not a "
        "switch); writes metrics.json (with the dial check), metrics.csv and tradeoff.png "
        "into --out.",
        epilog="example: oat-plugins eval --checkpoint runs/demo/model.pt --data bundled "
        "--lambdas 0,0.5,1 --attack pgd --steps 20 --n-examples 500 --out runs/eval. A model "
        "with exits (multi-exit) also gets its mean MACs per image as a share of the "
        "backbone's (heads evaluated and rejected included) in each row.",
    )
    parser.add_argument("--checkpoint", required=True, help="model file to evaluate")
    parser.add_argument("--data", default="bundled",
                        help="cifar10, cifar100, svhn (with --data-dir), bundled, or a path "
                        "to an ImageFolder directory (default: bundled)")
    parser.add_argument("--data-dir", default=None, help="root of torchvision datasets")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--lambdas", type=parse_lambdas, default=None,
                        help="comma-separated λ values in [0, 1] (default "
                        f"{','.join(f'{v:g}' for v in DEFAULT_LAMBDAS)}; not for a plain "
                        "model)")
    parser.add_argument("--attack", default="pgd", type=attack_name, metavar="NAME",
                        help=f"attack: {attack_names_help()} (default pgd)")
    parser.add_argument("--eps", type=positive_number, default=None,
                        help="attack radius, e.g. 8/255 (default 8/255 for L∞ attacks, 0.5 "
                        "for L2)")
    parser.add_argument("--steps", type=positive_int, default=20,
                        help="attack iterations (default 20)")
    parser.add_argument("--alpha", type=positive_number, default=None,
                        help="step size (default 2.5·eps/steps; 1.25·eps for fgsm-rs)")
    parser.add_argument("--n-examples", type=positive_int, default=None,
                        help="use the first N test examples (default: all)")
    parser.add_argument("--subset-seed", type=int, default=None, metavar="SEED",
                        help="with --n-examples, a random subset drawn with SEED instead of "
                        "the first N (use it for an ImageFolder path, which is sorted by class)")
    parser.add_argument("--exit-budget", type=positive_number, default=None, metavar="B",
                        help="a model with exits: re-pick its thresholds for a mean MAC "
                        "budget B (fraction of the backbone's, e.g. 0.7) from the calibration "
                        "saved in it (calibrated on held-out data, never on this split); "
                        "default: the saved thresholds")
    add_density_argument(parser)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: "
                        "cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attack's random start")
    parser.add_argument("--out", default="runs/eval", help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace) -> int:
    model = load_any_model(args.checkpoint)
    if not isinstance(model, ConditionalModel) and args.lambdas is not None:
        raise ValueError(
            f"{args.checkpoint!r} holds a plain (exported) model, which has no λ; drop --lambdas"
        )
    if args.exit_budget is not None:
        if getattr(model, "exits", None) is None:
            raise ValueError(f"{args.checkpoint!r} holds a model without exits; drop "
                             "--exit-budget")
        model.set_exit_budget(args.exit_budget)
    apply_density(model, args.density, args.checkpoint)
    dataset = load_dataset(args.data, args.split, data_dir=args.data_dir, augment=False)
    if (args.n_examples is not None and args.subset_seed is None
            and str(args.data).lower() not in DATASETS and args.n_examples < len(dataset)):
        logger.warning("an ImageFolder is sorted by class, so its first %d images may cover "
                       "few classes; pass --subset-seed 0 for a random subset", args.n_examples)
    result = evaluate(
        model, dataset,
        args.lambdas if isinstance(model, ConditionalModel) else None,
        attack=args.attack, eps=args.eps, steps=args.steps, alpha=args.alpha,
        n_examples=args.n_examples, batch_size=args.batch_size,
        device=args.device or _default_device(), seed=args.seed, subset_seed=args.subset_seed,
        progress=not args.no_progress,
    )
    result.meta.update(checkpoint=str(args.checkpoint), data=str(args.data), split=args.split)
    out = Path(args.out)
    result.to_json(out / "metrics.json")
    result.to_csv(out / "metrics.csv")
    result.plot(out / "tradeoff.png", label=getattr(model, "method_name", "model"))
    print(result.to_markdown())
    print(f"wrote {out / 'metrics.json'}, {out / 'metrics.csv'}, {out / 'tradeoff.png'}")
    return 0
