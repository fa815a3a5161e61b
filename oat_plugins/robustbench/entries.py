"""RobustBench leaderboard entries: the JSON schema, building, validating, reading, writing.

An entry has exactly RobustBench's fields (``model_info/<dataset>/<threat>/<id>.json`` in the
RobustBench repository): ``link, name, authors, additional_data, number_forward_passes,
dataset, venue, architecture, eps, clean_acc, reported, autoattack_acc`` and optionally
``external, footnote, unreliable``. Accuracies are percent strings (``"85.20"``), ``eps`` is a
string (``"8/255"`` or ``"0.5"``).

Entries written by oat-plugins are one per (model, λ). The method and λ are in ``name``; the
data the accuracies were measured on, the number of images and the attack are in ``footnote``
(see :data:`FOOTNOTE_PATTERN`), because RobustBench has no field for them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

from .._io import atomic_write_text

__all__ = [
    "DATASETS",
    "THREAT_MODELS",
    "REQUIRED_FIELDS",
    "OPTIONAL_FIELDS",
    "DEFAULT_EPS",
    "FOOTNOTE_PATTERN",
    "check_dataset",
    "check_threat_model",
    "format_eps",
    "parse_eps",
    "format_acc",
    "entry_id",
    "make_entry",
    "validate_entry",
    "write_entry",
    "entry_path",
    "read_entry",
    "measured_on",
]

DATASETS: tuple[str, ...] = ("cifar10", "cifar100")
THREAT_MODELS: tuple[str, ...] = ("Linf", "L2")
DEFAULT_EPS: dict[str, float] = {"Linf": 8 / 255, "L2": 0.5}

REQUIRED_FIELDS: tuple[str, ...] = (
    "link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
    "architecture", "eps", "clean_acc", "reported", "autoattack_acc",
)
OPTIONAL_FIELDS: tuple[str, ...] = ("external", "footnote", "unreliable")

FOOTNOTE_PATTERN = re.compile(
    r"measured on (?P<data>.+?), first (?P<n>\d+) test images"
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
_PERCENT_RE = re.compile(r"^\d{1,3}(\.\d+)?$")


def check_dataset(dataset: str) -> str:
    """Return ``dataset`` if supported (``cifar10``, ``cifar100``), else raise ValueError."""
    value = getattr(dataset, "value", dataset)  # accept robustbench's BenchmarkDataset
    if value not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; supported: {', '.join(DATASETS)}")
    return value


def check_threat_model(threat_model: str) -> str:
    """Return ``threat_model`` if supported (``Linf``, ``L2``), else raise ValueError."""
    value = getattr(threat_model, "value", threat_model)
    if value not in THREAT_MODELS:
        raise ValueError(
            f"unknown threat model {threat_model!r}; supported: {', '.join(THREAT_MODELS)}"
        )
    return value


def format_eps(eps: float) -> str:
    """RobustBench's eps string: ``8/255`` for multiples of 1/255 (L∞ style), else ``0.5``."""
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and round(k) >= 1 and eps < 1 and not _is_short_decimal(eps):
        return f"{round(k)}/255"
    return f"{eps:g}"


def _is_short_decimal(eps: float) -> bool:
    return len(f"{eps:g}") <= 4


def parse_eps(text: str) -> float:
    """Inverse of :func:`format_eps` (also accepts plain decimals such as ``0.031``)."""
    text = str(text).strip()
    if "/" in text:
        return float(Fraction(text))
    return float(text)


def format_acc(acc: float) -> str:
    """A fraction in [0, 1] as RobustBench's percent string with two decimals."""
    if not 0.0 <= acc <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1], got {acc!r}")
    return f"{100 * acc:.2f}"


def entry_id(model_name: str, lam: float | None) -> str:
    """File stem / model id for one entry: ``<model_name>`` or ``<model_name>_lam0p3``.

    '.' is avoided (timm reads it as a pretrained tag), so λ=0.3 becomes ``lam0p3``.
    """
    if not _NAME_RE.match(model_name):
        raise ValueError(
            f"model name {model_name!r} must start with a letter or digit and contain only "
            "letters, digits, '_' and '-'"
        )
    if lam is None:
        return model_name
    return f"{model_name}_lam" + f"{lam:g}".replace(".", "p").replace("-", "m")


