#!/usr/bin/env python
"""Pack a device bench's results folder into a few files that fit what comes back from the
device machine (at most ``--max-files`` files in ``--dest``, each at most ``--max-bytes``).

- ``results.tgz``: every file of ``--results`` except model and checkpoint files (``*.pt``)
  and any file over ``--max-small`` bytes (listed in ``packed.json`` as left out);
- ``models-<i>.tgz``: the trained models (``model.pt``, ``demo_model.pt``), in ``--priority``
  order (a run whose folder name contains an earlier entry comes first), as many parts as the
  file count allows, each under the size limit (raw size: compression only shrinks float
  weights a little), all parts together under ``--max-total``; the models that did not fit
  are listed in ``packed.json``.

Standard library only, so it packs even when the bench's own imports fail.

    python bench/device/pack.py --results /tmp/res --dest "$OUT"
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

PRIORITY = ("demo_model", "film", "float-recipereference", "smart", "float-recipeoat",
            "float-recipeextremes", "floats", "pgd-at", "standard")


MODEL_FILES = ("model.pt", "demo_model.pt")  # trained models; other *.pt (checkpoints) stay


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--max-files", type=int, default=8)
    p.add_argument("--max-bytes", type=int, default=16_000_000)
    p.add_argument("--max-total", type=int, default=62_000_000,
                   help="all files together (log and results included)")
    p.add_argument("--max-small", type=int, default=2_000_000)
    p.add_argument("--priority", default=",".join(PRIORITY))
    return p.parse_args(argv)


def rank(path: Path, priority: list[str]) -> tuple[int, str]:
    names = [part for part in path.parts]
    for i, key in enumerate(priority):
        if any(key in name for name in names):
            return i, str(path)
    return len(priority), str(path)


def pack_models(models: list[Path], root: Path, dest: Path, parts: int,
                limit: int, total_limit: int) -> tuple[list[str], list[str]]:
    """Greedy: each model into the first part with room, while all parts together stay under
    ``total_limit``; returns (packed, left out)."""
    bins: list[list[Path]] = [[] for _ in range(parts)]
    sizes = [0] * parts
    left = []
    for model in models:
        size = model.stat().st_size
        slot = next((i for i in range(parts) if sizes[i] + size <= limit), None)
        if sum(sizes) + size > total_limit:
            slot = None
        if slot is None:
            left.append(str(model.relative_to(root)))
            continue
        bins[slot].append(model)
        sizes[slot] += size
    packed = []
    for i, members in enumerate(b for b in bins if b):
        # level 1: float weights barely compress, and the packing must be quick
        with tarfile.open(dest / f"models-{i + 1}.tgz", "w:gz", compresslevel=1) as archive:
            for model in members:
                archive.add(model, arcname=str(model.relative_to(root)))
                packed.append(str(model.relative_to(root)))
    return packed, left


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root, dest = Path(args.results), Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    small = [p for p in files if p.suffix != ".pt" and p.stat().st_size <= args.max_small]
    big = [str(p.relative_to(root)) for p in files
           if p.suffix != ".pt" and p.stat().st_size > args.max_small]
    models = sorted((p for p in files if p.name in MODEL_FILES),
                    key=lambda p: rank(p.relative_to(root), args.priority.split(",")))
    taken = sum(1 for p in dest.iterdir() if p.is_file() and p.name != "results.tgz")
    parts = max(args.max_files - taken - 1, 0)  # one for results.tgz
    packed, left = pack_models(models, root, dest, parts, int(0.97 * args.max_bytes),
                               args.max_total - 2_000_000)  # 2 MB: log and results
    report = {"models_packed": packed, "models_left_out": left, "small_files_left_out": big}
    (root / "packed.json").write_text(json.dumps(report, indent=2))
    with tarfile.open(dest / "results.tgz", "w:gz") as archive:
        for path in small + [root / "packed.json"]:
            archive.add(path, arcname=str(path.relative_to(root)))
    print(f"packed {len(small) + 1} result files into {dest / 'results.tgz'} "
          f"({(dest / 'results.tgz').stat().st_size:,} bytes); {json.dumps(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
