"""Helpers shared by the command modules (argument types, model loading)."""

from __future__ import annotations

import argparse
import json
import math
import os
from fractions import Fraction
from typing import Any

from torch import nn

from ..checkpoint import from_checkpoint, read_checkpoint
from ..exported import from_exported, is_exported


def number(text: str) -> float:
    """A finite number, also written as a fraction such as ``8/255``."""
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"expected a number such as 0.031 or 8/255, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_number(text: str) -> float:
    """A positive number, also written as a fraction such as ``8/255``."""
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def unit_float(text: str) -> float:
    value = number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value:g}")
    return value


def parse_lambdas(text: str) -> list[float]:
    """``'0,0.5,1'`` → ``[0.0, 0.5, 1.0]``; ``argparse`` type for ``--lambdas``."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise argparse.ArgumentTypeError(
            f"--lambdas must be a comma-separated list of numbers in [0, 1], got {text!r}"
        )
    values = []
    for part in parts:
        try:
            values.append(number(part))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"--lambdas: {part!r} is not a number (expected e.g. 0,0.5,1)"
            ) from None
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise argparse.ArgumentTypeError(f"--lambdas: values must be in [0, 1], got {bad}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"--lambdas has repeated values: {text!r}")
    return values


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def load_any_model(path: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """A conditional model (saved, or inside a training checkpoint) or an exported plain
    model, from one weights-only file."""
    payload = read_checkpoint(path, map_location)
    source = repr(os.fspath(path))
    if is_exported(payload):
        return from_exported(payload, source=source)
    return from_checkpoint(payload, source=source)


def add_density_argument(parser: argparse.ArgumentParser) -> None:
    """``--density D``: the masked model's density knob (``ConditionalModel.set_density``)."""
    parser.add_argument("--density", type=positive_number, default=None, metavar="D",
                        help="a masked model (floats): first keep the largest weights of its "
                        "trained mask at density D, at most the trained one "
                        "(model.set_density); default: as saved")


def apply_density(model: nn.Module, density: float | None, checkpoint: object) -> None:
    """Set ``--density`` on a conditional model; refuse it for a plain one."""
    if density is None:
        return
    if not hasattr(model, "set_density"):
        raise ValueError(f"{checkpoint!r} holds a plain (exported) model, which has no "
                         "density knob; drop --density")
    model.set_density(density)
