"""Helpers shared by the command modules (argument parsing of λ lists, model loading)."""

from __future__ import annotations

import argparse
import math
import os
from fractions import Fraction

from torch import nn

from ..exported import from_exported, is_exported
from ..model import from_checkpoint, read_checkpoint


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
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--lambdas: {part!r} is not a number (expected e.g. 0,0.5,1)"
            ) from None
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"--lambdas: {value:g} is not in [0, 1]")
        values.append(value)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"--lambdas has repeated values: {text!r}")
    return values


def number(text: str) -> float:
    """A positive number, also written as a fraction such as ``8/255``."""
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"expected a number such as 0.031 or 8/255, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
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
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value:g}")
    return value


def load_any_model(path: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """A conditional model (saved, or inside a training checkpoint) or an exported plain
    model, from one weights-only file."""
    payload = read_checkpoint(path, map_location)
    source = repr(os.fspath(path))
    if is_exported(payload):
        return from_exported(payload, source=source)
    return from_checkpoint(payload, source=source)
