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

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torchattacks
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchattacks.attack import Attack
from tqdm.auto import tqdm

from ._device import model_device
from ._io import atomic_write_bytes, atomic_write_text
from .condition import validate_lambda
from .model import ConditionalModel

logger = logging.getLogger(__name__)

DEFAULT_LAMBDAS: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
"""The λ sweep used when a :class:`ConditionalModel` is evaluated with ``lambdas=None``."""

AttackFactory = Callable[[nn.Module], Attack]
Data = Dataset | DataLoader | tuple[torch.Tensor, torch.Tensor] | Sequence[torch.Tensor]


# -- attacks ------------------------------------------------------------------------------


class CWLinf(torchattacks.PGD):
    """L∞ PGD on the Carlini–Wagner margin loss (the "CW∞" of the adversarial-training
    literature): maximise ``max_{j≠y} z_j − z_y`` inside the ε-ball. torchattacks' own ``CW``
    is an unbounded L2 attack, whose success rate is not a robust accuracy at ε."""

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 20, random_start: bool = True) -> None:
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
        self.attack = "CWLinf"
        self.supported_mode = ["default"]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        adv = images.clone()
        if self.random_start:
            adv = (adv + torch.empty_like(adv).uniform_(-self.eps, self.eps)).clamp(0, 1)
        for _ in range(self.steps):
            adv.requires_grad_(True)
            logits = self.get_logits(adv)
            true = logits.gather(1, labels[:, None]).squeeze(1)
            other = logits.masked_fill(
                nn.functional.one_hot(labels, logits.shape[1]).bool(), -math.inf
            ).amax(1)
            grad = torch.autograd.grad((other - true).sum(), adv)[0]
            adv = adv.detach() + self.alpha * grad.sign()
            adv = (images + (adv - images).clamp(-self.eps, self.eps)).clamp(0, 1).detach()
        return adv


@dataclass(frozen=True)
class _AttackSpec:
    norm: str  # "Linf" or "L2"
    iterative: bool
    build: Callable[..., Attack]
    label: str


def _pgd(model, eps, steps, alpha, n_classes, seed):
    return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)


def _pgdl2(model, eps, steps, alpha, n_classes, seed):
    return torchattacks.PGDL2(model, eps=eps, alpha=alpha, steps=steps, random_start=True)


def _eotpgd(model, eps, steps, alpha, n_classes, seed):
    return torchattacks.EOTPGD(model, eps=eps, alpha=alpha, steps=steps, eot_iter=10,
                               random_start=True)


def _fgsm(model, eps, steps, alpha, n_classes, seed):
    return torchattacks.FGSM(model, eps=eps)


def _cw(model, eps, steps, alpha, n_classes, seed):
    return CWLinf(model, eps=eps, alpha=alpha, steps=steps)


def _apgd(model, eps, steps, alpha, n_classes, seed):
    return torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, seed=seed, loss="ce")


def _apgdt(model, eps, steps, alpha, n_classes, seed):
    return torchattacks.APGDT(model, norm="Linf", eps=eps, steps=steps, seed=seed,
                              n_classes=n_classes)


def _square(model, eps, steps, alpha, n_classes, seed):
    return torchattacks.Square(model, norm="Linf", eps=eps, n_queries=steps, seed=seed)


def _autoattack(model, eps, steps, alpha, n_classes, seed):
    return torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard",
                                   n_classes=n_classes, seed=seed)


