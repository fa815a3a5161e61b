#!/usr/bin/env python
"""SMART at a few mask settings vs FLOATS, FLOAT and FiLM at a reduced budget.

Trains each ``--methods`` entry once with ``oat_plugins.train.fit`` on a seeded subset of the
CIFAR-10 training set (same recipe for every model, each method's default λ sampler), then
reports clean and robust accuracy at λ ∈ ``--lambdas``, the non-zero parameters and MACs of
each SMART path and of both together, and training time. Every SMART model is also evaluated
at λ = 0.5 under the other λ rule ('blend' vs 'switch'; the rules agree at λ = 0 and 1, so one
trained model serves both): the measurement behind the default rule.

Data loading, training, caching and evaluation are bench/tradeoff.py's (imported, not
copied). Writes ``--out/smart.md`` and ``results.json``.

    python bench/smart.py                                     # the reduced run of RESULTS.md
    python bench/smart.py --data bundled --train-size 256 --epochs 1 --n-examples 32  # smoke
    python bench/smart.py --merge bench/out/smart-runs   # one table from runs made apart
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import tradeoff  # noqa: E402

import oat_plugins  # noqa: E402
from oat_plugins._io import atomic_write_text  # noqa: E402
from oat_plugins.evaluate import SweepResult, evaluate  # noqa: E402
from oat_plugins.methods.smart import path_costs  # noqa: E402
from oat_plugins.model import from_checkpoint  # noqa: E402
from oat_plugins.stats import count_nonzero  # noqa: E402

logger = logging.getLogger("bench.smart")

DEFAULT_METHODS = ",".join([
    "smart",                                         # prototypes: random, 50 %, disjoint
    "smart:selection=saliency:density=0.368:overlap=0.5",  # 1/2.72 of the weights per path
    "floats:density=0.5", "float", "film",
])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--train-size", type=int, default=10_000,
                   help="seeded random subset of the training set")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lambdas", default="0,0.5,1")
    p.add_argument("--steps", type=int, default=10, help="PGD iterations at evaluation")
    p.add_argument("--n-examples", type=int, default=500)
    p.add_argument("--data", default=str(tradeoff.DEFAULT_TARBALL))
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "smart"))
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--merge", default=None, metavar="DIR",
                   help="only merge the tables of DIR/*/smart.md (runs made in parallel, one "
                        "method each, same settings) into DIR/smart.md")
    own, rest = p.parse_known_args(argv)
    if own.merge:
        return own
    # everything else (model, batch size, lr, training attack, ...) is tradeoff.py's
    args = tradeoff.parse_args([
        "--methods", own.methods, "--baselines", "", "--epochs", str(own.epochs),
        "--lambdas", own.lambdas, "--steps", str(own.steps), "--n-examples",
        str(own.n_examples), "--data", own.data, "--out", own.out, "--no-progress",
        *(["--retrain"] if own.retrain else []), *rest])
    args.train_size = own.train_size
    return args


def other_rule(spec: str, run_dir: Path, args: argparse.Namespace, test) -> SweepResult:
    """The trained SMART model of ``spec`` at λ = 0.5 under the λ rule it was not trained
    with (the rules agree at λ = 0 and 1)."""
    payload = torch.load(run_dir / "model.pt", weights_only=True)
    rule = payload["options"]["lambda_rule"]
    payload["options"]["lambda_rule"] = "switch" if rule == "blend" else "blend"
    model = from_checkpoint(payload, source=str(run_dir / "model.pt"))
    return evaluate(model, test, [0.5], attack=args.attack, steps=args.steps,
                    n_examples=args.n_examples, subset_seed=0, seed=args.seed, progress=False)


def sparsity(spec: str, run_dir: Path) -> dict[str, Any]:
    """Non-zero parameters per path (and both stored) and MACs at 32×32."""
    model = oat_plugins.load(run_dir / "model.pt")
    if model.method_name == "smart":
        costs = path_costs(model, (3, 32, 32))
        return {k: {"params": c.params, "macs": c.macs} for k, c in costs.items()}
    exported = count_nonzero(model.export(0.0))
    stored = sum(int((p != 0).sum()) for p in model.backbone.parameters())
    return {"clean": {"params": exported.nonzero}, "adversarial": {"params": exported.nonzero},
            "union": {"params": stored}, "dense": {"params": exported.total}}


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | λ | clean acc (%) | robust acc (%) | non-zero params: clean path / "
             "adversarial path / both stored (M) | train time (min) |",
             "|---|---|---|---|---|---|"]
    for spec, row in rows.items():
        nz = row["sparsity"]
        params = " / ".join(f"{nz[k]['params'] / 1e6:.3f}"
                            for k in ("clean", "adversarial", "union"))
        for r in row["sweep"]:
            lines.append(f"| {spec} | {r.lam:g} | {100 * r.clean_acc:.1f} | "
                         f"{100 * r.robust_acc:.1f} | {params} | {row['seconds'] / 60:.1f} |")
        if row.get("other_rule") is not None:
            r = row["other_rule"].rows[0]
            lines.append(f"| {spec} under the other λ rule | 0.5 | {100 * r.clean_acc:.1f} | "
                         f"{100 * r.robust_acc:.1f} | | |")
    dense = next(iter(rows.values()))["sparsity"]["dense"]["params"]
    return "\n".join(lines) + f"\n\ndense backbone: {dense / 1e6:.3f} M parameters"


def merge(folder: Path) -> str:
    """One table from the ``smart.md`` of every sub-folder (same setting line required)."""
    parts = sorted(folder.glob("*/smart.md"))
    if not parts:
        raise SystemExit(f"no */smart.md under {folder}")
    texts = [p.read_text().split("\n") for p in parts]
    settings = {t[0] for t in texts}
    if len(settings) != 1:
        raise SystemExit(f"the runs under {folder} have different settings: {settings}")
    head = [line for line in texts[0] if line.startswith(("| model", "|---"))]
    rows = [line for t in texts for line in t
            if line.startswith("| ") and not line.startswith("| model")]
    tail = [line for line in texts[0] if line.startswith("dense backbone")]
    times = ", ".join(f"{p.parent.name} {next(x for x in t if x.startswith('total wall'))[16:]}"
                      for p, t in zip(parts, texts, strict=True))
    text = "\n".join([texts[0][0], "", *head, *rows, "", *tail, "",
                      f"runs in parallel, one per method; wall time each: {times}", ""])
    atomic_write_text(text, folder / "smart.md")
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if getattr(args, "merge", None):
        print(merge(Path(args.merge)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    specs = [m for m in args.methods.split(",") if m]
    for spec in specs:
        name, options = tradeoff.parse_method(spec)
        oat_plugins.get_method(name)(**options)  # bad options fail before training
    started = time.perf_counter()
    train, test, described = tradeoff.load_data(args.data)
    n = min(args.train_size, len(train))
    subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
    train = Subset(train, subset.tolist())
    args.data = f"{args.data}[seeded subset of {n}]"  # part of the cache fingerprint
    # the evaluated test images only, so that fit's per-epoch check costs no more than that
    picked = torch.randperm(len(test), generator=torch.Generator().manual_seed(1))
    test = Subset(test, picked[:args.n_examples].tolist())
    out = Path(args.out)
    rows: dict[str, dict[str, Any]] = {}
    for spec in specs:
        sweep, seconds = tradeoff.run_method(spec, args, train, test, out)
        run_dir = out / spec.replace(":", "-").replace("=", "")
        smart = spec.split(":")[0] == "smart"
        rows[spec] = {"sweep": sweep, "seconds": seconds, "sparsity": sparsity(spec, run_dir),
                      "other_rule": other_rule(spec, run_dir, args, test) if smart else None}
    cfg = tradeoff._config(args)
    setting = (f"REDUCED BUDGET: {args.model} {json.dumps(args.model_kwargs)}, {n:,} of "
               f"{described} training images, {cfg.epochs} epoch(s), batch {cfg.batch_size}, "
               f"SGD lr {cfg.lr} cosine, {cfg.attack} at ε=8/255, each method's default λ "
               f"sampler; evaluation PGD-{args.steps} on {args.n_examples} test images; "
               f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    text = table(rows)
    total = time.perf_counter() - started
    atomic_write_text(f"{setting}\n\n{text}\n\ntotal wall time {total / 60:.1f} min\n",
                      out / "smart.md")
    atomic_write_text(json.dumps({
        "setting": setting, "total_seconds": total,
        "results": {s: {"train_seconds": r["seconds"], "sparsity": r["sparsity"],
                        **r["sweep"].to_dict(),
                        "other_rule_lam_0.5": None if r["other_rule"] is None
                        else r["other_rule"].to_dict()} for s, r in rows.items()}},
        indent=2, ensure_ascii=False), out / "results.json")
    print(setting, "\n", text, f"\n\ntotal wall time {total / 60:.1f} min", sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
