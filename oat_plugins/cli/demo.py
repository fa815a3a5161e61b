"""``oat-plugins demo``: the whole idea in a few CPU minutes.

By default it loads the small conditional model shipped in the package (trained by
``bench/demo_model.py`` on the full CIFAR-10 training set; its card says how), checks the file
against its card, sweeps λ on the bundled CIFAR-10 test images (never seen in training),
exports a plain timm model at one λ and fine-tunes the model for a few steps while you watch.
``--from-scratch`` instead trains a model on the bundled sample (a weaker curve: 4,000 images
and a few CPU minutes)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import file_sha256
from ._common import json_object, parse_lambdas, positive_int, unit_float

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from ..evaluate import SweepResult
    from ..model import ConditionalModel

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_MODEL = ASSETS / "demo_model.pt"
"""The shipped conditional model; its card (how it was made, what it measured, the file's
sha256) is the ``.json`` beside it."""
DEMO_MODEL = "resnet10t"
DEMO_MODEL_KWARGS: dict[str, Any] = {"channels": [32, 64, 128, 256]}
"""A narrow ResNet-10-T (1.3 M parameters; 2.3 M with FiLM) that trains in minutes on a CPU."""
DEMO_LAMBDAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
DEMO_TRAIN_LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.4, 1.0)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="sweep λ on the shipped conditional model, export it, fine-tune it (CPU minutes)",
        description="Load the small film model shipped in the package (trained once-for-all on "
        "the full CIFAR-10 training set by bench/demo_model.py; the card beside it holds the "
        "exact command and its numbers), evaluate clean and PGD accuracy on the first "
        "--n-examples bundled CIFAR-10 test images for every λ of --lambdas, export a plain "
        "timm model at --export-lambda and fine-tune the model for --finetune-steps steps on "
        "the bundled training sample. With --from-scratch, train a model on the bundled "
        "sample instead (4,000 images: a much weaker curve). Writes model.pt, metrics.json, "
        "metrics.csv and tradeoff.png into --out.",
        epilog="example: oat-plugins demo --out runs/demo",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--lambdas", type=parse_lambdas, default=DEMO_LAMBDAS,
                        metavar="LIST", help="λ values to evaluate")
    parser.add_argument("--attack", default="pgd", help="evaluation attack")
    parser.add_argument("--steps", type=positive_int, default=10,
                        help="evaluation attack iterations")
    parser.add_argument("--n-examples", type=positive_int, default=1000,
                        help="bundled test images to evaluate (all 1,000: on fewer, sampling "
                        "noise of ±2 points shows in the curve)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    shipped = parser.add_argument_group("the shipped model (default)")
    shipped.add_argument("--model-file", default=str(SHIPPED_MODEL), metavar="PATH",
                         help="conditional model to demonstrate; its card is PATH with .json")
    shipped.add_argument("--export-lambda", type=unit_float, default=0.5, metavar="λ",
                         help="λ of the plain model the demo exports")
    shipped.add_argument("--finetune-steps", type=int, default=30, metavar="N",
                         help="fine-tuning steps on the bundled training sample (0: skip)")
    shipped.add_argument("--finetune-lr", type=float, default=0.01,
                         help="SGD learning rate of the fine-tuning run")
    scratch = parser.add_argument_group("--from-scratch")
    scratch.add_argument("--from-scratch", action="store_true",
                         help="train a model on the bundled sample instead of the shipped one")
    scratch.add_argument("--model", default=DEMO_MODEL, help="timm model name")
    scratch.add_argument("--model-kwargs", type=json_object, default=None, metavar="JSON",
                         help="timm.create_model kwargs (default for resnet10t: "
                         f"{json.dumps(DEMO_MODEL_KWARGS)}, a narrow variant)")
    scratch.add_argument("--method", default="film", help="conditioning method")
    scratch.add_argument("--epochs", type=positive_int, default=20, help="training epochs")
    scratch.add_argument("--max-steps", type=positive_int, default=None,
                         help="stop training after this many optimizer steps")
    scratch.add_argument("--batch-size", type=positive_int, default=128)
    scratch.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    scratch.add_argument("--train-attack", default="pgd",
                         help="training attack: pgd or fgsm-rs (fast AT)")
    scratch.add_argument("--train-steps", type=positive_int, default=2,
                         help="training attack iterations (pgd)")
    scratch.add_argument("--train-lambdas", type=parse_lambdas, default=DEMO_TRAIN_LAMBDAS,
                         metavar="LIST", help="training λ set (OAT's)")
    scratch.add_argument("--clean-fraction", type=float, default=0.5,
                         help="share of each training batch at λ = 0 (OAT: 1/6); a short run "
                         "needs more clean samples for the clean branch to pull ahead")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_from_scratch(args) if args.from_scratch else run_shipped(args)


# -- the shipped model ----------------------------------------------------------------------

def run_shipped(args: argparse.Namespace) -> int:
    """Load and check the shipped model, sweep λ, export at one λ, fine-tune briefly."""
    import oat_plugins
    from oat_plugins.data import load_dataset

    if args.finetune_steps < 0:
        raise ValueError(f"--finetune-steps must be >= 0 (0: no fine-tuning), got "
                         f"{args.finetune_steps}")
    out = Path(args.out)
    model, card = load_shipped(Path(args.model_file))
    print(provenance(card))
    print(model.summary())
    oat_plugins.save(model, out / "model.pt")
    test_data = load_dataset("bundled", "test")
    sweep(model, test_data, args, out, label=f"{card['model']} + {card['method']} (shipped)",
          meta={"model": "shipped demo model", "card": card})
    print(f"\nthe card's numbers ({card['evaluation']['attack']}, "
          f"{card['evaluation']['n_examples']} CIFAR-10 test images): "
          + ", ".join(f"λ = {r['lam']:g}: {100 * r['clean_acc']:.1f} / "
                      f"{100 * r['robust_acc']:.1f}" for r in card["rows"]))
    show_export(model, test_data, args.export_lambda, out)
    if args.finetune_steps > 0:
        finetune(model, args, out / "finetune")
    print(f"\nwrote {out / 'model.pt'}, {out / 'metrics.json'}, {out / 'metrics.csv'}, "
          f"{out / 'tradeoff.png'}; next, e.g.: oat-plugins eval --checkpoint "
          f"{out / 'model.pt'} --data bundled --lambdas 0,0.5,1 --attack apgd")
    return 0


def load_shipped(path: Path) -> tuple[ConditionalModel, dict[str, Any]]:
    """The model at ``path`` and its card (``path`` with ``.json``), refusing a file whose
    sha256 is not the card's: a demo must not present numbers of another model."""
    import oat_plugins

    card_path = path.with_suffix(".json")
    if not path.is_file() or not card_path.is_file():
        raise FileNotFoundError(
            f"no demo model at {path} (or no card {card_path.name} beside it); make one with "
            "`python bench/demo_model.py --install`, or run `oat-plugins demo --from-scratch`")
    card = json.loads(card_path.read_text())
    digest = file_sha256(path)
    if digest != card["file"]["sha256"]:
        raise ValueError(f"{path} does not match its card (sha256 {digest[:12]}… vs "
                         f"{card['file']['sha256'][:12]}…); reinstall the package or rebuild "
                         "it with `python bench/demo_model.py --install`")
    return oat_plugins.load(path).eval(), card