ATTACKS: dict[str, _AttackSpec] = {
    "pgd": _AttackSpec("Linf", True, _pgd, "PGD-{steps}"),
    "fgsm": _AttackSpec("Linf", False, _fgsm, "FGSM"),
    "cw": _AttackSpec("Linf", True, _cw, "CW∞-{steps}"),
    "apgd": _AttackSpec("Linf", True, _apgd, "APGD-CE-{steps}"),
    "apgd-t": _AttackSpec("Linf", True, _apgdt, "APGD-T-{steps}"),
    "square": _AttackSpec("Linf", True, _square, "Square-{steps}q"),
    "autoattack": _AttackSpec("Linf", False, _autoattack, "AutoAttack (torchattacks preset)"),
    "eot-pgd": _AttackSpec("Linf", True, _eotpgd, "EOT-PGD-{steps}×10"),
    "pgd-l2": _AttackSpec("L2", True, _pgdl2, "PGD-L2-{steps}"),
}
"""Attack names accepted by :func:`evaluate` (``attack=``) and ``oat-plugins eval --attack``.

``pgd`` (L∞ PGD with random start), ``fgsm``, ``cw`` (L∞ PGD on the CW margin loss),
``apgd`` / ``apgd-t`` (torchattacks' APGD-CE / APGD-T), ``square`` (``steps`` = queries),
``autoattack`` (torchattacks' *preset*, fewer iterations than the RobustBench leaderboard's;
use ``oat_plugins.robustbench`` for a leaderboard-comparable number), ``eot-pgd`` (PGD with
10-sample expectation over transformation, for non-deterministic models) and ``pgd-l2``."""

_DEFAULT_EPS = {"Linf": 8 / 255, "L2": 0.5}


def available_attacks() -> list[str]:
    """Names accepted by ``evaluate(..., attack=...)``."""
    return list(ATTACKS)


def _format_eps(eps: float, norm: str) -> str:
    """8/255 for the usual L∞ radii and steps, else 4 significant digits."""
    if norm == "Linf" and eps < 1:
        k = round(eps * 255)
        if k >= 1 and math.isclose(k, eps * 255, rel_tol=1e-6):
            return f"{k}/255"
    return f"{eps:.4g}"


@dataclass(frozen=True)
class AttackConfig:
    """A resolved attack: what :func:`evaluate` runs, and how it is described in results."""

    name: str
    norm: str | None
    eps: float | None
    steps: int | None
    alpha: float | None
    seed: int
    description: str
    factory: AttackFactory = field(repr=False, compare=False)


def resolve_attack(
    attack: str | AttackFactory,
    *,
    eps: float | None = None,
    steps: int = 20,
    alpha: float | None = None,
    n_classes: int = 10,
    seed: int = 0,
) -> AttackConfig:
    """Turn an attack name (see :data:`ATTACKS`) or a factory ``callable(model) -> Attack``
    (a torchattacks attack) into an :class:`AttackConfig`. ``eps`` defaults to 8/255 for L∞
    and 0.5 for L2 attacks; ``alpha`` (step size) to ``2.5·eps/steps`` (Madry et al.)."""
    if callable(attack) and not isinstance(attack, str):
        name = getattr(attack, "__name__", type(attack).__name__)
        return AttackConfig(name, None, eps, None, alpha, seed, f"custom attack {name}", attack)
    if not isinstance(attack, str) or attack.lower() not in ATTACKS:
        raise ValueError(
            f"unknown attack {attack!r}; available attacks: {', '.join(ATTACKS)} "
            "(or pass a callable model -> Attack)"
        )
    name = attack.lower()
    spec = ATTACKS[name]
    eps = _DEFAULT_EPS[spec.norm] if eps is None else float(eps)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    if spec.iterative:
        alpha = 2.5 * eps / steps if alpha is None else float(alpha)
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
    else:
        alpha = None
    norm_sym = "L∞" if spec.norm == "Linf" else "L2"
    details = [f"{norm_sym}", f"ε={_format_eps(eps, spec.norm)}"]
    if alpha is not None and name in ("pgd", "cw", "eot-pgd", "pgd-l2"):
        details.append(f"α={_format_eps(alpha, spec.norm)}")
    description = f"{spec.label.format(steps=steps)} ({', '.join(details)})"

    def factory(model: nn.Module) -> Attack:
        return spec.build(model, eps, steps, alpha, n_classes, seed)

    return AttackConfig(name, spec.norm, eps, steps if spec.iterative else None, alpha, seed,
                        description, factory)


# -- results ------------------------------------------------------------------------------


