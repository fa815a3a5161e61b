"""Check that the leaderboard snapshot bundled in the package equals RobustBench's ``model_info``.

The package ships RobustBench's entries for CIFAR-10 L∞, CIFAR-10 L2 and CIFAR-100 L∞ in
``oat_plugins/data/leaderboard/<dataset>/<threat_model>/<model id>.json``, copied unchanged.
This tool compares them, file set and parsed JSON, with a RobustBench ``model_info`` checkout
(by default ``../shared/robustbench/model_info`` beside the repository). It is a maintenance
check, not a test: the test suite never reads anything outside the package.

Usage::

    python tools/check_leaderboard_snapshot.py [--model-info ../shared/robustbench/model_info]

Prints one line per (dataset, threat model) and every difference; exits 0 when the snapshot
equals ``model_info``, 1 when they differ, 2 when ``model_info`` is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "oat_plugins" / "data" / "leaderboard"
DEFAULT_MODEL_INFO = ROOT.parent / "shared" / "robustbench" / "model_info"
BOARDS = (("cifar10", "Linf"), ("cifar10", "L2"), ("cifar100", "Linf"))


def _entries(folder: Path) -> dict[str, object]:
    return {p.stem: json.loads(p.read_text(encoding="utf-8"))
            for p in sorted(folder.glob("*.json"))}


def differences(snapshot: Path, model_info: Path, dataset: str, threat: str) -> list[str]:
    """What differs between the bundled entries and ``model_info`` for one board."""
    ours = _entries(snapshot / dataset / threat)
    theirs = _entries(model_info / dataset / threat)
    problems = [f"missing from the snapshot: {name}" for name in sorted(set(theirs) - set(ours))]
    problems += [f"not in model_info: {name}" for name in sorted(set(ours) - set(theirs))]
    problems += [f"entry differs: {name}" for name in sorted(set(ours) & set(theirs))
                 if ours[name] != theirs[name]]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-info", type=Path, default=DEFAULT_MODEL_INFO,
                        help="RobustBench's model_info folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.model_info.is_dir():
        print(f"check_leaderboard_snapshot: error: {args.model_info} is not a folder",
              file=sys.stderr)
        return 2
    failed = False
    for dataset, threat in BOARDS:
        problems = differences(SNAPSHOT, args.model_info, dataset, threat)
        count = len(list((SNAPSHOT / dataset / threat).glob("*.json")))
        print(f"{dataset}/{threat}: {count} bundled entries, "
              f"{'equal' if not problems else f'{len(problems)} difference(s)'}")
        for problem in problems:
            print(f"  {problem}")
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
