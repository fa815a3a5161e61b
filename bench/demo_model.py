#!/usr/bin/env python
"""Train the small conditional checkpoint that ``oat-plugins demo`` ships, and its card.

Trains ``--method`` (default OAT's film) on a narrow timm ResNet-10-T once-for-all on CIFAR-10
(JPEG q75; the setting of bench/RESULTS.md §2), saves it with ``oat_plugins.save`` (parameters
stored as ``--dtype``, float16 by default to keep the file under 5 MB), reloads the file, checks
that the reloaded model reproduces the trained one, measures the reloaded model's λ sweep and
writes ``demo_model.pt`` + ``demo_model.json`` (the card: the exact command, the setting, the
measured numbers, the file's sha256) into ``--out``. ``--install`` also copies both into
``oat_plugins/assets/``, where the demo reads them.

    python bench/demo_model.py --install                      # the shipped model (any device)
    python bench/demo_model.py --data bundled --epochs 1 --max-steps 3 --n-examples 32  # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tradeoff import load_data, setting_parser  # noqa: E402

import oat_plugins  # noqa: E402
from oat_plugins._io import atomic_write_text, file_sha256  # noqa: E402
from oat_plugins.data import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from oat_plugins.evaluate import SweepResult, evaluate  # noqa: E402
from oat_plugins.train import STOP_SIGNALS, TrainConfig, fit  # noqa: E402

logger = logging.getLogger("bench.demo_model")

MODEL_FILE = "demo_model.pt"
CARD_FILE = "demo_model.json"
ASSETS = ROOT / "oat_plugins" / "assets"
OAT_LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.4, 1.0)
REPRODUCE_TOLERANCE = 0.01
"""Largest |logit difference| allowed between the reloaded file and the trained model, as a
share of the trained model's largest |logit| (float16 weights: about 1e-3)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = setting_parser(__doc__)
    p.add_argument("--method", default="film", help="conditioning method")
    p.add_argument("--clean-fraction", type=float, default=None,
                   help="train on OAT's λ set {0, .1, .2, .3, .4, 1} with this share of each "
                   "batch at λ = 0 (default: the method's own sampler; film's is OAT's at 1/6)")
    p.add_argument("--lambdas", default="0,0.2,0.4,0.6,0.8,1", type=_floats, help="λ sweep")
    p.add_argument("--attack", default="pgd", help="evaluation attack")
    p.add_argument("--steps", type=int, default=20, help="evaluation attack iterations")
    p.add_argument("--n-examples", type=int, default=1000,
                   help="test images (a seeded random subset)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="how the parameters are stored (buffers keep their dtype)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if any)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "demo_model"))
    p.add_argument("--install", action="store_true",
                   help=f"copy the model and its card into {ASSETS.relative_to(ROOT)}/")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       attack=args.train_attack, steps=args.train_steps, seed=args.seed,
                       lambdas=None if args.clean_fraction is None else OAT_LAMBDAS,
                       clean_fraction=args.clean_fraction,
                       max_steps=args.max_steps, device=args.device,
                       num_workers=args.num_workers, eval_adversarial=False,
                       eval_max_samples=500, progress=not args.no_progress)


def train(args: argparse.Namespace, train_data: Dataset, test: Dataset,
          run_dir: Path) -> tuple[oat_plugins.ConditionalModel, float]:
    """The conditional model trained with ``fit`` (resumes an interrupted run in run_dir) and
    its training seconds, the parts before a resume included; a run stopped by SIGTERM /
    SIGINT exits here, so a half-trained model is never saved."""
    started = time.perf_counter()
    kwargs = dict(args.model_kwargs, num_classes=10)
    if "channels" in kwargs:
        kwargs["channels"] = tuple(kwargs["channels"])
    torch.manual_seed(args.seed)
    model = oat_plugins.wrap(timm.create_model(args.model, **kwargs), args.method,
                             normalize=(CIFAR10_MEAN, CIFAR10_STD), model_kwargs=kwargs)
    result = fit(model, train_data, train_config(args), run_dir, resume=True, eval_data=test)
    if result["stopped_by"] in STOP_SIGNALS:
        raise SystemExit(f"training stopped by {result['stopped_by']} at step "
                         f"{result['global_step']}; the same command resumes it from "
                         f"{result['checkpoint']}")
    epochs_seconds = sum(record.get("seconds", 0.0) for record in result["history"])
    return model.eval(), max(epochs_seconds, time.perf_counter() - started)