@dataclass
class SweepRow:
    """One λ of a sweep. Accuracies are fractions in [0, 1]; ``lam`` is None for a plain
    (unconditioned) model."""

    lam: float | None
    clean_acc: float
    robust_acc: float
    n: int
    attack: str
    seconds: float = 0.0


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

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": [asdict(r) for r in self.rows]}

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

    def to_markdown(self, *, label: str | None = None) -> str:
        """A markdown table (accuracies in percent)."""
        head = "| λ | clean acc (%) | robust acc (%) | n | attack |"
        if label is not None:
            head = "| model " + head
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for r in self.rows:
            lam = "–" if r.lam is None else f"{r.lam:g}"
            cells = [lam, f"{100 * r.clean_acc:.1f}", f"{100 * r.robust_acc:.1f}", str(r.n),
                     r.attack]
            if label is not None:
                cells.insert(0, label)
            lines.append("| " + " | ".join(cells) + " |")
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
) -> SweepResult:
    """Clean and robust accuracy of ``model`` at each λ of ``lambdas``.

    Args:
        model: a :class:`ConditionalModel` (λ is set for each row, then restored) or any plain
            classifier taking [0, 1] images (then ``lambdas`` must be None: one row).
        data: a ``Dataset`` / ``DataLoader`` yielding (image, label) with images in [0, 1], or
            an ``(images, labels)`` tensor pair.
        lambdas: the λ values (default :data:`DEFAULT_LAMBDAS` for a conditional model).
        attack: a name from :data:`ATTACKS` (default ``'pgd'``: PGD-20, L∞, ε = 8/255), or a
            factory ``callable(model) -> torchattacks Attack`` (``eps``/``steps``/``alpha``
            are then ignored).
        eps, steps, alpha: the attack's radius (default 8/255 for L∞, 0.5 for L2), iterations
            and step size (default 2.5·eps/steps).
        n_examples: use the first ``n_examples`` examples (default all).
        batch_size: batch size for tensors and datasets (a DataLoader keeps its own).
        device: where to evaluate; the model is moved there (default: where it is).
        seed: seeds the attack's random start, identically for every λ.
        subset_seed: with ``n_examples``, evaluate a random subset of that size drawn with
            this seed instead of the first examples (for data sorted by class, such as an
            ImageFolder); not for a DataLoader.
        progress: show a tqdm progress bar.

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
    previous_lam = model.lam if isinstance(model, ConditionalModel) else None
    model.eval()
    adversary = config.factory(model)
    if isinstance(adversary, Attack):
        adversary.set_device(dev)
    clean_correct = [0] * len(lams)
    robust_correct = [0] * len(lams)
    seconds = [0.0] * len(lams)
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
                if lam is not None:
                    model.set_lambda(lam)
                with torch.no_grad():
                    correct = model(x).argmax(1) == y
                clean_correct[i] += int(correct.sum())
                if correct.any():
                    xs, ys = x[correct].clone(), y[correct].clone()
                    with torch.random.fork_rng(devices=_rng_devices(dev)):
                        torch.manual_seed(seed * 1_000_003 + batch_index)
                        adv = adversary(xs, ys)
                    model.eval()  # torchattacks restores the mode it found; keep eval
                    with torch.no_grad():
                        robust_correct[i] += int((model(adv).argmax(1) == ys).sum())
                seconds[i] += time.perf_counter() - start
                bar.update(x.shape[0])
    finally:
        bar.close()
        model.train(was_training)
        if previous_lam is not None:
            model.set_lambda(previous_lam)
    if count == 0:
        raise ValueError("the data yielded no examples")
    rows = [
        SweepRow(lam, clean_correct[i] / count, robust_correct[i] / count, count,
                 config.description, round(seconds[i], 3))
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
    for r in rows:
        logger.info("λ=%s clean %.2f %% robust %.2f %% (%s, n=%d)",
                    "–" if r.lam is None else f"{r.lam:g}", 100 * r.clean_acc,
                    100 * r.robust_acc, r.attack, r.n)
    return SweepResult(rows, meta)
