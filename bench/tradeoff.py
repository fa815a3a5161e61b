#!/usr/bin/env python
"""Clean vs robust accuracy trade-off: once-for-all methods against plain baselines.

Trains each ``--methods`` entry (default ``film``) once with ``oat_plugins.train.fit`` and sweeps
λ; trains the *plain* backbone (no conditioning, no extra parameters) with the same recipe —
standard training (CE on clean images) and PGD-AT (CE on adversarial images, Madry et al.) —
and evaluates everything with the same attack on the same test images. Prints one markdown
table and writes ``results.json``, ``tradeoff.md`` and ``tradeoff.png`` into ``--out``.

The default budget (a narrow ResNet-10-T, FGSM-RS training as in "Fast is better than free",
10 epochs on CIFAR-10) is sized for about 30 minutes on a 2-core CPU for film + both baselines;
PGD-20 evaluation on 1,000 test images. Runs are cached: a finished model in
``--out/<name>/model.pt`` is reused (``--retrain`` to force), and an interrupted ``fit`` resumes.

    python bench/tradeoff.py                                  # CIFAR-10 JPEG from ../shared/data
    python bench/tradeoff.py --data bundled --epochs 1 --max-steps 5 --n-examples 64  # smoke
    python bench/tradeoff.py --methods film,float --out bench/out/film-float

On CUDA (``--device``, default: CUDA when available) the data stays on the GPU as uint8 and
is augmented a batch at a time there (``--resident-data``). ``bench/device/run.sh`` runs
every model as its own process on one GPU, with epochs sized from timed steps (``--plan``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import Normalize

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import oat_plugins  # noqa: E402
from oat_plugins._io import atomic_torch_save, atomic_write_text  # noqa: E402
from oat_plugins.data import (  # noqa: E402
    CIFAR10_MEAN,
    CIFAR10_STD,
    DeviceImageDataset,
    TensorImageDataset,
    load_dataset,
    train_transform,
)
from oat_plugins.evaluate import SweepResult, evaluate, plot_tradeoff  # noqa: E402
from oat_plugins.exported import EXPORT_FORMAT, EXPORT_VERSION, from_exported  # noqa: E402
from oat_plugins.train import TrainConfig, fit, make_attack  # noqa: E402

logger = logging.getLogger("bench.tradeoff")

DEFAULT_TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
DATA_CACHE = ROOT / "bench" / "data"
BASELINES = ("standard", "pgd-at")


# -- data ------------------------------------------------------------------------------------
def _extract(tarball: Path) -> Path:
    """Extract ``tarball`` once into ``bench/data/<name>/`` (cached; atomic rename)."""
    name = tarball.name.removesuffix(".tar.gz").removesuffix(".tgz")
    target = DATA_CACHE / name
    if (target / ".complete").is_file():
        return target
    DATA_CACHE.mkdir(parents=True, exist_ok=True)
    logger.info("extracting %s into %s (once)", tarball, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=DATA_CACHE))
    try:
        with tarfile.open(tarball) as archive:
            archive.extractall(tmp, filter="data")
        (tmp / ".complete").touch()
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        os.chmod(target, 0o755)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _decode_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All images of ``root/split`` (ImageFolder layout) as uint8 (N, 3, 32, 32), decoded once
    by the library's in-memory loader and cached beside the data for the next runs."""
    cache = root / f".{split}-uint8.pt"
    if cache.is_file():
        payload = torch.load(cache, weights_only=True)
        return payload["images"], payload["labels"], list(payload["classes"])
    logger.info("decoding the %s images of %s (once)", split, root)
    decoded = load_dataset(os.fspath(root), split, augment=False, in_memory=True)
    images, labels, classes = decoded.images, decoded.labels, list(decoded.classes)
    atomic_torch_save({"images": images, "labels": labels, "classes": classes}, cache)
    return images, labels, classes


