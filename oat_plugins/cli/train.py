"""``oat-plugins train``: adversarially train a conditional model (OAT's recipe by default).

Works the same under ``torchrun --nproc_per_node N`` (DistributedDataParallel)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ..attacks import attack_names_help
from ._common import (
    json_object,
    number,
    parse_lambdas,
    positive_int,
    positive_number,
    unit_float,
)

logger = logging.getLogger(__name__)

FINAL_LAMBDAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
ROBUSTBENCH_PREFIX = "robustbench:"
ROBUSTBENCH_DATASETS = {"cifar10": "cifar10", "bundled": "cifar10", "cifar100": "cifar100"}
"""--data values a RobustBench zoo model can train on, and the zoo's name of their dataset."""


def training_lambdas(text: str) -> tuple[float, ...]:
    """A comma-separated list of training λ values in [0, 1] with at least one λ > 0."""
    values = parse_lambdas(text)
    if not any(v > 0 for v in values):
        raise argparse.ArgumentTypeError("needs at least one λ > 0 "
                                         "(λ = 0 alone is plain training)")
    return tuple(values)


def _option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option takes KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="adversarially train a conditional model",
        description="Wrap a timm backbone with a method and train it with OAT's recipe "
        "(per-sample λ, torchattacks PGD on the λ > 0 samples, loss (1-λ)·CE(x) + λ·CE(x_adv)). "
        "Writes OUT/last.pt every epoch (and with --save-every-steps/--save-every-minutes), "
        "OUT/metrics.jsonl and .csv, and OUT/model.pt at the end. SIGTERM/SIGINT finish the "
        "step, write OUT/last.pt and exit with 143/130 (--resume continues). Under "
        "`torchrun --nproc_per_node N` it trains with DistributedDataParallel.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a YAML file of these options (e.g. examples/recipes/*.yaml; keys "
                        "as the long flags: epochs, model-kwargs, option: {KEY: VALUE}, ...); "
                        "flags given on the command line override it")
    parser.add_argument("--model", default=None,
                        help="timm model name, e.g. resnet18 (created with the data's classes), or "
                        "robustbench:NAME for a RobustBench zoo model; required, here or in "
                        "--config")
    parser.add_argument("--robustbench-dir", default="models", metavar="DIR",
                        help="with --model robustbench:NAME (a RobustBench zoo model, e.g. "
                        "robustbench:Carmon2019Unlabeled): where robustbench keeps its weights "
                        "(DIR/cifar10/Linf/NAME.pt, downloaded when missing)")
    parser.add_argument("--model-kwargs", type=json_object, default=None, metavar="JSON",
                        help='extra timm.create_model kwargs, e.g. \'{"drop_rate": 0.1}\'')
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                        help="start from timm's pretrained weights (downloads them)")
    parser.add_argument("--method", default=None,
                        help="conditioning method, e.g. film; required, here or in --config")
    parser.add_argument("--option", type=_option, action="append", default=[],
                        metavar="KEY=VALUE",
                        help="a method option (JSON value), repeatable, e.g. encoding=\"scalar\"")
    parser.add_argument("--exits", type=exit_spec, default=None, metavar="auto|LIST",
                        help="early exits (RDI-Nets) on any method: 'auto' (after every stage "
                        "but the last) or feature_info indices, e.g. 1,2,3 (method multiexit "
                        "has them by default)")
    parser.add_argument("--calibration-samples", type=int, default=5000, metavar="N",
                        help="with exits: N training images (class-balanced, drawn with "
                        "--seed) kept out of training to calibrate the exits' thresholds at "
                        "the end (0: no calibration; the thresholds stay unset)")
    parser.add_argument("--exit-budget", type=positive_number, default=0.85, metavar="B",
                        help="with exits: the calibrated mean MACs per image, as a fraction of "
                        "the backbone's (heads evaluated and rejected included); `oat-plugins "
                        "eval --exit-budget` re-picks it later")
    parser.add_argument("--calibration-lambda", type=unit_float, default=1.0, metavar="λ",
                        help="with exits: the λ the exits are calibrated at")
    parser.add_argument("--data", default="bundled",
                        help="cifar10, cifar100, svhn (stored under --data-dir), bundled (the "
                        "CIFAR-10 sample in the package) or a path to an ImageFolder directory")
    parser.add_argument("--data-dir", default=None,
                        help="root of torchvision datasets (default $OAT_PLUGINS_DATA or "
                        "~/.cache/oat-plugins/data)")
    parser.add_argument("--no-download", action="store_true",
                        help="never download a torchvision dataset")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="resize ImageFolder images to this size")
    parser.add_argument("--limit-train", type=positive_int, default=None, metavar="N",
                        help="train on N training images only (smoke runs): a class-balanced "
                        "subset drawn with --seed")
    parser.add_argument("--eval-samples", type=int, default=1000, metavar="N",
                        help="test images evaluated after each epoch, a class-balanced subset "
                        "drawn with --seed (0: no evaluation)")
    parser.add_argument("--epochs", type=positive_int, default=200, help="training epochs")
    parser.add_argument("--batch-size", type=positive_int, default=128,
                        help="global batch size (split over torchrun processes)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    parser.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine",
                        help="learning-rate schedule (per step)")
    parser.add_argument("--lambdas", type=training_lambdas, default=None, metavar="LIST",
                        help="training λ set, e.g. 0,0.1,0.2,0.3,0.4,1 (default: the method's "
                        "own sampler)")
    parser.add_argument("--clean-fraction", type=float, default=None,
                        help="share of each batch at λ = 0 with --lambdas "
                        "(default 1/len(lambdas))")
    parser.add_argument("--attack", default="pgd",
                        help=f"attack: {attack_names_help()}; fgsm-rs is fast training")
    parser.add_argument("--eps", type=number, default=8 / 255,
                        help="attack budget, e.g. 8/255")
    parser.add_argument("--alpha", type=number, default=None,
                        help="attack step (default min(1.25ε, ε+4/255)/steps; 1.25ε for "
                        "fgsm-rs)")
    parser.add_argument("--steps", type=positive_int, default=7, help="attack iterations")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available, else cpu; "
                        "under torchrun cuda means cuda:LOCAL_RANK)")
    parser.add_argument("--amp", action="store_true", help="mixed precision")
    parser.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default=None,
                        help="autocast dtype with --amp (default float16 on CUDA, bfloat16 on "
                        "CPU); the attack runs under autocast only with bfloat16")
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole run")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--out", default=None,
                        help="output directory; required, here or in --config")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/last.pt when it exists")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="stop after this many optimizer steps in total")
    parser.add_argument("--save-every-steps", type=positive_int, default=None, metavar="N",
                        help="also write OUT/last.pt every N optimizer steps")
    parser.add_argument("--save-every-minutes", type=positive_number, default=None,
                        metavar="M", help="also write OUT/last.pt every M minutes")
    parser.add_argument("--log-every", type=int, default=50, metavar="N",
                        help="log the loss every N steps (0: once per epoch)")
    parser.add_argument("--final-lambdas", type=parse_lambdas, default=FINAL_LAMBDAS,
                        metavar="LIST", help="λ values of the final trade-off table")
    parser.add_argument("--final-steps", type=int, default=10, metavar="N",
                        help="PGD-N (at --eps) on the --eval-samples test images for the final "
                        "trade-off table (0: no table)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import oat_plugins
    from oat_plugins import data as datasets
    from oat_plugins.train import STOP_SIGNALS, TrainConfig, fit

    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        logging.getLogger().setLevel(logging.WARNING)
    missing = [f"--{name}" for name in ("model", "method", "out") if getattr(args, name) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (on the command line or in --config)")
    if args.final_steps < 0:
        raise ValueError(f"--final-steps must be >= 0, got {args.final_steps}")
    if args.eval_samples < 0:
        raise ValueError(f"--eval-samples must be >= 0, got {args.eval_samples}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.log_every < 0:
        raise ValueError(f"--log-every must be >= 0, got {args.log_every}")
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, schedule=args.schedule, eps=args.eps, alpha=args.alpha,
        steps=args.steps, attack=args.attack, lambdas=args.lambdas,
        clean_fraction=args.clean_fraction, device=args.device, amp=args.amp,
        amp_dtype=args.amp_dtype, seed=args.seed, max_steps=args.max_steps,
        save_every_steps=args.save_every_steps, save_every_minutes=args.save_every_minutes,
        num_workers=args.num_workers, log_every=args.log_every,
        eval_max_samples=max(args.eval_samples, 1), progress=not args.no_progress,
    )
    download = not args.no_download
    train_data = datasets.load_dataset(args.data, "train", data_dir=args.data_dir,
                                       download=download, image_size=args.image_size)
    train_data, held_out = _calibration_split(train_data, args)
    if args.limit_train is not None:
        train_data = datasets.balanced_subset(train_data, args.limit_train, args.seed)
    eval_data = None
    if args.eval_samples > 0:
        eval_data = datasets.load_dataset(args.data, "test", data_dir=args.data_dir,
                                          download=download, image_size=args.image_size)
        eval_data = datasets.balanced_subset(eval_data, args.eval_samples, args.seed)
    torch.manual_seed(args.seed)  # the same initial weights on every rank and every run
    model = _wrapped_model(args)
    result = fit(model, train_data, config, args.out, resume=args.resume, eval_data=eval_data)
    if result["stopped_by"] in STOP_SIGNALS:
        return _report_stop(result)
    if int(os.environ.get("RANK", "0")) == 0:
        if held_out is not None:
            _calibrate_exits(model, held_out, args)
        path = Path(args.out) / "model.pt"
        oat_plugins.save(model, path)
        last = result["history"][-1] if result["history"] else {}
        summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items()
                            if isinstance(v, float))
        print(f"trained {result['epoch']} epoch(s), {result['global_step']} steps"
              f"{' (stopped at --max-steps)' if not result['finished'] else ''}; "
              f"{summary or 'no completed epoch'}\nwrote {path} and "
              f"{result['checkpoint']}")
        if eval_data is not None and args.final_steps:
            print_tradeoff(model, eval_data, args)
    return 0


def print_tradeoff(model: Any, eval_data: Any, args: argparse.Namespace) -> None:
    """The final summary: clean and PGD accuracy at each --final-lambdas on the evaluation
    images, the dial check, and OUT/tradeoff.json / .png."""
    from oat_plugins.evaluate import evaluate

    result = evaluate(model, eval_data, args.final_lambdas, attack="pgd", eps=args.eps,
                      steps=args.final_steps, progress=not args.no_progress, log_rows=False)
    out = Path(args.out)
    result.to_json(out / "tradeoff.json")
    result.plot(out / "tradeoff.png", label=f"{args.model} + {args.method}")
    print(f"\ntrade-off on {result.rows[0].n} test images of {args.data}:\n")
    print(result.to_markdown())
    print(f"wrote {out / 'tradeoff.json'} and {out / 'tradeoff.png'}")


def exit_spec(text: str) -> str | list[int]:
    """``--exits``: ``'auto'`` or comma-separated feature_info indices."""
    if text.strip() == "auto":
        return "auto"
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--exits takes 'auto' or feature_info indices such as 1,2,3, got {text!r}") from None


def _has_exits(args: argparse.Namespace) -> bool:
    from oat_plugins.methods import get_method

    return args.exits is not None or get_method(args.method).default_exits is not None


def _calibration_split(train_data: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """(the images to train on, the held-out ones the exits are calibrated on: not
    augmented, never trained on; None without exits or with --calibration-samples 0)."""
    from torch.utils.data import Subset

    from oat_plugins import data as datasets

    if args.calibration_samples < 0:
        raise ValueError(f"--calibration-samples must be >= 0, got {args.calibration_samples}")
    if args.calibration_samples == 0 or not _has_exits(args):
        return train_data, None
    if args.calibration_samples >= len(train_data):
        raise ValueError(f"--calibration-samples {args.calibration_samples} leaves no training "
                         f"image of the {len(train_data)}; use fewer, or 0")
    held = set(datasets.balanced_subset(train_data, args.calibration_samples,
                                        args.seed).indices)
    plain = datasets.load_dataset(args.data, "train", data_dir=args.data_dir, augment=False,
                                  download=not args.no_download, image_size=args.image_size)
    rest = [i for i in range(len(train_data)) if i not in held]
    return Subset(train_data, rest), Subset(plain, sorted(held))


def _calibrate_exits(model: Any, held_out: Any, args: argparse.Namespace) -> None:
    """Fit the exits' thresholds on the held-out training images at --exit-budget."""
    with model.at(args.calibration_lambda):
        try:
            chosen = model.calibrate(held_out, budget=args.exit_budget)
        except ValueError as err:  # an infeasible budget must not cost the trained model
            print(f"exits not calibrated to --exit-budget: {err}. The held-out statistics are "
                  "saved with the model: `oat-plugins eval --exit-budget B` picks another.")
            return
    print(f"exits calibrated at λ = {args.calibration_lambda:g} on {len(held_out)} held-out "
          f"training images: mean MACs {chosen['mean_fraction']:.3f} of the backbone's, exit "
          "shares " + ", ".join(f"{share:.2f}" for share in chosen["exit_shares"]))


def _wrapped_model(args: argparse.Namespace) -> Any:
    """The backbone of --model (a timm name, or ``robustbench:NAME``), wrapped by --method."""
    import oat_plugins
    from oat_plugins import data as datasets

    options = _method_options(args)
    if args.model.startswith(ROBUSTBENCH_PREFIX):
        backbone = robustbench_model(args.model.removeprefix(ROBUSTBENCH_PREFIX), args)
        # A zoo model takes [0, 1] images and normalises inside (RobustBench's convention).
        return oat_plugins.wrap(backbone, args.method, normalize=None, exits=args.exits,
                                **options)
    import timm

    model_kwargs = dict(args.model_kwargs or {})
    model_kwargs.setdefault("num_classes", datasets.num_classes(args.data, args.data_dir))
    backbone = timm.create_model(args.model, pretrained=args.pretrained, **model_kwargs)
    return oat_plugins.wrap(backbone, args.method,
                            normalize=datasets.dataset_stats(args.data) or "auto",
                            model_kwargs=model_kwargs, exits=args.exits, **options)


def robustbench_model(name: str, args: argparse.Namespace) -> Any:
    """A model of RobustBench's zoo (L∞) for --data's dataset, with its robust weights:
    ``robustbench.utils.load_model`` reads ``--robustbench-dir/<dataset>/Linf/<name>.pt`` and
    downloads it first when it is not there."""
    from oat_plugins.robustbench import compat

    if args.model_kwargs or args.pretrained:
        raise ValueError("--model-kwargs and --pretrained do not apply to a robustbench: model "
                         "(the zoo fixes its architecture and weights)")
    dataset = ROBUSTBENCH_DATASETS.get(str(args.data).lower())
    if dataset is None:
        raise ValueError(f"a robustbench: model needs --data among "
                         f"{', '.join(ROBUSTBENCH_DATASETS)}, got {args.data!r}")
    compat.install()
    from robustbench.utils import load_model

    try:
        return load_model(name, model_dir=args.robustbench_dir, dataset=dataset,
                          threat_model="Linf")
    except KeyError:
        raise ValueError(f"{name!r} is not in RobustBench's {dataset} Linf model zoo") from None


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--option`` values, plus ``--lambdas`` for a method that takes the training λ set as
    an option (film's λ codes are built for it), unless given with ``--option``."""
    from oat_plugins.methods import get_method

    options = dict(args.option)
    fields = {f.name for f in dataclasses.fields(get_method(args.method).Options)}
    if args.lambdas is not None and "lambdas" in fields:
        options.setdefault("lambdas", list(args.lambdas))
    return options


def _report_stop(result: dict[str, Any]) -> int:
    """A run stopped by SIGTERM / SIGINT (pre-emption, Ctrl-C) after writing its checkpoint:
    one line, and the shell's code for that signal (143 / 130), so a scheduler sees that the
    job did not finish."""
    name = result["stopped_by"]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"oat-plugins train: stopped by {name} after {result['global_step']} steps; "
              f"wrote {result['checkpoint']}; rerun with --resume to continue",
              file=sys.stderr)
    return 128 + int(getattr(signal, name))