def provenance(card: dict[str, Any]) -> str:
    """Where the shipped model came from, in a few lines."""
    train = card["train"]
    return (f"shipped model: {card['model']} {json.dumps(card['model_kwargs'])} + "
            f"{card['method']}, trained once-for-all by\n  {card['command']}\n"
            f"on {card['data']}: {train['epochs']} epochs, batch {train['batch_size']}, "
            f"{train['attack']} at ε = {train['eps']}, {train['lambdas']}; "
            f"{card['train_minutes']} min on {card['device']} (torch {card['torch']}, "
            f"oat_plugins {card['oat_plugins']}); parameters stored as "
            f"{card['file']['parameter_dtype']}.")


def show_export(model: ConditionalModel, test_data: Dataset, lam: float, out: Path) -> None:
    """Export a plain model at ``lam``, check it computes the conditional model's function
    there, save it and say what it is."""
    import torch

    from oat_plugins.exported import save_exported

    plain = model.export(lam).eval()
    x = torch.stack([test_data[i][0] for i in range(64)])
    with torch.no_grad(), model.at(lam):
        expected = model(x)
        difference = float((plain(x) - expected).abs().max())
    path = out / f"model_lam{lam:g}.pt"
    save_exported(model, lam, path)
    backbone = plain[-1] if isinstance(plain, torch.nn.Sequential) else plain
    params = sum(p.numel() for p in plain.parameters())
    print(f"\nexport(λ = {lam:g}): a plain {type(backbone).__module__}.{type(backbone).__name__} "
          f"({params / 1e6:.2f} M parameters, no oat_plugins layer), max |logit difference| "
          f"from the conditional model at λ = {lam:g}: {difference:.1e}; saved to {path}")