def load_data(spec: str, n_train: int | None = None, seed: int = 0,
              device: torch.device | None = None) -> tuple[Dataset, Dataset, str]:
    """(train with augmentation, test, description) for ``bundled``, a CIFAR-10 JPEG
    tarball, or an extracted ImageFolder directory with train/ and test/; with ``n_train``,
    a seeded random subset of that many training images (the same for every model). With
    ``device``, both sets are held there as uint8 and augmented a batch at a time
    (:class:`~oat_plugins.data.DeviceImageDataset`); else per sample on the CPU."""
    train, test, described = _load_splits(spec)
    keep = None
    if n_train is not None and n_train < len(train):
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(train), generator=generator)[:n_train]
        described = f"{described}, of which a seeded subset of {n_train:,} train images"
    if device is not None:
        images, labels = train.images, train.labels
        if keep is not None:
            images, labels = images[keep], labels[keep]
        return (DeviceImageDataset(images, labels, device=device, augment=True,
                                   classes=train.classes),
                DeviceImageDataset(test.images, test.labels, device=device,
                                   classes=test.classes), described)
    return train if keep is None else Subset(train, keep.tolist()), test, described


def _load_splits(spec: str) -> tuple[Dataset, Dataset, str]:
    if spec == "bundled":
        return (load_dataset("bundled", "train"), load_dataset("bundled", "test"),
                "bundled CIFAR-10 sample (4,000 train / 1,000 test)")
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--data {spec!r} does not exist (expected 'bundled', the "
                                "cifar10-jpeg.tar.gz tarball or its extracted directory)")
    root = _extract(path) if path.is_file() else path
    images, labels, classes = _decode_split(root, "train")
    test_images, test_labels, _ = _decode_split(root, "test")
    train = TensorImageDataset(images, labels, train_transform(32), classes=tuple(classes))
    test = TensorImageDataset(test_images, test_labels, classes=tuple(classes))
    return train, test, f"{root.name} ({len(train):,} train / {len(test):,} test)"


# -- plain baselines -------------------------------------------------------------------------
def train_plain(model: nn.Module, train_data: Dataset, config: TrainConfig,
                adversarial: bool) -> dict[str, Any]:
    """The plain backbone with fit's recipe: SGD (lr, momentum, weight decay), per-step
    schedule, same batches, same attack (built by ``oat_plugins.train.make_attack``).
    Standard training minimises CE(x); PGD-AT minimises CE(x_adv) (attack in eval mode).
    Runs on ``config.device`` (set by :func:`_config`)."""
    device = torch.device(config.device)
    model.to(device)
    steps_per_epoch = len(train_data) // config.batch_size
    total = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay, nesterov=config.nesterov)
    horizon = config.epochs * steps_per_epoch

    def factor(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, horizon) / horizon))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor if config.schedule == "cosine"
                                              else (lambda _: 1.0))
    attack = make_attack(model, config) if adversarial else None
    generator = torch.Generator().manual_seed(config.seed)
    step, correct, seen = 0, 0.0, 0
    model.train()
    for _epoch in range(config.epochs):
        loader = DataLoader(train_data, batch_size=config.batch_size, shuffle=True,
                            drop_last=True, generator=generator,
                            num_workers=config.num_workers)
        for x, y in loader:
            if step >= total:
                break
            x, y = x.to(device), y.to(device)
            if attack is not None:
                x = attack(x, y).detach()  # torchattacks: eval mode inside, train mode after
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            correct += float((logits.argmax(1) == y).sum())
            seen += y.numel()
        logger.info("%s epoch %d: train acc %.3f", "PGD-AT" if adversarial else "standard",
                    _epoch + 1, correct / max(seen, 1))
        correct, seen = 0.0, 0
        if step >= total:
            break
    model.eval()
    return {"global_step": step}


def _plain_payload(model: nn.Sequential, spec: dict[str, Any], name: str) -> dict[str, Any]:
    mean, std = model[0].mean, model[0].std
    return {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION,
            "oat_plugins_version": oat_plugins.__version__, "backbone": spec,
            "normalize": {"mean": list(mean), "std": list(std)}, "lam": None, "method": name,
            "state_dict": {k: v.detach().cpu() for k, v in model[1].state_dict().items()}}