def save_compact(model: nn.Module, path: Path, dtype: torch.dtype) -> None:
    """``oat_plugins.save`` of a copy whose parameters are ``dtype``; buffers (λ tables,
    norm statistics) keep theirs, so λ lookups stay exact. ``load`` casts back on reading."""
    compact = copy.deepcopy(model).cpu()
    for param in compact.parameters():
        param.data = param.data.to(dtype)
    oat_plugins.save(compact, path)


@torch.no_grad()
def reproduction_error(trained: nn.Module, reloaded: nn.Module, test: Dataset,
                       lambdas: list[float]) -> float:
    """Largest |logit difference| between the two models over 256 test images and every λ,
    relative to the trained model's largest |logit|."""
    device = next(trained.parameters()).device
    reloaded.to(device)
    x = torch.stack([test[i][0] for i in range(min(256, len(test)))]).to(device)
    worst = 0.0
    for lam in lambdas:
        with trained.at(lam), reloaded.at(lam):
            expected = trained(x)
            difference = (expected - reloaded(x)).abs().max() / expected.abs().max()
            worst = max(worst, float(difference))
    return worst


def card(args: argparse.Namespace, argv: list[str], result: SweepResult, path: Path,
         seconds: float, error: float, described: str, device: torch.device) -> dict[str, Any]:
    """What the model is, how it was made (the exact command) and what it measured."""
    config = train_config(args)
    return {
        "command": "python " + shlex.join(["bench/demo_model.py", *argv]),
        "model": args.model, "model_kwargs": args.model_kwargs, "method": args.method,
        "data": described,
        "train": {"epochs": config.epochs, "max_steps": config.max_steps,
                  "batch_size": config.batch_size, "lr": config.lr, "schedule": config.schedule,
                  "attack": config.attack, "steps": config.steps, "eps": "8/255",
                  "lambdas": ("the method's default sampler" if config.lambdas is None else
                              f"λ set {list(config.lambdas)}, clean fraction "
                              f"{config.clean_fraction:.3g}")},
        "train_minutes": round(seconds / 60, 1), "device": str(device),
        "torch": torch.__version__, "timm": timm.__version__,
        "oat_plugins": oat_plugins.__version__,
        "evaluation": {"attack": result.meta.get("attack"), "n_examples": args.n_examples,
                       "subset_seed": 0, "seed": args.seed,
                       "data": "CIFAR-10 (JPEG q75) test set, seeded subset"},
        "rows": [{"lam": row.lam, "clean_acc": row.clean_acc, "robust_acc": row.robust_acc}
                 for row in result],
        "dial": result.dial().summary(),
        "file": {"name": MODEL_FILE, "bytes": path.stat().st_size, "sha256": file_sha256(path),
                 "parameter_dtype": args.dtype, "max_relative_logit_error": error},
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # on a GPU the images stay there as uint8 and are augmented a batch at a time (the same
    # crop and flip as the CPU transforms), so the loader does not starve the device
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_data, test, described = load_data(args.data, device=device if device.type == "cuda"
                                            else None)
    model, seconds = train(args, train_data, test, out / "train")
    path = out / MODEL_FILE
    save_compact(model, path, getattr(torch, args.dtype))
    device = next(model.parameters()).device
    reloaded = oat_plugins.load(path, map_location=device)
    error = reproduction_error(model, reloaded, test, args.lambdas)
    if error > REPRODUCE_TOLERANCE:
        path.unlink()
        raise SystemExit(f"the {args.dtype} file does not reproduce the trained model (max "
                         f"|logit difference| {error:.3g} of the largest |logit| > "
                         f"{REPRODUCE_TOLERANCE}); use --dtype float32")
    result = evaluate(reloaded, test, args.lambdas, attack=args.attack, steps=args.steps,
                      n_examples=args.n_examples, subset_seed=0, seed=args.seed,
                      progress=not args.no_progress)
    info = card(args, argv, result, path, seconds, error, described, device)
    atomic_write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", out / CARD_FILE)
    print(json.dumps(info, indent=2, ensure_ascii=False))
    print(result.to_markdown())
    if args.install:
        ASSETS.mkdir(exist_ok=True)
        for name in (MODEL_FILE, CARD_FILE):
            shutil.copyfile(out / name, ASSETS / name)
        print(f"installed {MODEL_FILE} and {CARD_FILE} into {ASSETS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
