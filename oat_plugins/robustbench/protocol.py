"""RobustBench's evaluation protocol for oat-plugins models at a fixed λ.

First n test images, ToTensor only, reference standard AutoAttack (pyautoattack, through
:mod:`oat_plugins.robustbench.compat`; APGD-CE, APGD-T with 9 targets, FAB-T, Square with
5000 queries, 100 iterations) with a fixed seed. Clean accuracy and robust accuracy are
computed on the same images; with ``to_disk`` one RobustBench JSON entry is written per λ.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .._device import model_device
from .data import NUM_CLASSES, load_data
from .entries import (
    DEFAULT_EPS,
    check_dataset,
    check_threat_model,
    entry_id,
    entry_path,
    make_entry,
    write_entry,
)

__all__ = [
    "BenchmarkResult",
    "NondeterministicModelError",
    "benchmark",
    "check_lambda",
    "model_at",
    "prepare_model",
    "architecture_of",
    "AUTOATTACK_BUDGET_KEYS",
]

logger = logging.getLogger(__name__)

AUTOATTACK_BUDGET_KEYS = ("n_iter", "n_target_classes", "n_queries")


class NondeterministicModelError(ValueError):
    """The model's forward is random (e.g. FLOAT with resampled noise): RobustBench entries
    need a deterministic forward at one fixed condition."""


class BenchmarkResult(NamedTuple):
    """Clean and robust accuracy as fractions in [0, 1] (unpacks like robustbench's tuple)."""

    clean_acc: float
    robust_acc: float


def check_lambda(lam: Any) -> float:
    """Return ``lam`` as a float if it is a real number in [0, 1], else raise ValueError."""
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise ValueError(f"λ must be a real number in [0, 1], got {lam!r}")
    value = float(lam)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"λ must be in [0, 1], got {lam!r}")
    return value


def _is_conditional(model: Any) -> bool:
    return hasattr(model, "set_lambda") and hasattr(model, "at")


def _load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    import oat_plugins

    loader = getattr(oat_plugins, "load", None)
    if loader is None:
        raise RuntimeError("oat_plugins.load is not available in this installation")
    return loader(path, map_location=map_location)


def architecture_of(model: nn.Module) -> str:
    """A readable architecture name: the timm backbone name when known, else the class."""
    name = getattr(model, "backbone_name", None)
    if isinstance(name, str) and name:
        return name
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        model = backbone
    for module in model.modules():
        cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
        if isinstance(cfg, Mapping) and cfg.get("architecture"):
            return str(cfg["architecture"])
    return type(model).__name__


