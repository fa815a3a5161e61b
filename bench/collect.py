#!/usr/bin/env python
"""One table and plot from cached ``bench/tradeoff.py`` runs trained with different settings.

Each ``--runs`` entry is ``label=DIR``, a run folder of ``bench/tradeoff.py`` (``model.pt``,
``time.json``, ``sweep.json``; a conditional model or a plain baseline). For every run: clean
and robust accuracy at each λ of ``--lambdas`` (values its sweep lacks are evaluated with the
protocol of ``bench/tradeoff.py`` — PGD-``--steps`` on the same seeded ``--n-examples`` test
images, which makes a row independent of the λ list — and kept in the folder's
``sweep_extra.json``), the non-zero parameters of the model exported at λ = 0 and λ = 1 (each
path as a plain model) and as stored (every parameter tensor, masks' originals included), and
the training minutes of its ``time.json``. Writes ``--out``.md, .json and .png.

    python bench/collect.py --lambdas 0,0.5,1 --out bench/results/smart-s2 \\
        --runs film=bench/out/tradeoff-issue11-all/film smart=bench/out/tradeoff-s2b/smart
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from tradeoff import DEFAULT_TARBALL, _floats, load_data  # noqa: E402

import oat_plugins  # noqa: E402
from oat_plugins._io import atomic_write_text  # noqa: E402
from oat_plugins.checkpoint import CHECKPOINT_FORMAT  # noqa: E402
from oat_plugins.evaluate import SweepResult, SweepRow, evaluate, plot_tradeoff  # noqa: E402
from oat_plugins.exported import from_exported  # noqa: E402
from oat_plugins.stats import count_nonzero  # noqa: E402

logger = logging.getLogger("bench.collect")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="LABEL=DIR")
    p.add_argument("--lambdas", type=_floats, default="0,0.5,1")
    p.add_argument("--data", default=str(DEFAULT_TARBALL))
    p.add_argument("--steps", type=int, default=20, help="evaluation PGD iterations")
    p.add_argument("--n-examples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--title", default=None)
    p.add_argument("--out", required=True, help="output path without extension")
    return p.parse_args(argv)


def load_run(run_dir: Path) -> nn.Module:
    path = run_dir / "model.pt"
    payload = torch.load(path, weights_only=True)
    if payload.get("format") == CHECKPOINT_FORMAT:
        return oat_plugins.load(path)
    return from_exported(payload, source=str(path))


def rows_at(model: nn.Module, run_dir: Path, lambdas: list[float | None], test: Any,
            args: argparse.Namespace) -> list[SweepRow]:
    """The sweep's rows at ``lambdas``, evaluating (and keeping) the missing ones."""
    known = {r.lam: r for r in SweepResult.from_json(run_dir / "sweep.json").rows}
    extra_path = run_dir / "sweep_extra.json"
    if extra_path.is_file():
        known.update((r.lam, r) for r in SweepResult.from_json(extra_path).rows)
    missing = [lam for lam in lambdas if lam not in known]
    if missing:
        logger.info("%s: evaluating λ %s", run_dir, missing)
        extra = evaluate(model, test, missing, attack="pgd", steps=args.steps,
                         n_examples=args.n_examples, subset_seed=0, seed=args.seed,
                         batch_size=128, progress=False)
        known.update((r.lam, r) for r in extra.rows)
        SweepResult([r for lam, r in known.items() if lam is not None], extra.meta) \
            .to_json(extra_path)
    return [known[lam] for lam in lambdas]


def nonzeros(model: nn.Module) -> dict[str, int]:
    stored = sum(int((p != 0).sum()) for p in model.parameters())
    if not isinstance(model, oat_plugins.ConditionalModel):
        return {"stored": stored}
    return {"lam0": count_nonzero(model.export(0.0)).nonzero,
            "lam1": count_nonzero(model.export(1.0)).nonzero, "stored": stored}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    test = load_data(args.data, seed=args.seed)[1]
    results: dict[str, Any] = {}
    for entry in args.runs:
        label, _, folder = entry.partition("=")
        run_dir = Path(folder)
        model = load_run(run_dir).eval()
        conditional = isinstance(model, oat_plugins.ConditionalModel)
        lambdas = list(args.lambdas) if conditional else [None]
        rows = rows_at(model, run_dir, lambdas, test, args)
        seconds = json.loads((run_dir / "time.json").read_text())["train_seconds"]
        results[label] = {"rows": [dataclasses.asdict(r) for r in rows], "nonzero": nonzeros(model),
                          "train_minutes": seconds / 60, "run": str(run_dir)}
    out = Path(args.out)
    atomic_write_text(json.dumps(results, indent=2, ensure_ascii=False), out.with_suffix(".json"))
    atomic_write_text(markdown(results), out.with_suffix(".md"))
    curves = {k: SweepResult([SweepRow(**r) for r in v["rows"]])
              for k, v in results.items() if v["rows"][0]["lam"] is not None}
    points = {k: (v["rows"][0]["clean_acc"], v["rows"][0]["robust_acc"])
              for k, v in results.items() if k not in curves}
    plot_tradeoff(curves, out.with_suffix(".png"), references=points, title=args.title)
    print(markdown(results))
    return 0


def markdown(results: dict[str, Any]) -> str:
    lines = ["| model | λ | clean % | robust % | non-zero params: λ = 0 / λ = 1 / stored "
             "| train (min) |", "|---|---|---|---|---|---|"]
    for label, r in results.items():
        nz = r["nonzero"]
        first = [label, " / ".join(f"{nz[k]:,}" for k in ("lam0", "lam1", "stored") if k in nz),
                 f"{r['train_minutes']:.1f}"]
        for row in r["rows"]:
            name, counts, minutes = first
            lam = "–" if row["lam"] is None else f"{row['lam']:g}"
            lines.append(f"| {name} | {lam} | {100 * row['clean_acc']:.1f} | "
                         f"{100 * row['robust_acc']:.1f} | {counts} | {minutes} |")
            first = ["", "", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