# -- the benchmark ---------------------------------------------------------------------------
def _device(args: argparse.Namespace) -> torch.device:
    """``--device``, by default CUDA when available, else the CPU."""
    if args.device is not None:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _config(args: argparse.Namespace) -> TrainConfig:
    lambdas = args.train_lambdas
    if lambdas is None and args.clean_fraction is not None:
        lambdas = [0.0, 0.1, 0.2, 0.3, 0.4, 1.0]  # OAT's set, with another clean share
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       attack=args.train_attack, steps=args.train_steps, seed=args.seed,
                       max_steps=args.max_steps, eval_adversarial=False,
                       lambdas=None if lambdas is None else tuple(lambdas),
                       clean_fraction=args.clean_fraction, device=str(_device(args)),
                       eval_max_samples=500, progress=not args.no_progress)


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = dict(args.model_kwargs)
    kwargs.setdefault("num_classes", 10)
    if "channels" in kwargs:
        kwargs["channels"] = tuple(kwargs["channels"])
    return kwargs


def _fingerprint(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """What a cached model was trained with; a mismatch means it cannot be reused."""
    config = dataclasses.asdict(_config(args))
    for key in ("progress", "eval_max_samples", "eval_adversarial", "device"):
        config.pop(key, None)
    return json.loads(json.dumps({"kind": kind, "model": args.model,
                                  "model_kwargs": _model_kwargs(args), "data": args.data,
                                  "n_train": args.n_train, "config": config}))


def _cached(run_dir: Path, args: argparse.Namespace, kind: str) -> float | None:
    """Training seconds of a reusable cached run, None when there is none."""
    if args.retrain or not (run_dir / "model.pt").is_file():
        return None
    info = json.loads((run_dir / "time.json").read_text())
    if info.get("fingerprint") != _fingerprint(args, kind):
        raise SystemExit(f"{run_dir} holds a model trained with other settings; pass "
                         "--retrain or another --out")
    logger.info("reusing %s", run_dir / "model.pt")
    return float(info["train_seconds"])


def _record(run_dir: Path, args: argparse.Namespace, kind: str, seconds: float) -> None:
    atomic_write_text(json.dumps({"train_seconds": seconds,
                                  "fingerprint": _fingerprint(args, kind)}),
                      run_dir / "time.json")


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``'floats:density=0.2'`` → ``('floats', {'density': 0.2})`` (values parsed as JSON
    when they are JSON, else kept as strings)."""
    name, *pairs = spec.split(":")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"method option {pair!r} in {spec!r} is not key=value")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def _conditional_model(spec: str, args: argparse.Namespace) -> oat_plugins.ConditionalModel:
    """The seeded, untrained model of ``spec`` (``name[:key=value...]``)."""
    method, options = parse_method(spec)
    kwargs = _model_kwargs(args)
    torch.manual_seed(args.seed)
    return oat_plugins.wrap(timm.create_model(args.model, **kwargs), method,
                            normalize=(CIFAR10_MEAN, CIFAR10_STD), model_kwargs=kwargs,
                            **options)


def _plain_model(args: argparse.Namespace) -> nn.Sequential:
    """The seeded, untrained plain backbone behind its input normalisation."""
    kwargs = _model_kwargs(args)
    torch.manual_seed(args.seed)
    return nn.Sequential(Normalize(CIFAR10_MEAN, CIFAR10_STD),
                         timm.create_model(args.model, **kwargs))


def run_method(spec: str, args, train, test, out: Path) -> tuple[SweepResult, float]:
    """Train the method of ``spec`` (``name[:key=value...]``) once (or reuse its model.pt)
    and sweep λ."""
    run_dir = out / spec.replace(":", "-").replace("=", "")
    seconds = _cached(run_dir, args, spec)
    fresh = seconds is None
    if seconds is not None:
        model = oat_plugins.load(run_dir / "model.pt")
    else:
        if args.retrain and run_dir.exists():
            shutil.rmtree(run_dir)
        model = _conditional_model(spec, args)
        start = time.perf_counter()
        fit(model, train, _config(args), run_dir, resume=True, eval_data=test)
        seconds = time.perf_counter() - start
        oat_plugins.save(model, run_dir / "model.pt")
        _record(run_dir, args, spec, seconds)
    return _sweep(model, run_dir, args, test, args.lambdas, retrained=fresh), seconds


def _sweep(model: nn.Module, run_dir: Path, args: argparse.Namespace, test: Dataset,
           lambdas: list[float] | None, retrained: bool) -> SweepResult:
    """Evaluate ``model`` (or reuse ``run_dir/sweep.json`` made with the same evaluation
    settings for the same trained model): a combined table re-evaluates nothing."""
    key = {"lambdas": lambdas, "attack": args.attack, "steps": args.steps,
           "n_examples": args.n_examples, "seed": args.seed}
    if args.eval_batch_size != 128:  # the batches seed the random starts; 128 as before
        key["batch_size"] = args.eval_batch_size
    path, key_path = run_dir / "sweep.json", run_dir / "sweep_key.json"
    if (not retrained and path.is_file() and key_path.is_file()
            and json.loads(key_path.read_text()) == key):
        logger.info("reusing %s", path)
        return SweepResult.from_json(path)
    result = evaluate(model, test, lambdas, attack=args.attack, steps=args.steps,
                      n_examples=args.n_examples, subset_seed=0, seed=args.seed,
                      batch_size=args.eval_batch_size, device=_device(args),
                      progress=not args.no_progress)
    result.to_json(path)
    atomic_write_text(json.dumps(key), key_path)
    return result


def run_baseline(name: str, args, train, test, out: Path) -> tuple[SweepResult, float]:
    """Train the plain backbone (standard or PGD-AT) with the same recipe and evaluate it."""
    run_dir = out / name
    path = run_dir / "model.pt"
    seconds = _cached(run_dir, args, name)
    fresh = seconds is None
    if seconds is not None:
        model = from_exported(torch.load(path, weights_only=True), source=repr(str(path)))
    else:
        model = _plain_model(args)
        start = time.perf_counter()
        train_plain(model, train, _config(args), adversarial=name == "pgd-at")
        seconds = time.perf_counter() - start
        spec = {"name": args.model, "kwargs": _model_kwargs(args)}
        atomic_torch_save(_plain_payload(model, spec, name), path)
        _record(run_dir, args, name, seconds)
    return _sweep(model, run_dir, args, test, None, retrained=fresh), seconds


# -- a budget sized from timed steps (bench/device/stage_a.py) ---------------------------------
CALIBRATION_WARMUP = 3  # steps before the timed ones (first-call set-up, allocator, kernels)
PLAN_KEYS = ("epochs", "train_attack", "train_steps")


def _calibration_config(args: argparse.Namespace, train: Dataset, steps: int) -> TrainConfig:
    """The run's config, stopping after ``steps`` steps (enough epochs to reach them)."""
    per_epoch = max(len(train) // args.batch_size, 1)
    return dataclasses.replace(_config(args), max_steps=steps, progress=False, log_every=0,
                               epochs=max(args.epochs, -(-steps // per_epoch)))


def _time_method(spec: str, args: argparse.Namespace, train: Dataset) -> float:
    model = _conditional_model(spec, args)
    steps = CALIBRATION_WARMUP + args.calibrate_steps
    with tempfile.TemporaryDirectory() as tmp:
        fit(model, train, _calibration_config(args, train, CALIBRATION_WARMUP), tmp)
        start = time.perf_counter()
        fit(model, train, _calibration_config(args, train, steps), tmp, resume=True)
        return (time.perf_counter() - start) / args.calibrate_steps


def _time_baseline(name: str, args: argparse.Namespace, train: Dataset) -> float:
    model, adversarial = _plain_model(args), name == "pgd-at"
    train_plain(model, train, _calibration_config(args, train, CALIBRATION_WARMUP), adversarial)
    start = time.perf_counter()
    train_plain(model, train, _calibration_config(args, train, args.calibrate_steps),
                adversarial)
    return (time.perf_counter() - start) / args.calibrate_steps


def calibrate(methods: list[str], baselines: list[str], args: argparse.Namespace,
              train: Dataset, out: Path) -> dict[str, Any]:
    """Seconds per optimizer step of each run of this process, timed over
    ``--calibrate-steps`` steps (after warm-up steps) on a throwaway model while the other
    processes of a parallel bench do the same; written to ``out/calibration.json``, from
    which ``bench/device/stage_a.py`` sizes the epochs of every run."""
    seconds = {m: _time_method(m, args, train) for m in methods}
    seconds.update({b: _time_baseline(b, args, train) for b in baselines})
    payload = {"seconds_per_step": seconds, "steps_per_epoch": len(train) // args.batch_size,
               "train_attack": args.train_attack, "train_steps": args.train_steps}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(payload, indent=2), out / "calibration.json")
    logger.info("calibration: %s", payload)
    return payload


def follow_plan(path: Path, wait_s: float, args: argparse.Namespace) -> dict[str, Any]:
    """Wait up to ``wait_s`` seconds for the JSON plan at ``path`` and apply its
    ``PLAN_KEYS`` (epochs, training attack and its steps) to ``args``."""
    deadline = time.monotonic() + wait_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise SystemExit(f"no plan at {path} after {wait_s:.0f} s")
        time.sleep(0.5)
    plan = json.loads(path.read_text())
    for key in PLAN_KEYS:
        if key in plan:
            setattr(args, key, plan[key])
    logger.info("plan: %s", plan)
    return plan


def markdown_table(results: dict[str, tuple[SweepResult, float]]) -> str:
    lines = ["| model | λ | clean acc (%) | robust acc (%) | train time (min) |",
             "|---|---|---|---|---|"]
    for name, (result, seconds) in results.items():
        for row in result:
            lam = "–" if row.lam is None else f"{row.lam:g}"
            lines.append(f"| {name} | {lam} | {100 * row.clean_acc:.1f} | "
                         f"{100 * row.robust_acc:.1f} | {seconds / 60:.1f} |")
    return "\n".join(lines)


def write_report(results: dict[str, tuple[SweepResult, float]], out: Path, setting: str,
                 title: str, total_seconds: float, extra: dict[str, Any]) -> None:
    """``out/tradeoff.md`` (setting and table), ``out/results.json`` (setting, ``extra``,
    every sweep with its train seconds) and ``out/tradeoff.png`` (conditional models as
    curves, plain ones as points)."""
    curves = {name: r for name, (r, _) in results.items() if r.rows[0].lam is not None}
    refs = {name: (r.rows[0].clean_acc, r.rows[0].robust_acc)
            for name, (r, _) in results.items() if name not in curves}
    plot_tradeoff(curves, out / "tradeoff.png", references=refs, title=title)
    dials = "".join(f"- {name}: {r.dial().summary()}\n" for name, r in curves.items()
                    if r.is_sweep)
    atomic_write_text(f"{setting}\n\n{markdown_table(results)}\n\n{dials}\ntotal wall time "
                      f"{total_seconds / 60:.1f} min\n", out / "tradeoff.md")
    atomic_write_text(json.dumps({
        "setting": setting, **extra, "total_seconds": total_seconds,
        "results": {name: {"train_seconds": s, **r.to_dict()}
                    for name, (r, s) in results.items()}}, indent=2, ensure_ascii=False),
        out / "results.json")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def setting_parser(doc: str, *, train_attack: str = "fgsm-rs", train_steps: int = 1,
                   train_attack_help: str = "pgd or fgsm-rs") -> argparse.ArgumentParser:
    """A bench script's parser, opened with the data, backbone and training arguments every
    bench of this setting shares (§2 of bench/RESULTS.md: the narrow resnet10t on CIFAR-10
    JPEG, SGD with a cosine schedule, one training attack)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_TARBALL),
                   help="'bundled', the CIFAR-10 JPEG tarball, or its extracted directory")
    p.add_argument("--model", default="resnet10t", help="timm backbone")
    p.add_argument("--model-kwargs", type=json.loads,
                   default={"channels": [32, 64, 128, 256]}, metavar="JSON",
                   help="timm.create_model kwargs")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=None,
                   help="cap on optimizer steps per run (smoke runs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--train-attack", default=train_attack, help=train_attack_help)
    p.add_argument("--train-steps", type=int, default=train_steps,
                   help="training attack iterations")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = setting_parser(__doc__)
    p.add_argument("--methods", default="film",
                   help="comma-separated conditional methods, each trained once; options as "
                        "name:key=value[:key=value], e.g. floats:density=0.2")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help=f"comma-separated plain baselines among {', '.join(BASELINES)} "
                   "('' for none)")
    p.add_argument("--n-train", type=int, default=None,
                   help="train on a seeded random subset of this many images (screening "
                   "runs; default: the whole training set)")
    p.add_argument("--train-lambdas", default=None, type=_floats,
                   help="training λ set of the conditional methods (default: each method's "
                   "own sampler, OAT's {0,.1,.2,.3,.4,1} for film)")
    p.add_argument("--clean-fraction", type=float, default=None,
                   help="share of each batch at λ = 0 (default: the sampler's, 1/6 for film)")
    p.add_argument("--lambdas", default="0,0.2,0.4,0.6,0.8,1",
                   type=_floats, help="λ sweep")
    p.add_argument("--attack", default="pgd", help="evaluation attack")
    p.add_argument("--steps", type=int, default=20, help="evaluation attack iterations")
    p.add_argument("--n-examples", type=int, default=1000,
                   help="test images (a seeded random subset, the same for every model)")
    p.add_argument("--eval-batch-size", type=int, default=128,
                   help="evaluation batch (its index seeds the attack's random start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:<index> (default: cuda when available)")
    p.add_argument("--resident-data", action=argparse.BooleanOptionalAction, default=None,
                   help="hold the data on --device as uint8 and augment it a batch at a time "
                   "there (default: on for CUDA)")
    p.add_argument("--plan", default=None, metavar="JSON",
                   help="first time --calibrate-steps steps of each run into "
                   "--out/calibration.json, then wait for this file and take epochs, "
                   "train attack and train steps from it (bench/device/stage_a.py)")
    p.add_argument("--calibrate-steps", type=int, default=20)
    p.add_argument("--plan-wait", type=float, default=120.0,
                   help="seconds to wait for --plan")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "tradeoff"))
    p.add_argument("--retrain", action="store_true", help="ignore cached models")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    methods = [m for m in args.methods.split(",") if m]
    baselines = [b for b in args.baselines.split(",") if b]
    for m in methods:
        name, options = parse_method(m)
        try:  # a bad method or option fails before training
            oat_plugins.get_method(name)(**options)
        except (ValueError, TypeError) as error:
            raise SystemExit(f"--methods {m!r}: {error}") from None
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise SystemExit(f"unknown baselines {unknown}; choose among {BASELINES}")
    out = Path(args.out)
    started = time.perf_counter()
    device = _device(args)
    resident = device.type == "cuda" if args.resident_data is None else args.resident_data
    train, test, described = load_data(args.data, args.n_train, args.seed,
                                       device if resident else None)
    if args.plan is not None:
        calibrate(methods, baselines, args, train, out)
        if follow_plan(Path(args.plan), args.plan_wait, args).get("epochs", 1) < 1:
            logger.warning("the plan leaves no time to train: stopping")
            return 3
    results: dict[str, tuple[SweepResult, float]] = {}
    for m in methods:
        results[m] = run_method(m, args, train, test, out)
    for b in baselines:
        results[{"standard": "standard (plain)", "pgd-at": "PGD-AT (plain)"}[b]] = \
            run_baseline(b, args, train, test, out)
    attack = next(iter(results.values()))[0].meta["attack"]
    table = markdown_table(results)
    cfg = _config(args)
    setting = (f"{args.model} {json.dumps(args.model_kwargs)} on {described}; training "
               f"{cfg.epochs} epoch(s), batch {cfg.batch_size}, SGD lr {cfg.lr} cosine, "
               f"{cfg.attack} ({cfg.steps} step(s)) at ε=8/255"
               + (f", training λ {list(cfg.lambdas)} with clean fraction "
                  f"{cfg.clean_fraction if cfg.clean_fraction is not None else 'default'}"
                  if cfg.lambdas else ", each method's default λ sampler")
               + (f", max {cfg.max_steps} steps" if cfg.max_steps else "")
               + f"; evaluation {attack} on {args.n_examples} test images (seeded subset); "
               f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}"
               + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
               + (", data held there, augmented per batch" if resident else ""))
    total = time.perf_counter() - started
    write_report(results, out, setting, f"{args.model}, {attack}", total, {"args": vars(args)})
    print(setting)
    print()
    print(table)
    print(f"\ntotal wall time {total / 60:.1f} min; wrote {out / 'tradeoff.md'}, "
          f"{out / 'results.json'}, {out / 'tradeoff.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
