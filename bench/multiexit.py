#!/usr/bin/env python
"""RDI-Nets (multi-exit, max-average adversarial training) vs the defended backbone (PGD-AT).

Trains, with the recipe and data of ``bench/tradeoff.py`` (whose helpers this imports), a
multi-exit model (``--method``, default ``multiexit``: exits after every stage but the last,
loss Σ_exits 0.5·CE clean + 0.5·CE adversarial, training attack ``--rdi-attack``, default the
reference's max-average PGD) and the plain backbone with PGD-AT, then measures on the same
seeded test images:

- accuracy of input-adaptive inference (the exit the router picks), clean and under
  single-exit PGD at every exit, average-exit, max-average and routing PGD (the routed exit,
  re-routed every step) and the slowdown attack; a sample counts as robust when it is
  classified correctly both clean and under the attack (as ``oat_plugins.evaluate``);
  "all" is the share robust under every attack at once;
- compute at each ``--budgets`` mean-MAC target (fraction of the backbone's MACs, heads
  evaluated and rejected included): thresholds calibrated on ``--n-held-out`` images of the
  TRAIN split kept out of training (never the test split); mean MACs and exit shares on clean
  test images and under the slowdown attack, and wall-clock per image of ``model(x)``
  (early stopping) against the backbone's.

Adversarial examples of the attacks that do not read the router are made once and routed at
every budget; routing PGD is rerun at each budget. Results are written after every stage to
``--out/results.json`` and ``--out/multiexit.md``; trained models are cached in ``--out``.

    python bench/multiexit.py --device cuda                              # the shared budget
    python bench/multiexit.py --data bundled --n-train 256 --n-held-out 128 --epochs 1 \\
        --n-examples 64 --steps 2 --train-steps 1 --device cpu                 # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchattacks
from torch import nn
from torch.utils.data import Dataset, Subset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tradeoff import (  # noqa: E402
    _cached,
    _conditional_model,
    _config,
    _device,
    _floats,
    _model_kwargs,
    _plain_model,
    _plain_payload,
    _record,
    load_data,
    setting_parser,
    train_plain,
)

import oat_plugins  # noqa: E402
from oat_plugins._io import atomic_torch_save, atomic_write_text  # noqa: E402
from oat_plugins.attacks import (  # noqa: E402
    AverageExitPGD,
    MaxAverageExitPGD,
    RoutingPGD,
    SingleExitPGD,
    SlowdownPGD,
)
from oat_plugins.data import DeviceImageDataset  # noqa: E402
from oat_plugins.exits import cost_summary  # noqa: E402
from oat_plugins.exported import from_exported  # noqa: E402
from oat_plugins.train import fit  # noqa: E402

logger = logging.getLogger("bench.multiexit")



# -- data ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Data:
    """The training images, the held-out part of the train split (calibration only, not
    augmented), and the test images and labels, all on the run's device."""

    train: Dataset
    held_out: DeviceImageDataset
    x_test: torch.Tensor
    y_test: torch.Tensor
    described: str


def load_split(args: argparse.Namespace, device: torch.device) -> Data:
    """Seeded, disjoint: ``--n-held-out`` train images for calibration, up to ``--n-train``
    of the rest for training; ``--n-examples`` seeded test images."""
    train_all, test, described = load_data(args.data, None, args.seed, device=device)
    order = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(args.seed))
    held = order[: args.n_held_out].to(device)
    rest = order[args.n_held_out:]
    train_idx = rest if args.n_train is None else rest[: args.n_train]
    held_out = DeviceImageDataset(train_all.images[held], train_all.labels[held])
    test_order = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))
    x_test, y_test = test.batch(test_order[: args.n_examples].to(device))
    return Data(Subset(train_all, train_idx.tolist()), held_out, x_test, y_test,
                f"{described}; {len(train_idx):,} train images, {args.n_held_out:,} held out "
                f"of the train split for calibration, {len(y_test):,} test images")


