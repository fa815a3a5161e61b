"""Clean and robust accuracy of a model over a sweep of λ, and the trade-off plot.

>>> result = oat_plugins.evaluate(model, (x_test, y_test), lambdas=[0, 0.5, 1],
...                               attack="pgd", steps=20, n_examples=1000)
>>> print(result.to_markdown())
>>> result.to_json("runs/eval/metrics.json"); result.plot("runs/eval/tradeoff.png")

Protocol (the same for every λ, so the rows are comparable):

- The model is put in eval mode (its mode and λ are restored afterwards).
- The first ``n_examples`` examples of the data are used, in order, once: each batch is
  evaluated at every λ before the next batch is read, so every λ sees exactly the same images.
- Clean accuracy is computed under ``torch.no_grad`` (not ``inference_mode``: conditioned
  layers cache λ tensors that the attack's backward pass must be able to use). The attack is
  run on the examples the model classifies correctly at that λ (the others already count as
  errors, as in AutoAttack), so the robust accuracy never exceeds the clean accuracy.
- The attack's random start is seeded per batch (``seed``), identically for every λ, so a run
  is reproducible.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchattacks.attack import Attack
from tqdm.auto import tqdm

from ._device import model_device
from ._io import atomic_write_bytes, atomic_write_text
from .attacks import (
    ATTACKS,
    AttackConfig,
    AttackFactory,
    CWLinf,
    available_attacks,
    resolve_attack,
)
from .condition import validate_lambda
from .model import ConditionalModel

logger = logging.getLogger(__name__)

DEFAULT_LAMBDAS: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
"""The λ sweep used when a :class:`ConditionalModel` is evaluated with ``lambdas=None``."""

__all__ = [
    "ATTACKS",
    "DEFAULT_LAMBDAS",
    "AttackConfig",
    "CWLinf",
    "DialCheck",
    "SweepResult",
    "SweepRow",
    "available_attacks",
    "dial_check",
    "evaluate",
    "plot_tradeoff",
    "resolve_attack",
]

Data = Dataset | DataLoader | tuple[torch.Tensor, torch.Tensor] | Sequence[torch.Tensor]


# -- attacks ------------------------------------------------------------------------------
# The attacks live in oat_plugins.attacks (one registry for training, evaluation and GDWS);
# these names stay importable from here.

# -- results ------------------------------------------------------------------------------


@dataclass
class SweepRow:
    """One λ of a sweep. Accuracies are fractions in [0, 1]; ``lam`` is None for a plain
    (unconditioned) model. ``mac_fraction``: for a model with exits, the mean MACs per clean
    image of its input-adaptive inference (heads evaluated and rejected included) as a
    fraction of the backbone's (``model.cost``); None otherwise."""

    lam: float | None
    clean_acc: float
    robust_acc: float
    n: int
    attack: str
    seconds: float = 0.0
    mac_fraction: float | None = None


DIAL_TOLERANCE = 0.5
"""Default slack of the dial check, in accuracy points (percentage points): sampling noise."""

DIAL_MIN_SPREAD = 0.25
"""Default smallest spread of a dial: no single λ step may make more than 75 % of the change."""