def prepare_model(model: nn.Module | str | os.PathLike, lam: float | None) -> nn.Module:
    """Load (if a path), validate and set ``model`` to λ=``lam`` in eval mode; return it.

    A conditional model needs ``lam`` in [0, 1]; a plain ``nn.Module`` takes ``lam=None``
    only. A model that declares ``deterministic = False`` is refused with
    :class:`NondeterministicModelError`. The model is changed in place (see :func:`model_at`
    for a version that restores it).
    """
    if isinstance(model, (str, os.PathLike)):
        model = _load_checkpoint(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module or a checkpoint path, got {type(model).__name__}")
    if getattr(model, "deterministic", True) is False:
        method = getattr(model, "method_name", type(model).__name__)
        raise NondeterministicModelError(
            f"{method} model has a random forward (resampled noise); RobustBench needs a "
            "deterministic forward at a fixed condition. Use fixed noise (the default), or "
            "evaluate it with an EOT attack outside the leaderboard protocol."
        )
    if _is_conditional(model):
        if lam is None:
            raise ValueError("a conditional model needs lam= (a λ in [0, 1])")
        model.set_lambda(check_lambda(lam))
    elif lam is not None:
        raise ValueError(
            f"lam={lam!r} given but {type(model).__name__} is not a conditional model"
        )
    return model.eval()


@contextmanager
def model_at(model: nn.Module | str | os.PathLike, lam: float | None) -> Iterator[nn.Module]:
    """Like :func:`prepare_model`, restoring the model's previous λ and train/eval mode on
    exit."""
    if isinstance(model, (str, os.PathLike)):
        model = _load_checkpoint(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module or a checkpoint path, got {type(model).__name__}")
    was_training = model.training
    scoped = _is_conditional(model) and lam is not None
    try:
        with model.at(check_lambda(lam)) if scoped else contextlib.nullcontext():
            yield prepare_model(model, lam)
    finally:
        model.train(was_training)


@contextmanager
def _on_device(model: nn.Module, device: torch.device | str | None) -> Iterator[torch.device]:
    """Run on ``device`` (default: where the model is), moving the model back afterwards."""
    home = model_device(model)
    dev = torch.device(device) if device is not None else home
    model.to(dev)
    try:
        yield dev
    finally:
        if dev != home:
            model.to(home)


def _check_deterministic(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        first = model(x)
        second = model(x)
    if first.shape != second.shape or not torch.allclose(first, second, rtol=1e-4, atol=1e-5):
        raise NondeterministicModelError(
            f"{type(model).__name__}: two forwards of the same batch differ; RobustBench "
            "needs a deterministic forward (no resampled noise, eval mode)."
        )


def _apply_budget(adversary: Any, budget: Mapping[str, int]) -> None:
    unknown = set(budget) - set(AUTOATTACK_BUDGET_KEYS)
    if unknown:
        raise ValueError(f"unknown AutoAttack budget keys {sorted(unknown)}; "
                         f"allowed: {AUTOATTACK_BUDGET_KEYS}")
    for key, value in budget.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"AutoAttack budget {key} must be a positive int, got {value!r}")
    if "n_iter" in budget:
        n = budget["n_iter"]
        for attack in (adversary.apgd, adversary.apgd_targeted):
            attack.n_iter = attack.n_iter_orig = n
            attack.n_iter_2 = max(int(0.22 * n), 1)
            attack.n_iter_min = max(int(0.06 * n), 1)
            attack.size_decr = max(int(0.03 * n), 1)
        adversary.fab.n_iter = n
    if "n_target_classes" in budget:
        adversary.apgd_targeted.n_target_classes = budget["n_target_classes"]
        adversary.fab.n_target_classes = budget["n_target_classes"]
    if "n_queries" in budget:
        adversary.square.n_queries = budget["n_queries"]


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            out.append(model(x[i:i + batch_size]).argmax(1).cpu())
    return torch.cat(out)


def benchmark(
    model: nn.Module | str | os.PathLike,
    lam: float | None = None,
    dataset: str = "cifar10",
    threat_model: str = "Linf",
    n_examples: int = 10000,
    data: Any = None,
    batch_size: int = 100,
    eps: float | None = None,
    to_disk: bool = False,
    model_name: str | None = None,
    *,
    results_dir: str | os.PathLike = "model_info",
    data_label: str | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    attack_budget: Mapping[str, int] | None = None,
    progress: bool = True,
) -> BenchmarkResult:
    """Evaluate ``model`` at λ=``lam`` with RobustBench's protocol.

    Args:
        model: a conditional model, a checkpoint path (loaded with ``oat_plugins.load``), or
            any deterministic ``nn.Module`` taking [0, 1] images (then ``lam`` must be None).
        lam: the condition in [0, 1] for a conditional model.
        dataset: ``"cifar10"`` or ``"cifar100"``.
        threat_model: ``"Linf"`` (default eps 8/255) or ``"L2"`` (default eps 0.5).
        n_examples: the first n test images (see :func:`oat_plugins.robustbench.data.load_data`
            for how ``data`` is read and ordered).
        data: where the test images come from (None: torchvision files under ``./data``).
        batch_size: images per AutoAttack chunk (the progress bar advances per chunk).
        eps: the perturbation budget; None for the threat model's standard one.
        to_disk: write one RobustBench JSON entry to
            ``<results_dir>/<dataset>/<threat_model>/<model_name>[_lam<λ>].json``.
        model_name: the entry's id (needed with ``to_disk``).
        results_dir: the root folder for ``to_disk``.
        data_label: how the data is named in the entry (default derived from ``data``).
        device: where to run (default: the model's device; moved back afterwards).
        seed: AutoAttack's seed (fixed, so runs are reproducible).
        attack_budget: reduce AutoAttack for smoke tests, keys ``n_iter``,
            ``n_target_classes``, ``n_queries``. The entry's footnote then says so; such
            numbers are not comparable with the leaderboard.
        progress: show a tqdm progress bar.

    Returns:
        :class:`BenchmarkResult` ``(clean_acc, robust_acc)`` as fractions.

    Raises:
        ValueError: unknown dataset or threat model, λ out of range, bad data or arguments.
        NondeterministicModelError: the forward is random.
    """
    from tqdm.auto import tqdm

    from . import compat

    dataset = check_dataset(dataset)
    threat_model = check_threat_model(threat_model)
    if eps is None:
        eps = DEFAULT_EPS[threat_model]
    if not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if lam is not None:
        check_lambda(lam)  # fail before reading data
    if to_disk and not model_name:
        raise ValueError("to_disk=True needs model_name=")
    stem = entry_id(model_name, lam) if model_name else None  # validates the name early

    x, y, label = load_data(dataset, n_examples, data, data_label)
    AutoAttack = compat.autoattack_class()

    with model_at(model, lam) as net, _on_device(net, device) as dev:
        with torch.no_grad():
            probe = net(x[:2].to(dev)) if x.shape[0] else None
        if probe is not None and probe.shape[-1] != NUM_CLASSES[dataset]:
            raise ValueError(f"the model outputs {probe.shape[-1]} classes, {dataset} has "
                             f"{NUM_CLASSES[dataset]}")
        _check_deterministic(net, x[: min(8, x.shape[0])].to(dev))
        adversary = AutoAttack(net, norm=threat_model, eps=float(eps), seed=seed,
                               version="standard", device=dev)
        if attack_budget:
            _apply_budget(adversary, attack_budget)

        n = x.shape[0]
        clean_correct = 0
        robust_correct = 0
        bar = tqdm(total=n, desc=f"AutoAttack {threat_model} eps={eps:.4g}", unit="img",
                   disable=not progress)
        try:
            for start in range(0, n, batch_size):
                xb, yb = x[start:start + batch_size], y[start:start + batch_size]
                clean_pred = _predict(net, xb.to(dev), batch_size)
                x_adv = adversary.run_standard_evaluation(xb.to(dev), yb.to(dev), bs=batch_size)
                adv_pred = _predict(net, x_adv.to(dev), batch_size)
                clean_correct += int((clean_pred == yb).sum())
                robust_correct += int(((adv_pred == yb) & (clean_pred == yb)).sum())
                bar.update(xb.shape[0])
                seen = start + xb.shape[0]
                bar.set_postfix(clean=f"{clean_correct / seen:.1%}",
                                robust=f"{robust_correct / seen:.1%}")
        finally:
            bar.close()
        result = BenchmarkResult(clean_correct / n, robust_correct / n)
        logger.info("%s λ=%s on %s (n=%d): clean %.2f%%, robust %.2f%% (%s eps=%.4g)",
                    model_name or type(net).__name__, lam, label, n, 100 * result.clean_acc,
                    100 * result.robust_acc, threat_model, eps)

        if to_disk:
            attack = "standard AutoAttack"
            if attack_budget:
                budget = ", ".join(f"{k}={v}" for k, v in sorted(attack_budget.items()))
                attack = f"reduced AutoAttack ({budget}; not comparable)"
            entry = make_entry(
                model_name=model_name, dataset=dataset, threat_model=threat_model,
                eps=float(eps), clean_acc=result.clean_acc, robust_acc=result.robust_acc,
                architecture=architecture_of(net),
                method=getattr(net, "method_name", None), lam=lam,
                data_label=label, n_examples=n, attack=attack,
            )
            path = write_entry(entry, entry_path(results_dir, dataset, threat_model, stem))
            logger.info("wrote %s", path)
    return result


def written_path(results_dir: str | os.PathLike, dataset: str, threat_model: str,
                 model_name: str, lam: float | None) -> Path:
    """Where :func:`benchmark` with ``to_disk=True`` writes the entry for (model_name, λ)."""
    return entry_path(results_dir, dataset, threat_model, entry_id(model_name, lam))