# -- training (cached in --out) ----------------------------------------------------------------
def train_rdi(args: argparse.Namespace, data: Data, out: Path
              ) -> tuple[oat_plugins.ConditionalModel, float]:
    """The multi-exit model trained with ``fit`` and the ``--rdi-attack`` (or reused)."""
    run_dir = out / "rdi"
    kind = f"{args.method} attack={args.rdi_attack} held_out={args.n_held_out}"
    seconds = _cached(run_dir, args, kind)
    if seconds is not None:
        return oat_plugins.load(run_dir / "model.pt"), seconds
    if args.retrain and run_dir.exists():
        shutil.rmtree(run_dir)
    model = _conditional_model(args.method, args)
    config = dataclasses.replace(_config(args), attack=args.rdi_attack)
    start = time.perf_counter()
    fit(model, data.train, config, run_dir, resume=True)  # an interrupted run goes on
    seconds = time.perf_counter() - start
    oat_plugins.save(model, run_dir / "model.pt")
    _record(run_dir, args, kind, seconds)
    return model, seconds


def train_pgd_at(args: argparse.Namespace, data: Data, out: Path) -> tuple[nn.Module, float]:
    """The plain backbone trained with PGD-AT (``--train-attack``), same recipe (or reused)."""
    run_dir = out / "pgd-at"
    kind = f"pgd-at held_out={args.n_held_out}"
    seconds = _cached(run_dir, args, kind)
    if seconds is not None:
        payload = torch.load(run_dir / "model.pt", weights_only=True)
        return from_exported(payload, source=str(run_dir / "model.pt")), seconds
    model = _plain_model(args)
    start = time.perf_counter()
    train_plain(model, data.train, _config(args), adversarial=True)
    seconds = time.perf_counter() - start
    spec = {"name": args.model, "kwargs": _model_kwargs(args)}
    atomic_torch_save(_plain_payload(model, spec, "pgd-at"), run_dir / "model.pt")
    _record(run_dir, args, kind, seconds)
    return model, seconds