@dataclass(frozen=True)
class DialCheck:
    """Whether a λ sweep behaves as a dial (see docs/evaluation.md, "Dial check").

    The λ values are taken in ascending order; the *ends* are the smallest and the largest.
    A *position* says where an accuracy lies between its values at the ends: 0 at the smallest
    λ's, 1 at the largest λ's, i.e. ``(clean(λ₀) − clean(λ)) / (clean(λ₀) − clean(λ₁))`` and
    ``(robust(λ) − robust(λ₀)) / (robust(λ₁) − robust(λ₀))``.

    Attributes:
        lambdas: the sweep's λ values, ascending.
        tolerance: slack for sampling noise, in accuracy points.
        min_spread: the smallest spread a dial needs.
        monotone_clean: clean accuracy never rises by more than ``tolerance`` from one λ to
            the next.
        monotone_robust: robust accuracy never falls by more than ``tolerance``.
        clean_change, robust_change: the end-to-end fall of clean and rise of robust accuracy,
            in points.
        clean_positions, robust_positions: the positions of the interior λ values; None unless
            clean accuracy falls (robust accuracy rises) by more than ``tolerance`` from the
            smallest λ to the largest.
        clean_spread, robust_spread: 1 − the largest move between adjacent λ (ends included)
            as a share of the end-to-end move: 0 for a switch (one step makes the whole
            change), k/(k+1) for k evenly spread interior points; None as above.
        worst_clean_rise, worst_robust_drop: the largest step against the direction, in points.
        is_dial: monotone both ways, clean accuracy falls and robust accuracy rises by more
            than ``tolerance`` end to end, and both spreads are at least ``min_spread``; None
            (undecided) without an interior λ.
    """

    lambdas: tuple[float, ...]
    tolerance: float
    min_spread: float
    monotone_clean: bool
    monotone_robust: bool
    clean_change: float
    robust_change: float
    clean_positions: tuple[float, ...] | None
    robust_positions: tuple[float, ...] | None
    clean_spread: float | None
    robust_spread: float | None
    worst_clean_rise: float
    worst_robust_drop: float
    is_dial: bool | None

    @property
    def interior_lambdas(self) -> tuple[float, ...]:
        return self.lambdas[1:-1]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}

    def summary(self) -> str:
        """One line: the verdict, the reason, then the positions and spreads."""
        verdict = {True: "yes", False: "no", None: "undecided"}[self.is_dial]
        return f"dial: {verdict} — {self._reason()}{self._shape()}"

    def _reason(self) -> str:
        tol = f"{self.tolerance:g} pt"
        if self.is_dial is None:
            lams = ", ".join(f"{v:g}" for v in self.lambdas)
            return f"no λ between the ends (λ = {lams}); evaluate interior λ values"
        if not (self.monotone_clean and self.monotone_robust):
            bad = []
            if not self.monotone_clean:
                bad.append(f"clean accuracy rises by {self.worst_clean_rise:.1f} pt")
            if not self.monotone_robust:
                bad.append(f"robust accuracy falls by {self.worst_robust_drop:.1f} pt")
            return f"not monotone ({'; '.join(bad)} between adjacent λ; tolerance {tol})"
        if self.clean_spread is None or self.robust_spread is None:
            return (f"no trade-off end to end (clean falls by {self.clean_change:.1f} pt, "
                    f"robust rises by {self.robust_change:.1f} pt; each must exceed {tol})")
        if not self.is_dial:
            return (f"a switch: one λ step makes more than {1 - self.min_spread:.0%} of the "
                    f"change (spread below {self.min_spread:g})")
        return (f"monotone within {tol}, clean −{self.clean_change:.1f} pt and robust "
                f"+{self.robust_change:.1f} pt spread over λ")

    def _shape(self) -> str:
        parts = []
        for name, pos, spread in (("clean", self.clean_positions, self.clean_spread),
                                  ("robust", self.robust_positions, self.robust_spread)):
            if pos is not None and spread is not None:
                parts.append(f"{name} positions {'/'.join(f'{p:.2f}' for p in pos)}, "
                             f"spread {spread:.2f}")
        return f"; {'; '.join(parts)}" if parts and self.interior_lambdas else ""


def _steps(values: Sequence[float]) -> list[float]:
    """Differences between consecutive values."""
    return [b - a for a, b in zip(values[:-1], values[1:], strict=True)]


def _positions(points: Sequence[float], tolerance: float) -> tuple[list[float], float] | None:
    """The interior points' positions between the first (0) and the last (1), and the
    spread; None unless the last exceeds the first by more than ``tolerance``."""
    change = points[-1] - points[0]
    if change <= tolerance:
        return None
    pos = [(v - points[0]) / change for v in points]
    largest_step = max(abs(d) for d in _steps(pos))
    return pos[1:-1], min(1.0, max(0.0, 1.0 - largest_step))


