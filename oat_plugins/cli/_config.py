"""``--config FILE``: a command's options from a YAML file, under the command line.

The file is a mapping of option names (``epochs``, ``model-kwargs`` or ``model_kwargs``) to
values. Each entry becomes the command-line tokens it stands for (``epochs: 200`` →
``--epochs 200``), inserted right after the command's name, so every value goes through the
same parsing and checks as on the command line, and any flag given on the command line comes
later and wins. YAML (PyYAML, a dependency of timm) rather than TOML, whose reader is in the
standard library only from Python 3.11."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

NOT_OPTIONS = frozenset({"command", "func", "verbose", "debug", "config"})
"""Namespace entries that are not the command's own options."""


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in the YAML file at ``path`` (keys normalised to ``snake_case``)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            content = yaml.safe_load(handle)
    except yaml.YAMLError as err:
        raise ValueError(f"--config {os.fspath(path)!r} is not valid YAML: "
                         f"{' '.join(str(err).split())}") from None
    if not isinstance(content, Mapping):
        raise ValueError(f"--config {os.fspath(path)!r} must hold a mapping of option names "
                         f"to values, got {type(content).__name__}")
    return {str(key).replace("-", "_"): value for key, value in content.items()}


def config_tokens(path: str | os.PathLike, options: Iterable[str]) -> list[str]:
    """The command-line tokens that the file's entries stand for; an entry that is not one
    of ``options`` (the command's option names) is a ``ValueError`` listing them."""
    config = read_config(path)
    known = set(options) - NOT_OPTIONS
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"--config {os.fspath(path)!r}: unknown key(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(sorted(known))}")
    tokens: list[str] = []
    for key, value in config.items():
        tokens += _tokens(f"--{key.replace('_', '-')}", value)
    return tokens


def _tokens(flag: str, value: Any) -> list[str]:
    """``--flag VALUE`` for one entry: ``true`` is a bare switch, ``false`` / ``null`` leave
    the default, a list is comma-separated, ``option`` (a mapping) is repeated
    ``--option KEY=JSON``, any other mapping is JSON."""
    if value is None or value is False:
        return []
    if value is True:
        return [flag]
    if flag == "--option" and isinstance(value, Mapping):
        return [token for key, item in value.items()
                for token in (flag, f"{key}={json.dumps(item)}")]
    if isinstance(value, Mapping):
        return [flag, json.dumps(value)]
    if isinstance(value, list):
        return [flag, ",".join(str(item) for item in value)]
    return [flag, str(value)]


def with_config(argv: list[str], args: argparse.Namespace) -> list[str]:
    """``argv`` with the tokens of ``args.config`` inserted after the command's name."""
    at = argv.index(args.command) + 1
    return argv[:at] + config_tokens(args.config, vars(args)) + argv[at:]