# -- attacks and measurements ------------------------------------------------------------------
def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def adversarial(make: Callable[[], torchattacks.attack.Attack], x: torch.Tensor,
                y: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """The attack's adversarial examples of (x, y), batch by batch, each batch's random start
    seeded by its index (the same for every model and attack)."""
    attack = make()
    out = torch.empty_like(x)
    for index, part in enumerate(_batches(len(x), args.eval_batch_size)):
        torch.manual_seed(args.seed * 1_000_003 + index)
        out[part] = attack(x[part], y[part])
    return out


@torch.no_grad()
def exit_logits(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """(E, N, C): every exit's logits of ``x``."""
    model.eval()
    return torch.cat([torch.stack(model.exit_logits(x[p])) for p in _batches(len(x), batch)], 1)


def routed(model: oat_plugins.ConditionalModel, logits: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, exit index) of input-adaptive inference at the current thresholds."""
    exits = model.route(list(logits))
    return logits[exits, torch.arange(logits.shape[1], device=logits.device)].argmax(1), exits


def mac_summary(model: oat_plugins.ConditionalModel, exits: torch.Tensor,
                size: torch.Size) -> dict[str, Any]:
    """Mean MACs (fraction of the backbone's, rejected heads counted) and exit shares of
    samples of image ``size`` leaving at ``exits``."""
    summary = cost_summary(model.mac_table(size), exits, model.exit_thresholds)
    return {"mac_fraction": summary["fraction"], "exit_shares": summary["exit_shares"]}


def ms_per_image(model: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> float:
    """Median over ``--timing-repeats`` of the milliseconds per image of ``model(x)`` in
    batches of ``--timing-batch`` (after one warm-up pass)."""
    model.eval()
    parts = _batches(len(x), args.timing_batch)

    def one_pass() -> float:
        _sync(x.device)
        start = time.perf_counter()
        with torch.no_grad():
            for p in parts:
                model(x[p])
        _sync(x.device)
        return 1000 * (time.perf_counter() - start) / len(x)

    one_pass()
    return statistics.median(one_pass() for _ in range(args.timing_repeats))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pgd_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    alpha = args.alpha if args.alpha is not None else 2.5 * args.eps / args.steps
    return {"eps": args.eps, "alpha": alpha, "steps": args.steps, "random_start": True}


def fixed_attacks(model: nn.Module, n_exits: int, args: argparse.Namespace
                  ) -> dict[str, Callable[[], torchattacks.attack.Attack]]:
    """The attacks whose examples do not depend on the router's thresholds."""
    kw = _pgd_kwargs(args)
    attacks: dict[str, Callable[[], torchattacks.attack.Attack]] = {
        f"single-exit {k}": (lambda k=k: SingleExitPGD(model, exit=k, **kw))
        for k in range(n_exits)}
    attacks["average"] = lambda: AverageExitPGD(model, **kw)
    attacks["max-average"] = lambda: MaxAverageExitPGD(model, **kw)
    attacks["slowdown"] = lambda: SlowdownPGD(model, **kw)
    return attacks


# -- the evaluation ----------------------------------------------------------------------------
def evaluate_rdi(model: oat_plugins.ConditionalModel, data: Data, args: argparse.Namespace,
                 report: Callable[[str, Any], None]) -> None:
    """Calibrate on the held-out train images, attack, and measure at every budget."""
    x, y = data.x_test, data.y_test
    clean = exit_logits(model, x, args.eval_batch_size)
    n_exits = clean.shape[0]
    attacked: dict[str, torch.Tensor] = {}
    for name, make in fixed_attacks(model, n_exits, args).items():
        start = time.perf_counter()
        images = adversarial(make, x, y, args)
        attacked[name] = exit_logits(model, images, args.eval_batch_size)
        if name == "slowdown":  # timed again at every budget
            slowdown_images = images
        logger.info("%s: %.1f s", name, time.perf_counter() - start)
    report("per_exit", per_exit_accuracy(clean, attacked, y))
    # Every sample at the backbone's head (early heads skipped); keeps the held-out statistics
    # that set_exit_budget picks the thresholds of each budget from.
    chosen = model.calibrate(data.held_out, shares=[0.0] * (n_exits - 1) + [1.0])
    for budget in [None, *args.budgets]:
        try:
            chosen = chosen if budget is None else model.set_exit_budget(budget)
        except ValueError as error:  # below the cheapest routing: say so, go on
            report(f"budget {budget:g}", {"error": str(error)})
            continue
        row = measure_budget(model, clean, attacked, slowdown_images, data, args)
        report("no early exit" if budget is None else f"budget {budget:g}",
               {"thresholds": chosen["thresholds"],
                "held_out_mac_fraction": chosen["mean_fraction"], **row})


def measure_budget(model: oat_plugins.ConditionalModel, clean: torch.Tensor,
                   attacked: dict[str, torch.Tensor], slowdown_images: torch.Tensor,
                   data: Data, args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy (clean, under every attack, under all at once), MACs and wall-clock (clean
    and slowdown images) at the thresholds the model holds."""
    x, y = data.x_test, data.y_test
    attacked = dict(attacked)
    attacked["routing"] = exit_logits(
        model, adversarial(lambda: RoutingPGD(model, **_pgd_kwargs(args)), x, y, args),
        args.eval_batch_size)
    clean_pred, clean_exits = routed(model, clean)
    ok = clean_pred == y
    robust, every = {}, ok.clone()
    for name, logits in attacked.items():
        still = ok & (routed(model, logits)[0] == y)
        robust[name] = float(still.float().mean())
        every &= still
    slow_exits = routed(model, attacked["slowdown"])[1]
    return {"clean_acc": float(ok.float().mean()), "robust_acc": robust,
            "robust_acc_all": float(every.float().mean()),
            "clean_cost": mac_summary(model, clean_exits, x.shape[1:]),
            "slowdown_cost": mac_summary(model, slow_exits, x.shape[1:]),
            "ms_per_image": ms_per_image(model, x, args),
            "ms_per_image_slowdown": ms_per_image(model, slowdown_images, args)}


def per_exit_accuracy(clean: torch.Tensor, attacked: dict[str, torch.Tensor],
                      y: torch.Tensor) -> list[dict[str, float]]:
    """Each exit's own accuracy: clean, and under the single-exit attack on it."""
    return [{"clean_acc": float((clean[k].argmax(1) == y).float().mean()),
             "robust_acc": float(((clean[k].argmax(1) == y)
                                  & (attacked[f"single-exit {k}"][k].argmax(1) == y))
                                 .float().mean())}
            for k in range(clean.shape[0])]


def evaluate_pgd_at(model: nn.Module, data: Data, args: argparse.Namespace) -> dict[str, Any]:
    """Clean and PGD accuracy (its only exit: every multi-exit attack is this PGD) and
    wall-clock per image of the defended backbone."""
    x, y = data.x_test, data.y_test
    model.eval()
    adv = adversarial(lambda: torchattacks.PGD(model, **_pgd_kwargs(args)), x, y, args)
    with torch.no_grad():
        ok = torch.cat([model(x[p]).argmax(1) == y[p]
                        for p in _batches(len(x), args.eval_batch_size)])
        still = ok & torch.cat([model(adv[p]).argmax(1) == y[p]
                                for p in _batches(len(x), args.eval_batch_size)])
    return {"clean_acc": float(ok.float().mean()), "pgd_acc": float(still.float().mean()),
            "mac_fraction": 1.0, "ms_per_image": ms_per_image(model, x, args)}


# -- the report --------------------------------------------------------------------------------
def markdown(results: dict[str, Any]) -> str:
    """The setting, an accuracy table and a compute table from what has been measured."""
    rdi = results.get("rdi", {})
    base = results.get("pgd_at", {})
    budgets = {k: v for k, v in rdi.items()
               if (k == "no early exit" or k.startswith("budget ")) and "error" not in v}
    attacks = next((list(v["robust_acc"]) for v in budgets.values()), [])
    lines = [results["setting"], ""]
    head = ["model", "clean", *attacks, "all attacks"]
    lines += ["Accuracy (%), routed exit; a robust sample is correct clean and attacked:", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in budgets.items():
        cells = [f"RDI {name}", _pct(row["clean_acc"]),
                 *(_pct(row["robust_acc"][a]) for a in attacks), _pct(row["robust_acc_all"])]
        lines.append("| " + " | ".join(cells) + " |")
    if "pgd_acc" in base:
        cells = ["PGD-AT (plain)", _pct(base["clean_acc"]),
                 *([_pct(base["pgd_acc"])] * len(attacks)), _pct(base["pgd_acc"])]
        lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"PGD-AT has one exit: each of its columns is PGD-{results['args']['steps']}"
                  " on it."]
    lines += ["", "Compute on the test images (MACs: fraction of the backbone's, rejected heads "
              "counted; ms per image of model(x)):", "",
              "| model | MACs clean | exit shares clean | MACs slowdown | exit shares slowdown "
              "| ms/img clean | ms/img slowdown |", "|---|---|---|---|---|---|---|"]
    for name, row in budgets.items():
        c, s = row["clean_cost"], row["slowdown_cost"]
        lines.append(f"| RDI {name} | {c['mac_fraction']:.3f} | {_shares(c)} | "
                     f"{s['mac_fraction']:.3f} | {_shares(s)} | {row['ms_per_image']:.3f} | "
                     f"{row['ms_per_image_slowdown']:.3f} |")
    if "ms_per_image" in base:
        lines.append(f"| PGD-AT (plain) | 1.000 | – | 1.000 | – | {base['ms_per_image']:.3f} "
                     "| – |")
    return "\n".join(lines) + "\n"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _shares(cost: dict[str, Any]) -> str:
    return " / ".join(f"{100 * s:.0f}" for s in cost["exit_shares"])


class Report:
    """Results written to ``out/results.json`` and ``out/multiexit.md`` after every entry."""

    def __init__(self, out: Path, setting: str, args: argparse.Namespace) -> None:
        self.out = out
        self.results: dict[str, Any] = {"setting": setting, "args": vars(args)}

    def section(self, name: str) -> Callable[[str, Any], None]:
        """``report(key, value)`` for the section ``name``."""
        def report(key: str, value: Any) -> None:
            self.results.setdefault(name, {})[key] = value
            self.write()
        return report

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(self.results, indent=2, ensure_ascii=False),
                          self.out / "results.json")
        atomic_write_text(markdown(self.results), self.out / "multiexit.md")


# -- main --------------------------------------------------------------------------------------
def build_parser(doc: str = __doc__) -> argparse.ArgumentParser:
    """This bench's arguments (bench/knobs.py adds its own to them)."""
    p = setting_parser(doc, train_attack="pgd", train_steps=3,
                       train_attack_help="PGD-AT's training attack")
    p.add_argument("--method", default="multiexit",
                   help="the multi-exit model, name[:key=value], e.g. multiexit:exits=[1,2]")
    p.add_argument("--n-train", type=int, default=None,
                   help="train on at most this many images (default: all but the held-out)")
    p.add_argument("--n-held-out", type=int, default=5000,
                   help="train-split images kept out of training to calibrate the exits")
    p.add_argument("--rdi-attack", default="max-average-exit-pgd",
                   help="the multi-exit model's training attack (--train-steps iterations)")
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--steps", type=int, default=20, help="evaluation attack iterations")
    p.add_argument("--alpha", type=float, default=None,
                   help="evaluation step (default 2.5·eps/steps)")
    p.add_argument("--n-examples", type=int, default=1000, help="seeded test images")
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--budgets", type=_floats, default="0.95,0.9,0.85",
                   help="mean-MAC targets (fractions of the backbone's), measured after the "
                   "row with no early exit")
    p.add_argument("--timing-batch", type=int, default=256)
    p.add_argument("--timing-repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:<index>")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "multiexit"))
    p.add_argument("--retrain", action="store_true", help="ignore cached models")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(train_lambdas=None, clean_fraction=None)  # what tradeoff's _config reads
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _setting(args: argparse.Namespace, data: Data, device: torch.device) -> str:
    kw = _pgd_kwargs(args)
    return (f"{args.model} {json.dumps(args.model_kwargs)}, {args.method}; {data.described}; "
            f"{args.epochs} epoch(s), batch {args.batch_size}, SGD lr {args.lr} cosine"
            + (f", max {args.max_steps} steps" if args.max_steps else "")
            + f"; training attacks {args.rdi_attack} (RDI) and {args.train_attack} (PGD-AT), "
            f"{args.train_steps} step(s) at ε={args.eps * 255:.0f}/255; evaluation PGD-"
            f"{args.steps} (α={kw['alpha'] * 255:.2f}/255, seeded random start); timing "
            f"batch {args.timing_batch}; torch {torch.__version__}, {device}"
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = _device(args)
    out = Path(args.out)
    started = time.perf_counter()
    data = load_split(args, device)
    report = Report(out, _setting(args, data, device), args)
    # The cheaper baseline first: a run cut short still has it whole (and fit's checkpoint
    # of the multi-exit model to resume from).
    base, seconds = train_pgd_at(args, data, out)
    report.section("pgd_at")("train_seconds", seconds)
    for key, value in evaluate_pgd_at(base.to(device), data, args).items():
        report.section("pgd_at")(key, value)
    rdi, seconds = train_rdi(args, data, out)
    report.section("rdi")("train_seconds", seconds)
    evaluate_rdi(rdi.to(device), data, args, report.section("rdi"))
    report.section("run")("total_seconds", time.perf_counter() - started)
    print(markdown(report.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