def dial_check(
    lambdas: Sequence[float],
    clean: Sequence[float],
    robust: Sequence[float],
    *,
    tolerance: float = DIAL_TOLERANCE,
    min_spread: float = DIAL_MIN_SPREAD,
) -> DialCheck:
    """The :class:`DialCheck` of accuracies (fractions in [0, 1]) measured at ``lambdas``
    (any order, at least two); ``tolerance`` is in accuracy points."""
    if len(lambdas) < 2 or not len(lambdas) == len(clean) == len(robust):
        raise ValueError("the dial check needs accuracies at two or more λ values")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a number of points >= 0, got {tolerance!r}")
    if not 0.0 <= min_spread <= 1.0:
        raise ValueError(f"min_spread must be in [0, 1], got {min_spread!r}")
    order = sorted(range(len(lambdas)), key=lambda i: lambdas[i])
    lams = tuple(float(lambdas[i]) for i in order)
    c = [100.0 * clean[i] for i in order]
    r = [100.0 * robust[i] for i in order]
    slack = tolerance + 1e-9  # accuracies are ratios of counts: ignore float rounding
    worst_rise = max(0.0, *_steps(c))
    worst_drop = max(0.0, *(-d for d in _steps(r)))
    cpos, rpos = _positions([-v for v in c], slack), _positions(r, slack)
    monotone_clean, monotone_robust = worst_rise <= slack, worst_drop <= slack
    is_dial = None if len(lams) < 3 else bool(
        monotone_clean and monotone_robust and cpos is not None and rpos is not None
        and min(cpos[1], rpos[1]) >= min_spread)
    return DialCheck(
        lams, float(tolerance), float(min_spread), monotone_clean, monotone_robust,
        c[0] - c[-1], r[-1] - r[0],
        None if cpos is None else tuple(cpos[0]), None if rpos is None else tuple(rpos[0]),
        None if cpos is None else cpos[1], None if rpos is None else rpos[1],
        worst_rise, worst_drop, is_dial)