def finetune(model: ConditionalModel, args: argparse.Namespace, run_dir: Path) -> None:
    """A short fine-tuning run of ``model`` on the bundled training sample: what continuing
    training on your own data looks like (``oat-plugins train`` runs the same loop)."""
    from oat_plugins.data import load_dataset
    from oat_plugins.train import TrainConfig, fit

    config = TrainConfig(epochs=1, max_steps=args.finetune_steps, batch_size=64,
                         lr=args.finetune_lr, attack="fgsm-rs", seed=args.seed, log_every=10,
                         progress=not args.no_progress)
    print(f"\nfine-tuning for {args.finetune_steps} steps on the bundled training sample "
          f"(batch 64, FGSM-RS, SGD lr {args.finetune_lr:g}) into {run_dir} ...")
    started = time.perf_counter()
    history = fit(model, load_dataset("bundled", "train"), config, run_dir)["history"]
    loss = history[-1]["loss"] if history else None
    print(f"fine-tuned in {time.perf_counter() - started:.0f} s"
          + (f", last training loss {loss:.3f}" if loss is not None else "")
          + f"; the checkpoint {run_dir / 'last.pt'} feeds `oat-plugins eval` and `export`")


# -- from scratch ---------------------------------------------------------------------------

def run_from_scratch(args: argparse.Namespace) -> int:
    """Train ``--method`` on the bundled sample, then sweep λ."""
    import timm
    import torch

    import oat_plugins
    from oat_plugins.data import dataset_stats, load_dataset
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
    sweep(model, test_data, args, out, label=f"{args.model} + {args.method}", meta=dict(
        train_seconds=round(trained, 1), model_kwargs=model_kwargs,
        train=dict(epochs=args.epochs, max_steps=args.max_steps, attack=args.train_attack,
                   steps=args.train_steps, lambdas=list(args.train_lambdas),
                   clean_fraction=args.clean_fraction)))
    print(f"trained in {trained:.0f} s; wrote {out / 'model.pt'}, {out / 'metrics.json'}, "
          f"{out / 'metrics.csv'}, {out / 'tradeoff.png'}")
    print(f"next: oat-plugins export --checkpoint {out / 'model.pt'} --lambda 0.5 "
          f"--out {out / 'model_lam0.5.pt'}")
    return 0


# -- shared ---------------------------------------------------------------------------------

def sweep(model: ConditionalModel, test_data: Dataset, args: argparse.Namespace, out: Path,
          *, label: str, meta: dict[str, Any]) -> SweepResult:
    """Clean and attacked accuracy at every λ of ``args.lambdas``: printed (with the dial
    check) and written as JSON, CSV and a plot with 0–100 % axes."""
    from oat_plugins.evaluate import evaluate

    started = time.perf_counter()
    result = evaluate(model, test_data, args.lambdas, attack=args.attack, steps=args.steps,
                      n_examples=args.n_examples, seed=args.seed,
                      progress=not args.no_progress)
    result.meta.update(data="bundled CIFAR-10 sample (test)", **meta)
    out.mkdir(parents=True, exist_ok=True)
    result.to_json(out / "metrics.json")
    result.to_csv(out / "metrics.csv")
    result.plot(out / "tradeoff.png", label=label)
    print()
    print(result.to_markdown())
    print(f"(evaluated in {time.perf_counter() - started:.0f} s on the first {args.n_examples} "
          "bundled CIFAR-10 test images)")
    return result
