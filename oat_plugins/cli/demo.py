"""``oat-plugins demo``: the whole idea in a few CPU minutes.

Wraps a small timm backbone, trains it once-for-all on the CIFAR-10 sample bundled with the
package, then sweeps λ and prints clean vs robust accuracy, writing the plot and JSON."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from ._common import json_object, parse_lambdas, positive_int

logger = logging.getLogger(__name__)

DEMO_MODEL = "resnet10t"
DEMO_MODEL_KWARGS: dict[str, Any] = {"channels": [32, 64, 128, 256]}
"""A narrow ResNet-10-T (1.3 M parameters; 2.3 M with FiLM) that trains in minutes on a CPU."""
DEMO_LAMBDAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
DEMO_TRAIN_LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.4, 1.0)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train once-for-all on the bundled CIFAR-10 sample and sweep λ (CPU minutes)",
        description="Wrap a small timm backbone with --method, train it once-for-all on the "
        "CIFAR-10 sample bundled with the package (4,000 train images), then evaluate clean "
        "and PGD accuracy on the first --n-examples bundled test images for every λ of "
        "--lambdas. Prints the table; writes model.pt, metrics.json, metrics.csv and "
        "tradeoff.png into --out, and the training checkpoint and log into --out/train.",
        epilog="example: oat-plugins demo --out runs/demo",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=DEMO_MODEL, help="timm model name")
    parser.add_argument("--model-kwargs", type=json_object, default=None, metavar="JSON",
                        help="timm.create_model kwargs (default for resnet10t: "
                        f"{json.dumps(DEMO_MODEL_KWARGS)}, a narrow variant)")
    parser.add_argument("--method", default="film", help="conditioning method")
    parser.add_argument("--epochs", type=positive_int, default=20, help="training epochs")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="stop training after this many optimizer steps")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--train-attack", default="pgd",
                        help="training attack: pgd or fgsm-rs (fast AT)")
    parser.add_argument("--train-steps", type=positive_int, default=2,
                        help="training attack iterations (pgd)")
    parser.add_argument("--train-lambdas", type=parse_lambdas, default=DEMO_TRAIN_LAMBDAS,
                        metavar="LIST", help="training λ set (OAT's)")
    parser.add_argument("--clean-fraction", type=float, default=0.5,
                        help="share of each training batch at λ = 0 (OAT: 1/6); a short run "
                        "needs more clean samples for the clean branch to pull ahead")
    parser.add_argument("--lambdas", type=parse_lambdas, default=DEMO_LAMBDAS,
                        metavar="LIST", help="λ values to evaluate")
    parser.add_argument("--attack", default="pgd", help="evaluation attack")
    parser.add_argument("--steps", type=positive_int, default=10,
                        help="evaluation attack iterations")
    parser.add_argument("--n-examples", type=positive_int, default=500,
                        help="bundled test images to evaluate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import timm
    import torch

    import oat_plugins
    from oat_plugins.data import dataset_stats, load_dataset
    from oat_plugins.evaluate import evaluate
    from oat_plugins.train import TrainConfig, fit

    out = Path(args.out)
    model_kwargs = dict(args.model_kwargs if args.model_kwargs is not None else
                        (DEMO_MODEL_KWARGS if args.model == DEMO_MODEL else {}))
    model_kwargs.setdefault("num_classes", 10)
    if "channels" in model_kwargs:
        model_kwargs["channels"] = tuple(model_kwargs["channels"])
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    backbone = timm.create_model(args.model, **model_kwargs)
    model = oat_plugins.wrap(backbone, args.method, normalize=dataset_stats("bundled"),
                             model_kwargs=model_kwargs)
    print(model.summary())
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        attack=args.train_attack, steps=args.train_steps, seed=args.seed,
        lambdas=tuple(args.train_lambdas), clean_fraction=args.clean_fraction,
        max_steps=args.max_steps, eval_adversarial=False, eval_max_samples=500,
        progress=not args.no_progress,
    )
    train_data = load_dataset("bundled", "train")
    test_data = load_dataset("bundled", "test")
    print(f"training {args.method} on {len(train_data)} bundled CIFAR-10 images for "
          f"{args.epochs} epoch(s) ({args.train_attack}) ...")
    fit(model, train_data, config, out / "train", eval_data=test_data)
    trained = time.perf_counter() - started
    oat_plugins.save(model, out / "model.pt")

    result = evaluate(model, test_data, args.lambdas, attack=args.attack, steps=args.steps,
                      n_examples=args.n_examples, seed=args.seed,
                      progress=not args.no_progress)
    result.meta.update(data="bundled CIFAR-10 sample (test)", train_seconds=round(trained, 1),
                       train=dict(epochs=args.epochs, max_steps=args.max_steps,
                                  attack=args.train_attack, steps=args.train_steps,
                                  lambdas=list(args.train_lambdas),
                                  clean_fraction=args.clean_fraction),
                       model_kwargs=model_kwargs)
    result.to_json(out / "metrics.json")
    result.to_csv(out / "metrics.csv")
    result.plot(out / "tradeoff.png", label=f"{args.model} + {args.method}")
    total = time.perf_counter() - started
    print()
    print(result.to_markdown())
    print()
    print(f"trained in {trained:.0f} s, evaluated in {total - trained:.0f} s; wrote "
          f"{out / 'model.pt'}, {out / 'metrics.json'}, {out / 'metrics.csv'}, "
          f"{out / 'tradeoff.png'}")
    print(f"next: oat-plugins export --checkpoint {out / 'model.pt'} --lambda 0.5 "
          f"--out {out / 'model_lam0.5.pt'}")
    return 0
