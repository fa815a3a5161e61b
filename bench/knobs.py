#!/usr/bin/env python
"""One model, three knobs: λ (accuracy ↔ robustness), exit budget (compute) and density
(non-zero weights), all set after training, measured as a surface.

Trains (or reuses, cached in ``--out``) with the recipe and data split of
``bench/multiexit.py`` (whose arguments this takes) a masked conditional model with early
exits, by default ``floats:exits=auto`` (FLOATS at density 0.5, exits after every stage but
the last) trained with the max-average attack. Then, for every density of ``--densities``
(``model.set_density``: the largest weights of the trained mask, nested), every λ of
``--eval-lambdas`` and every exit budget (``--budgets``, after the row with no early exit):

- the exits are calibrated at that density and λ on the held-out TRAIN images (never the test
  split), and the budget's thresholds picked with ``set_exit_budget``;
- on the seeded test images: clean accuracy of input-adaptive inference (the exit the router
  picks) and robust accuracy under routing PGD (the routed exit, re-routed every step; a
  sample is robust when it is correct clean and attacked), mean MACs per image as a fraction
  of the dense backbone's (heads evaluated and rejected counted; dense kernels), exit shares,
  and the non-zero parameters of the exported plain multi-exit model.

The defended backbone of ``bench/multiexit.py`` (the plain model trained with PGD-AT on the
same images, epochs and ``--train-steps``; clean and PGD accuracy with the same attack
settings) is the reference. Writes ``--out/knobs.json`` (every cell), ``knobs.md`` (the
table) and ``knobs.png`` (clean and robust accuracy against mean MACs, one line per density
and λ) after every cell; a rerun with the same settings keeps the cells measured already.

    python bench/knobs.py --method floats:exits=auto --epochs 3 --train-steps 1
    python bench/knobs.py --data bundled --n-train 256 --n-held-out 128 --epochs 1 \\
        --n-examples 64 --steps 2 --train-steps 1 --densities 0.5,0.3 --device cpu   # smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from multiexit import (  # noqa: E402
    Data,
    _pgd_kwargs,
    adversarial,
    build_parser,
    evaluate_pgd_at,
    exit_logits,
    load_split,
    mac_summary,
    routed,
    train_pgd_at,
    train_rdi,
)
from tradeoff import _device, _floats  # noqa: E402

import oat_plugins  # noqa: E402
from oat_plugins._io import atomic_write_bytes, atomic_write_text  # noqa: E402
from oat_plugins.attacks import RoutingPGD  # noqa: E402
from oat_plugins.stats import count_nonzero  # noqa: E402

logger = logging.getLogger("bench.knobs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser(__doc__)
    p.add_argument("--densities", type=_floats, default="0.5,0.35,0.25",
                   help="densities set in situ (at most the trained one)")
    p.add_argument("--eval-lambdas", type=_floats, default="0,0.5,1")
    p.set_defaults(method="floats:exits=auto", out=str(ROOT / "bench" / "out" / "knobs"),
                   budgets=[0.95, 0.9, 0.85])
    return p.parse_args(argv)


def measure_cell(model: oat_plugins.ConditionalModel, data: Data, clean: torch.Tensor,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy clean and under routing PGD, and MACs, at the thresholds the model holds."""
    x, y = data.x_test, data.y_test
    attacked = exit_logits(
        model, adversarial(lambda: RoutingPGD(model, **_pgd_kwargs(args)), x, y, args),
        args.eval_batch_size)
    clean_pred, clean_exits = routed(model, clean)
    ok = clean_pred == y
    robust = ok & (routed(model, attacked)[0] == y)
    return {"clean_acc": float(ok.float().mean()), "robust_acc": float(robust.float().mean()),
            **mac_summary(model, clean_exits, x.shape[1:])}


def measure_setting(model: oat_plugins.ConditionalModel, data: Data, args: argparse.Namespace,
                    record: Any) -> None:
    """Every budget at the model's current density and λ: calibrate, then measure."""
    clean = exit_logits(model, data.x_test, args.eval_batch_size)
    n_exits = clean.shape[0]
    nonzero = count_nonzero(model.export()).nonzero
    model.calibrate(data.held_out, shares=[0.0] * (n_exits - 1) + [1.0])
    for budget in [None, *args.budgets]:
        try:
            if budget is not None:
                model.set_exit_budget(budget)
        except ValueError as error:  # below the cheapest routing: say so, go on
            record(budget, {"error": str(error)})
            continue
        start = time.perf_counter()
        record(budget, {"nonzero_params": nonzero, **measure_cell(model, data, clean, args)})
        logger.info("budget %s: %.1f s", budget, time.perf_counter() - start)