def make_entry(
    *,
    model_name: str,
    dataset: str,
    threat_model: str,
    eps: float,
    clean_acc: float,
    robust_acc: float,
    architecture: str,
    method: str | None = None,
    lam: float | None = None,
    data_label: str,
    n_examples: int,
    attack: str = "standard AutoAttack",
    link: str = "",
    authors: str = "",
    venue: str = "",
    additional_data: bool = False,
) -> dict[str, Any]:
    """Build one leaderboard entry with exactly RobustBench's fields.

    ``name`` reads ``"<model_name> (<method>, λ=<lam>)"``; ``footnote`` records the data,
    the number of images and the attack (``measured on <data>, first <n> test images``).
    """
    check_dataset(dataset)
    check_threat_model(threat_model)
    if method and lam is not None:
        name = f"{model_name} ({method}, λ={lam:g})"
    elif lam is not None:
        name = f"{model_name} (λ={lam:g})"
    elif method:
        name = f"{model_name} ({method})"
    else:
        name = model_name
    robust = format_acc(robust_acc)
    entry: dict[str, Any] = {
        "link": link,
        "name": name,
        "authors": authors,
        "additional_data": bool(additional_data),
        "number_forward_passes": 1,
        "dataset": dataset,
        "venue": venue,
        "architecture": architecture,
        "eps": format_eps(eps),
        "clean_acc": format_acc(clean_acc),
        "reported": "",  # nothing was reported in a paper
        "autoattack_acc": robust,
        "footnote": (
            f"oat-plugins entry: measured on {data_label}, first {n_examples} test images, "
            f"{attack}, {threat_model} eps={format_eps(eps)}."
        ),
        "unreliable": False,
    }
    validate_entry(entry)
    return entry


def validate_entry(entry: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``entry`` follows RobustBench's schema (types included)."""
    missing = [k for k in REQUIRED_FIELDS if k not in entry]
    extra = [k for k in entry if k not in REQUIRED_FIELDS + OPTIONAL_FIELDS]
    if missing or extra:
        raise ValueError(f"bad leaderboard entry: missing {missing}, unexpected {extra}")
    for key in ("link", "name", "authors", "dataset", "venue", "architecture", "eps"):
        if not isinstance(entry[key], str):
            raise ValueError(f"field {key!r} must be a string, got {entry[key]!r}")
    if not isinstance(entry["additional_data"], bool):
        raise ValueError("field 'additional_data' must be a bool")
    n_fwd = entry["number_forward_passes"]
    if not isinstance(n_fwd, int) or isinstance(n_fwd, bool) or n_fwd < 1:
        raise ValueError("field 'number_forward_passes' must be a positive int")
    for key in ("clean_acc", "autoattack_acc") + (("external",) if "external" in entry else ()):
        if not isinstance(entry[key], str) or not _PERCENT_RE.match(entry[key]):
            raise ValueError(f"field {key!r} must be a percent string like '85.20'")
        if not 0 <= float(entry[key]) <= 100:
            raise ValueError(f"field {key!r} must be within [0, 100]")
    if not isinstance(entry["reported"], str):
        raise ValueError("field 'reported' must be a string")
    parse_eps(entry["eps"])
    if "unreliable" in entry and not isinstance(entry["unreliable"], bool):
        raise ValueError("field 'unreliable' must be a bool")
    if "footnote" in entry and entry["footnote"] is not None and not isinstance(
            entry["footnote"], str):
        raise ValueError("field 'footnote' must be a string or null")


def measured_on(entry: Mapping[str, Any]) -> str | None:
    """The data label an oat-plugins entry was measured on (from its footnote), else None."""
    match = FOOTNOTE_PATTERN.search(entry.get("footnote") or "")
    if match is None:
        return None
    return f"{match['data']}, n={match['n']}"


def write_entry(entry: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Validate ``entry`` and write it to ``path`` as JSON, atomically (temp file + replace)."""
    validate_entry(entry)
    path = Path(path)
    atomic_write_text(json.dumps(dict(entry), indent=2, ensure_ascii=False) + "\n", path)
    return path


def entry_path(results_dir: str | os.PathLike, dataset: str, threat_model: str,
               stem: str) -> Path:
    """RobustBench's layout: ``<results_dir>/<dataset>/<threat_model>/<stem>.json``."""
    return (Path(results_dir) / check_dataset(dataset) / check_threat_model(threat_model)
            / f"{stem}.json")


def read_entry(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate one leaderboard JSON file."""
    with open(path, encoding="utf-8") as f:
        entry = json.load(f)
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: a leaderboard entry must be a JSON object")
    try:
        validate_entry(entry)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    return entry