@dataclass
class SweepResult:
    """The table :func:`evaluate` returns: one :class:`SweepRow` per λ, plus the setting."""

    rows: list[SweepRow]
    meta: dict[str, Any] = field(default_factory=dict)

    # -- access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[SweepRow]:
        return iter(self.rows)

    @property
    def lambdas(self) -> list[float | None]:
        return [r.lam for r in self.rows]

    @property
    def clean_acc(self) -> list[float]:
        return [r.clean_acc for r in self.rows]

    @property
    def robust_acc(self) -> list[float]:
        return [r.robust_acc for r in self.rows]

    def row(self, lam: float | None) -> SweepRow:
        """The row evaluated at ``lam``."""
        for r in self.rows:
            if (r.lam is None and lam is None) or (
                r.lam is not None and lam is not None and math.isclose(r.lam, lam)
            ):
                return r
        raise KeyError(f"no row for λ={lam!r}; rows: {self.lambdas}")

    # -- dial check ---------------------------------------------------------------------
    @property
    def is_sweep(self) -> bool:
        """True for a λ sweep (two or more rows, all with a λ): the dial check applies."""
        return len(self.rows) >= 2 and all(r.lam is not None for r in self.rows)

    def dial(self, *, tolerance: float = DIAL_TOLERANCE,
             min_spread: float = DIAL_MIN_SPREAD) -> DialCheck:
        """Whether this sweep is a dial: monotone (clean accuracy non-increasing, robust
        non-decreasing in λ, within ``tolerance`` accuracy points) with the interior λ values
        spread between the ends (see :class:`DialCheck`)."""
        if not self.is_sweep:
            raise ValueError(f"the dial check needs a sweep of two or more λ values; this "
                             f"result has λ = {self.lambdas}")
        return dial_check([r.lam for r in self.rows], self.clean_acc, self.robust_acc,
                          tolerance=tolerance, min_spread=min_spread)

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"meta", "rows"}``, plus ``"dial"`` (:meth:`dial` with its defaults) for a sweep."""
        payload: dict[str, Any] = {"meta": self.meta, "rows": [asdict(r) for r in self.rows]}
        if self.is_sweep:
            payload["dial"] = self.dial().to_dict()
        return payload

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> SweepResult:
        return cls([SweepRow(**r) for r in payload["rows"]], dict(payload.get("meta", {})))

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the table and its setting as JSON (atomically)."""
        atomic_write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", path)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SweepResult:
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write one line per λ: lam, clean_acc, robust_acc, n, attack, seconds (atomically)."""
        buffer = io.StringIO()
        names = list(SweepRow.__dataclass_fields__)
        writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            line = asdict(r)
            line["lam"] = "" if r.lam is None else r.lam
            writer.writerow(line)
        atomic_write_text(buffer.getvalue(), path)

    def to_markdown(self, *, label: str | None = None, dial: bool = True) -> str:
        """A markdown table (accuracies in percent), followed, for a sweep with λ values
        between its ends and ``dial``, by the one-line :meth:`dial` summary."""
        head = "| λ | clean acc (%) | robust acc (%) | n | attack |"
        costs = any(r.mac_fraction is not None for r in self.rows)
        if costs:
            head += " MACs (% of backbone) |"
        if label is not None:
            head = "| model " + head
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for r in self.rows:
            lam = "–" if r.lam is None else f"{r.lam:g}"
            cells = [lam, f"{100 * r.clean_acc:.1f}", f"{100 * r.robust_acc:.1f}", str(r.n),
                     r.attack]
            if costs:
                cells.append("–" if r.mac_fraction is None else f"{100 * r.mac_fraction:.1f}")
            if label is not None:
                cells.insert(0, label)
            lines.append("| " + " | ".join(cells) + " |")
        if dial and self.is_sweep and len(self.rows) > 2:
            lines += ["", self.dial().summary()]
        return "\n".join(lines)

    def plot(
        self,
        path: str | os.PathLike,
        *,
        label: str = "once-for-all",
        others: Mapping[str, SweepResult] | None = None,
        references: Mapping[str, tuple[float, float]] | None = None,
        title: str | None = None,
    ) -> None:
        """Write a PNG of the trade-off: clean (x) vs robust (y) accuracy, one labelled point
        per λ. ``others`` adds further sweeps (e.g. another method); ``references`` adds single
        points ``label -> (clean_acc, robust_acc)`` (e.g. plain and PGD-AT baselines)."""
        curves = {label: self, **(others or {})}
        plot_tradeoff(curves, path, references=references,
                      title=title or self.meta.get("attack"))


def plot_tradeoff(
    curves: Mapping[str, SweepResult],
    path: str | os.PathLike,
    *,
    references: Mapping[str, tuple[float, float]] | None = None,
    title: str | None = None,
) -> None:
    """Write the trade-off plot (PNG) of one or more sweeps plus reference points.

    Uses :class:`matplotlib.figure.Figure` directly (Agg canvas), so it touches no pyplot
    state and works without a display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    markers = "os^Dv<>"
    for i, (name, result) in enumerate(curves.items()):
        xs = [100 * r.clean_acc for r in result.rows]
        ys = [100 * r.robust_acc for r in result.rows]
        (line,) = ax.plot(xs, ys, marker=markers[i % len(markers)], label=name)
        for r, x, y in zip(result.rows, xs, ys, strict=True):
            if r.lam is not None:
                ax.annotate(f"λ={r.lam:g}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=8, color=line.get_color())
    for j, (name, (clean, robust)) in enumerate((references or {}).items()):
        ax.scatter([100 * clean], [100 * robust], marker="*XPDvs"[j % 6], s=120, label=name,
                   color=f"C{(len(curves) + j) % 10}", zorder=3)
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_xlim(0, 100)  # honest axes: a zoomed axis makes a 1-point change look like a trade-off
    ax.set_ylim(0, 100)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(buffer.getvalue(), path)


# -- evaluation ---------------------------------------------------------------------------


def _check_lambdas(model: nn.Module, lambdas: Iterable[float] | None) -> list[float | None]:
    conditional = isinstance(model, ConditionalModel)
    if not conditional:
        if lambdas is not None:
            raise ValueError(
                f"{type(model).__name__} is not a ConditionalModel, so it has no λ: pass "
                "lambdas=None (one row), or wrap it with oat_plugins.wrap first"
            )
        return [None]
    if lambdas is None:
        return list(DEFAULT_LAMBDAS)
    if isinstance(lambdas, (str, bytes)) or not isinstance(lambdas, Iterable):
        raise ValueError(f"lambdas must be a list of numbers in [0, 1], got {lambdas!r}")
    values = [validate_lambda(v, per_sample=False) for v in lambdas]
    if not values:
        raise ValueError("lambdas is empty; give at least one λ in [0, 1]")
    if len(set(values)) != len(values):
        raise ValueError(f"lambdas has repeated values: {values}")
    return values


def _subset_indices(total: int, n: int, seed: int | None) -> torch.Tensor | None:
    """None for the first ``n``; else ``n`` indices drawn without replacement, sorted."""
    if seed is None or n >= total:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:n].sort().values


