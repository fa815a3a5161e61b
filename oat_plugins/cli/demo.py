"""``oat-plugins demo``: the whole idea in a few CPU minutes, on a model shipped in the package.

Loads the small conditional checkpoint bundled with the package (made by
``bench/demo_model.py``; its card says how), says where it came from, sweeps λ on the bundled
CIFAR-10 sample under PGD, checks that the curve is a dial, plots it, exports it at one λ and
says what the export gives, then fine-tunes it for a short run the user watches."""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

from ._common import parse_lambdas, positive_int, unit_float

DEMO_MODEL = Path(str(files("oat_plugins") / "assets" / "demo_model.pt"))
"""The shipped checkpoint; its card is the ``.json`` beside it."""
DEMO_LAMBDAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
CARD_KEYS = ("command", "model", "method", "data", "train", "train_minutes", "device",
             "evaluation", "rows", "file")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="sweep, export and fine-tune the small conditional model shipped in the package",
        description="Load the conditional model shipped in the package (film on a narrow "
        "timm resnet10t, trained once-for-all on CIFAR-10 by bench/demo_model.py: the card "
        "beside it gives the command and its measured numbers), sweep λ on the bundled "
        "CIFAR-10 test sample under PGD, print the table and the dial check, export the model "
        "at --export-lambda and compare the export with the conditional model, then "
        "fine-tune it on the bundled training sample. Writes model.pt (the swept model), "
        "metrics.json, metrics.csv, tradeoff.png, the export and finetune/model.pt into --out.",
        epilog="example: oat-plugins demo --out runs/demo",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", default=str(DEMO_MODEL),
                        help="the conditional model; its card is the .json beside it")
    parser.add_argument("--lambdas", type=parse_lambdas, default=DEMO_LAMBDAS,
                        metavar="LIST", help="λ values to evaluate")
    parser.add_argument("--attack", default="pgd", help="evaluation attack")
    parser.add_argument("--steps", type=positive_int, default=10,
                        help="evaluation attack iterations")
    parser.add_argument("--n-examples", type=positive_int, default=1000,
                        help="bundled test images to evaluate (at most 1000)")
    parser.add_argument("--export-lambda", type=unit_float, default=0.6,
                        help="λ to export the plain model at")
    parser.add_argument("--finetune-steps", type=int, default=31,
                        help="optimizer steps of the fine-tuning run (31 = one pass over the "
                        "4,000 bundled training images; 0: skip)")
    parser.add_argument("--finetune-lr", type=float, default=0.01, help="fine-tuning SGD lr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import oat_plugins
    from oat_plugins.data import load_dataset

    if args.finetune_steps < 0:
        raise ValueError(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    started = time.perf_counter()
    out = Path(args.out)
    card = read_card(Path(args.checkpoint))
    model = oat_plugins.load(args.checkpoint)
    print(provenance(card, model))
    test = load_dataset("bundled", "test")
    before = sweep(model, test, args)
    oat_plugins.save(model, out / "model.pt")  # the swept model, for eval / export / info
    before.to_json(out / "metrics.json")
    before.to_csv(out / "metrics.csv")
    before.plot(out / "tradeoff.png", label=f"{card['model']} + {card['method']}",
                title=f"bundled CIFAR-10 test sample, {before.meta['attack']}")
    print(f"\nλ sweep on {before.rows[0].n} bundled CIFAR-10 test images (JPEG q75):\n")
    print(before.to_markdown())
    print(f"wrote {out / 'model.pt'}, {out / 'metrics.json'}, {out / 'metrics.csv'}, "
          f"{out / 'tradeoff.png'}\n")
    print(export_report(model, args.export_lambda, test, out))
    if args.finetune_steps:
        finetune(model, test, args, out, before)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    return 0


def read_card(checkpoint: Path) -> dict[str, Any]:
    """The model's card (``<checkpoint>.json``), after checking that it describes this very
    file (sha256): the demo shows the card's numbers, so it refuses a file they are not of."""
    card_path = checkpoint.with_suffix(".json")
    if not checkpoint.is_file() or not card_path.is_file():
        raise FileNotFoundError(
            f"no demo model at {checkpoint} (or no card {card_path.name} beside it); make it "
            "with: python bench/demo_model.py --install")
    card = json.loads(card_path.read_text())
    missing = [key for key in CARD_KEYS if key not in card]
    if missing:
        raise ValueError(f"{card_path} lacks {', '.join(missing)}; remake it with "
                         "bench/demo_model.py")
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    if digest != card["file"]["sha256"]:
        raise ValueError(f"{checkpoint} is not the file its card {card_path.name} describes "
                         "(sha256 differs); remake both with bench/demo_model.py")
    return card


def provenance(card: dict[str, Any], model: Any) -> str:
    """Where the model came from: the command, the setting and the numbers it measured."""
    train = card["train"]
    ends = [card["rows"][0], card["rows"][-1]]
    measured = "; ".join(f"λ = {row['lam']:g}: clean {100 * row['clean_acc']:.1f} %, robust "
                         f"{100 * row['robust_acc']:.1f} %" for row in ends)
    evaluation = card["evaluation"]
    return "\n".join([
        f"model: {card['model']} + {card['method']} ({model.summary().splitlines()[0]})",
        f"where it came from: trained once-for-all on {card['data']} for {train['epochs']} "
        f"epochs ({train['attack']} at ε = {train['eps']}, {train['lambdas']}), "
        f"{card['train_minutes']} min on {card['device']}, by",
        f"    {card['command']}",
        f"its measured numbers ({evaluation['attack']} on {evaluation['n_examples']} images of "
        f"the {evaluation['data']}): {measured}",
    ])


def sweep(model: Any, test: Any, args: argparse.Namespace, lambdas: Any = None) -> Any:
    from oat_plugins.evaluate import evaluate

    return evaluate(model, test, args.lambdas if lambdas is None else lambdas,
                    attack=args.attack, steps=args.steps, n_examples=args.n_examples,
                    seed=args.seed, progress=not args.no_progress, log_rows=False)


def export_report(model: Any, lam: float, test: Any, out: Path) -> str:
    """Export at λ, save it, and say what it is: its class, its outputs against the
    conditional model's, its parameter count and its speed."""
    import torch

    from oat_plugins import save_exported

    plain = model.export(lam)
    x = torch.stack([test[i][0] for i in range(64)])
    with torch.inference_mode(), model.at(lam):
        difference = float((model(x) - plain(x)).abs().max())
    backbone = plain[1]
    path = out / f"model_lam{lam:g}.pt"
    save_exported(model, lam, path)
    cond_ms, plain_ms = _latency_ms(model, lam, x), _latency_ms(plain, None, x)
    return (
        f"export at λ = {lam:g}: a plain {type(backbone).__module__}.{type(backbone).__name__} "
        f"(no oat_plugins module), {_parameters(plain):,} parameters against "
        f"{_parameters(model):,} for the conditional model; max |logit difference| at "
        f"λ = {lam:g}: {difference:.1e}; {plain_ms:.1f} ms against {cond_ms:.1f} ms per batch "
        f"of {len(x)} (median, this machine). Wrote {path} "
        "(oat_plugins.load_exported reads it; `oat-plugins export --format safetensors` "
        "writes a folder plain timm loads).")


def _parameters(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _latency_ms(module: Any, lam: float | None, x: Any, repeats: int = 7) -> float:
    """Median forward time in ms (at λ for the conditional model)."""
    import contextlib

    import torch

    times = []
    with torch.inference_mode(), (module.at(lam) if lam is not None
                                  else contextlib.nullcontext()):
        module(x)  # warm-up: the conditional model folds its layers for this λ here
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def finetune(model: Any, test: Any, args: argparse.Namespace, out: Path, before: Any) -> None:
    """A short once-for-all fine-tuning run on the bundled training sample (a stand-in for
    your data), then the λ = 0 and λ = 1 rows again, before and after."""
    import oat_plugins
    from oat_plugins.data import load_dataset
    from oat_plugins.train import TrainConfig, fit

    train = load_dataset("bundled", "train")
    config = TrainConfig(epochs=1, batch_size=128, lr=args.finetune_lr, attack="fgsm-rs",
                         steps=1, seed=args.seed, max_steps=args.finetune_steps, log_every=0,
                         progress=not args.no_progress)
    print(f"\nfine-tuning {args.finetune_steps} steps on the {len(train):,} bundled training "
          f"images (FGSM-RS, lr {args.finetune_lr:g}, the method's λ sampler; they stand in for "
          "your data, and the model has seen them: they are part of CIFAR-10's training set) ...")
    model.train()
    fit(model, train, config, out / "finetune")
    model.eval()
    path = out / "finetune" / "model.pt"
    oat_plugins.save(model, path)
    ends = [before.rows[0].lam, before.rows[-1].lam]
    after = sweep(model, test, args, ends)
    print("\n| λ | clean before → after (%) | robust before → after (%) |\n|---|---|---|")
    for old, new in zip((before.row(lam) for lam in ends), after.rows, strict=True):
        print(f"| {new.lam:g} | {100 * old.clean_acc:.1f} → {100 * new.clean_acc:.1f} | "
              f"{100 * old.robust_acc:.1f} → {100 * new.robust_acc:.1f} |")
    print(f"wrote {path}; train on your own data with `oat-plugins train --config FILE` "
          "(see docs/recipes.md)")