# -- the report --------------------------------------------------------------------------------
def markdown(results: dict[str, Any]) -> str:
    lines = [results["setting"], "",
             "| density | λ | exit budget | clean % | routing PGD % | mean MACs (× dense) "
             "| exit shares % | non-zero params |", "|---|---|---|---|---|---|---|---|"]
    for cell in results["cells"]:
        budget = "none" if cell["budget"] is None else f"{cell['budget']:g}"
        head = f"| {cell['density']:g} | {cell['lam']:g} | {budget} |"
        if "error" in cell:
            lines.append(f"{head} {cell['error']} | | | | |")
            continue
        shares = " / ".join(f"{100 * s:.0f}" for s in cell["exit_shares"])
        lines.append(f"{head} {100 * cell['clean_acc']:.1f} | {100 * cell['robust_acc']:.1f} | "
                     f"{cell['mac_fraction']:.3f} | {shares} | {cell['nonzero_params']:,} |")
    base = results.get("pgd_at")
    if base:
        lines += ["", f"PGD-AT (the plain backbone, same images, epochs and attack steps; "
                  f"{base['train_seconds'] / 60:.1f} min): clean {100 * base['clean_acc']:.1f} %, "
                  f"PGD {100 * base['pgd_acc']:.1f} %, MACs 1.000"]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Clean (left) and robust (right) accuracy against mean MACs; one line per (density,
    λ) over the budgets. Full 0–100 % and 0–1.2 axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    lines: dict[tuple[float, float], list[dict[str, Any]]] = {}
    for cell in results["cells"]:
        if "error" not in cell:
            lines.setdefault((cell["density"], cell["lam"]), []).append(cell)
    densities = sorted({d for d, _ in lines}, reverse=True)
    lams = sorted({lam for _, lam in lines})
    for (density, lam), cells in lines.items():
        cells = sorted(cells, key=lambda c: c["mac_fraction"])
        style = ["-", "--", ":", "-."][densities.index(density) % 4]
        for ax, key in zip(axes, ("clean_acc", "robust_acc"), strict=True):
            ax.plot([c["mac_fraction"] for c in cells], [100 * c[key] for c in cells],
                    style, marker="o", color=f"C{lams.index(lam) % 10}",
                    label=f"density {density:g}, λ={lam:g}")
    base = results.get("pgd_at")
    for ax, key in zip(axes, ("clean_acc", "pgd_acc"), strict=True):
        if base:
            ax.scatter([1.0], [100 * base[key]], marker="*", s=140, color="black", zorder=3,
                       label="PGD-AT (plain)")
    for ax, what in zip(axes, ("clean", "routing PGD"), strict=True):
        ax.set_xlabel("mean MACs per image (fraction of the dense backbone's)")
        ax.set_xlim(0, 1.2)
        ax.set_ylim(0, 100)
        ax.set_title(f"{what} accuracy", fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(buffer.getvalue(), path)


# -- main --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = _device(args)
    out = Path(args.out)
    data = load_split(args, device)
    model, seconds = train_rdi(args, data, out)
    model = model.to(device).eval()
    results: dict[str, Any] = {
        "setting": (f"{args.model} {json.dumps(args.model_kwargs)}, {args.method}; "
                    f"{data.described}; {args.epochs} epoch(s), training attack "
                    f"{args.rdi_attack} ({args.train_steps} step(s)), {seconds / 60:.1f} min; "
                    f"evaluation routing PGD-{args.steps}; torch {torch.__version__}, {device}"),
        "args": vars(args), "train_seconds": seconds, "cells": kept_cells(out, args)}

    def write() -> None:
        atomic_write_text(json.dumps(results, indent=2), out / "knobs.json")
        atomic_write_text(markdown(results), out / "knobs.md")
        plot(results, out / "knobs.png")

    base, base_seconds = train_pgd_at(args, data, out)
    results["pgd_at"] = {"train_seconds": base_seconds,
                         **evaluate_pgd_at(base.to(device), data, args)}
    write()
    for density in args.densities:
        model.set_density(density)
        for lam in args.eval_lambdas:
            if any(c["density"] == density and c["lam"] == lam for c in results["cells"]):
                continue

            def record(budget: float | None, row: dict[str, Any], lam: float = lam,
                       density: float = density) -> None:
                results["cells"].append({"density": density, "lam": lam, "budget": budget,
                                         **row})
                write()

            with model.at(lam):
                measure_setting(model, data, args, record)
    print(markdown(results))
    return 0


_CELL_ARGS = ("densities", "eval_lambdas", "retrain", "no_progress")
"""Arguments that choose which cells to measure, not how: a rerun may change them."""


def kept_cells(out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The cells of an earlier run with the same settings (every budget of a kept density
    and λ), or none."""
    path = out / "knobs.json"
    if args.retrain or not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    now = json.loads(json.dumps(vars(args)))
    if any(earlier["args"].get(k) != v for k, v in now.items() if k not in _CELL_ARGS):
        return []
    return earlier["cells"]


if __name__ == "__main__":
    sys.exit(main())