def _batches(
    data: Data, n_examples: int | None, batch_size: int, subset_seed: int | None = None
) -> tuple[Iterable[tuple[torch.Tensor, torch.Tensor]], int | None]:
    """(x, y) batches over the first ``n_examples`` examples (or a seeded random subset of
    that size), and their count when known."""
    if isinstance(data, DataLoader):
        if subset_seed is not None:
            raise ValueError("subset_seed needs a Dataset or tensors, not a DataLoader")
        total = _safe_len(data.dataset)
        n = total if n_examples is None else (
            n_examples if total is None else min(n_examples, total))
        return _take(data, n), n
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
        isinstance(t, torch.Tensor) for t in data
    ):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
        n = x.shape[0] if n_examples is None else min(n_examples, x.shape[0])
        idx = _subset_indices(x.shape[0], n, subset_seed)
        x, y = (x[:n], y[:n]) if idx is None else (x[idx], y[idx])
        return ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)), n
    if isinstance(data, Dataset):
        total = _safe_len(data)
        if total is None:
            raise ValueError("a Dataset without __len__ must be passed as a DataLoader")
        n = total if n_examples is None else min(n_examples, total)
        idx = _subset_indices(total, n, subset_seed)
        subset = data if n == total else Subset(data, range(n) if idx is None else idx.tolist())
        return DataLoader(subset, batch_size=batch_size, shuffle=False), n
    raise ValueError(
        "data must be a torch Dataset, a DataLoader, or an (images, labels) tensor pair; got "
        f"{type(data).__name__}"
    )


def _total(data: Data) -> int | None:
    if isinstance(data, DataLoader):
        return _safe_len(data.dataset)
    if isinstance(data, Dataset):
        return _safe_len(data)
    return data[0].shape[0]


def _safe_len(obj: object) -> int | None:
    try:
        return len(obj)  # type: ignore[arg-type]
    except TypeError:
        return None


