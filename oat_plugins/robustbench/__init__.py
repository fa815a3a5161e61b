"""RobustBench integration: evaluation protocol, registration, leaderboard comparison.

Importing this package imports neither robustbench nor (py)autoattack; the functions that need
them call :func:`oat_plugins.robustbench.compat.install` (see that module for what it does).

* :func:`benchmark` — RobustBench's protocol (first n test images, ToTensor, standard
  AutoAttack with a fixed seed) on a model at a fixed λ; optional leaderboard JSON.
* :func:`register` — make ``robustbench.utils.load_model(name, ...)`` and
  ``timm.create_model`` return our model at a λ, without download.
* :func:`load_leaderboard` / :func:`render_leaderboard` — the bundled RobustBench snapshot
  (CIFAR-10 Linf/L2, CIFAR-100 Linf) ranked together with our entries.
"""

from .data import load_data, robustbench_local_data
from .entries import (
    DATASETS,
    DEFAULT_EPS,
    THREAT_MODELS,
    format_eps,
    make_entry,
    parse_eps,
    read_entry,
    validate_entry,
    write_entry,
)
from .leaderboard import LeaderboardRow, load_leaderboard, render_leaderboard, snapshot_entries
from .protocol import BenchmarkResult, NondeterministicModelError, benchmark, written_path
from .registry import register, registered, timm_name, unregister

__all__ = [
    "DATASETS",
    "DEFAULT_EPS",
    "THREAT_MODELS",
    "BenchmarkResult",
    "LeaderboardRow",
    "NondeterministicModelError",
    "benchmark",
    "format_eps",
    "load_data",
    "load_leaderboard",
    "make_entry",
    "parse_eps",
    "read_entry",
    "register",
    "registered",
    "render_leaderboard",
    "robustbench_local_data",
    "snapshot_entries",
    "timm_name",
    "unregister",
    "validate_entry",
    "write_entry",
    "written_path",
]