def _take(loader: Iterable, n: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    seen = 0
    for batch in loader:
        x, y = batch[0], batch[1]
        if n is not None:
            if seen >= n:
                return
            x, y = x[: n - seen], y[: n - seen]
        seen += x.shape[0]
        yield x, y


def _rng_devices(dev: torch.device) -> list[int]:
    if dev.type != "cuda":
        return []
    return [dev.index if dev.index is not None else torch.cuda.current_device()]


def _at(model: nn.Module, lam: float | None) -> contextlib.AbstractContextManager:
    """λ held (and conditioning frozen for the attack) for one row; nothing for a plain
    model."""
    if lam is None:
        return contextlib.nullcontext()
    scope = contextlib.ExitStack()
    scope.enter_context(model.at(lam))
    scope.enter_context(model.frozen())
    return scope


def _correct_counts(model: nn.Module, adversary: Attack, x: torch.Tensor, y: torch.Tensor,
                    attack_seed: int) -> tuple[int, int]:
    """Samples of (x, y) classified correctly clean and under ``adversary``, which attacks
    only the clean-correct ones (seeded, so every λ sees the same random start)."""
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    if not correct.any():
        return 0, 0
    xs, ys = x[correct].clone(), y[correct].clone()
    with torch.random.fork_rng(devices=_rng_devices(x.device)):
        torch.manual_seed(attack_seed)
        adv = adversary(xs, ys)
    model.eval()  # torchattacks restores the mode it found; keep eval
    with torch.no_grad():
        return int(correct.sum()), int((model(adv).argmax(1) == ys).sum())


def evaluate(
    model: nn.Module,
    data: Data,
    lambdas: Iterable[float] | None = None,
    *,
    attack: str | AttackFactory = "pgd",
    eps: float | None = None,
    steps: int = 20,
    alpha: float | None = None,
    n_examples: int | None = None,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    seed: int = 0,
    subset_seed: int | None = None,
    progress: bool = True,
    log_rows: bool = True,
) -> SweepResult:
    """Clean and robust accuracy of ``model`` at each λ of ``lambdas``.

    Args:
        model: a :class:`ConditionalModel` (λ is set for each row, then restored) or any plain
            classifier taking [0, 1] images (then ``lambdas`` must be None: one row).
        data: a ``Dataset`` / ``DataLoader`` yielding (image, label) with images in [0, 1], or
            an ``(images, labels)`` tensor pair.
        lambdas: the λ values (default :data:`DEFAULT_LAMBDAS` for a conditional model).
        attack: a name of :mod:`oat_plugins.attacks` (``available_attacks()``, or any
            torchattacks class name; default ``'pgd'``: PGD-20, L∞, ε = 8/255), or a factory
            ``callable(model) -> torchattacks Attack`` (``eps``/``steps``/``alpha`` are then
            ignored).
        eps, steps, alpha: the attack's radius (default 8/255 for L∞, 0.5 for L2), iterations
            and step size (default 2.5·eps/steps; 1.25·eps for ``fgsm-rs``).
        n_examples: use the first ``n_examples`` examples (default all).
        batch_size: batch size for tensors and datasets (a DataLoader keeps its own).
        device: where to evaluate; the model is moved there (default: where it is).
        seed: seeds the attack's random start, identically for every λ.
        subset_seed: with ``n_examples``, evaluate a random subset of that size drawn with
            this seed instead of the first examples (for data sorted by class, such as an
            ImageFolder); not for a DataLoader.
        progress: show a tqdm progress bar.
        log_rows: log one INFO line per λ (``fit`` reports its own epoch line instead).

    Returns:
        a :class:`SweepResult` with one row per λ.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    lams = _check_lambdas(model, lambdas)
    if n_examples is not None and (int(n_examples) != n_examples or n_examples < 1):
        raise ValueError(f"n_examples must be a positive integer, got {n_examples!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n_classes = int(getattr(model, "num_classes", 10) or 10)
    config = resolve_attack(attack, eps=eps, steps=steps, alpha=alpha, n_classes=n_classes,
                            seed=seed)
    if (isinstance(model, ConditionalModel) and not model.deterministic
            and config.name != "eot-pgd"):
        logger.warning(
            "the model draws fresh randomness at every forward (model.deterministic is False): "
            "an attack without expectation over transformation overestimates its robustness; "
            "use attack='eot-pgd' (or an EOT attack factory) for an honest number"
        )
    if device is not None:
        model.to(device)
    dev = model_device(model)
    batches, n_total = _batches(data, n_examples, batch_size, subset_seed)

    was_training = model.training
    model.eval()
    adversary = config.factory(model)
    if isinstance(adversary, Attack):
        adversary.set_device(dev)
    clean_correct = [0] * len(lams)
    robust_correct = [0] * len(lams)
    seconds = [0.0] * len(lams)
    exits = isinstance(model, ConditionalModel) and model.exits is not None
    macs = [0.0] * len(lams)  # summed mean MACs per image × images (models with exits)
    backbone_macs = 0
    count = 0
    bar = tqdm(total=(n_total or 0) * len(lams) or None, disable=not progress,
               desc=f"eval {config.description}", unit="img", leave=False)
    try:
        for batch_index, (x, y) in enumerate(batches):
            x = x.to(dev)
            y = y.to(dev)
            count += x.shape[0]
            for i, lam in enumerate(lams):
                start = time.perf_counter()
                with _at(model, lam):
                    clean, robust = _correct_counts(model, adversary, x, y,
                                                    seed * 1_000_003 + batch_index)
                clean_correct[i] += clean
                robust_correct[i] += robust
                seconds[i] += time.perf_counter() - start
                if exits:
                    with model.at(lam):
                        cost = model.cost(x)
                    macs[i] += cost["mean_macs"] * x.shape[0]
                    backbone_macs = cost["backbone_macs"]
                bar.update(x.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    if count == 0:
        raise ValueError("the data yielded no examples")
    rows = [
        SweepRow(lam, clean_correct[i] / count, robust_correct[i] / count, count,
                 config.description, round(seconds[i], 3),
                 macs[i] / count / backbone_macs if exits else None)
        for i, lam in enumerate(lams)
    ]
    meta = {
        "attack": config.description,
        "attack_name": config.name,
        "norm": config.norm,
        "eps": config.eps,
        "steps": config.steps,
        "alpha": config.alpha,
        "seed": seed,
        "n_examples": count,
        "subset": "all" if count == _total(data) else
        "first" if subset_seed is None else f"random (seed {subset_seed})",
        "model": type(model).__name__,
        "method": getattr(model, "method_name", None),
        "backbone": getattr(model, "backbone_name", None),
    }
    for r in rows if log_rows else ():
        logger.info("λ=%s clean %.2f %% robust %.2f %% (%s, n=%d)%s",
                    "–" if r.lam is None else f"{r.lam:g}", 100 * r.clean_acc,
                    100 * r.robust_acc, r.attack, r.n,
                    "" if r.mac_fraction is None else
                    f", MACs {100 * r.mac_fraction:.1f} % of the backbone's")
    return SweepResult(rows, meta)
