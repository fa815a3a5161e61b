"""The RobustBench leaderboard snapshot shipped with oat-plugins, ranked with our entries.

Ranking follows RobustBench: by robust accuracy (``external`` when an entry has it, else
``autoattack_acc``), highest first; ties by clean accuracy, then model id. Our entries are
marked, one row per λ, and their accuracies carry the data they were measured on (from the
entry's footnote, e.g. "CIFAR-10 (JPEG q75), n=100"); snapshot rows were measured by
RobustBench on the original test set.
"""

from __future__ import annotations

import csv
import html
import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .entries import (
    DATASETS,
    THREAT_MODELS,
    check_dataset,
    check_threat_model,
    measured_on,
    read_entry,
)

__all__ = [
    "LeaderboardRow",
    "snapshot_entries",
    "result_entries",
    "load_leaderboard",
    "render_leaderboard",
    "FORMATS",
]

FORMATS = ("markdown", "csv", "html")
# package data (pyproject: data/leaderboard/**/*.json), installed next to the code
_SNAPSHOT_ROOT = Path(__file__).resolve().parent.parent / "data" / "leaderboard"
_SNAPSHOT_LABEL = {"cifar10": "CIFAR-10 test set (RobustBench)",
                   "cifar100": "CIFAR-100 test set (RobustBench)"}


@dataclass(frozen=True)
class LeaderboardRow:
    """One ranked row. Accuracies are percentages."""

    rank: int
    model_id: str
    name: str
    clean_acc: float
    robust_acc: float
    architecture: str
    eps: str
    venue: str
    additional_data: bool
    ours: bool
    measured_on: str
    link: str


def _snapshot_dir(dataset: str, threat_model: str) -> Path:
    return _SNAPSHOT_ROOT / dataset / threat_model


def snapshot_entries(dataset: str = "cifar10", threat_model: str = "Linf") -> dict[str, dict]:
    """The bundled RobustBench entries for (dataset, threat model): model id → entry."""
    dataset = check_dataset(dataset)
    threat_model = check_threat_model(threat_model)
    folder = _snapshot_dir(dataset, threat_model)
    if not folder.is_dir():
        available = [f"{d}/{t}" for d in DATASETS for t in THREAT_MODELS
                     if _snapshot_dir(d, t).is_dir()]
        raise ValueError(f"no bundled leaderboard for {dataset}/{threat_model}; "
                         f"available: {', '.join(available)}")
    return {p.stem: read_entry(p) for p in sorted(folder.glob("*.json"))}


def result_entries(results: str | os.PathLike, dataset: str = "cifar10",
                   threat_model: str = "Linf") -> dict[str, dict]:
    """Our entries under ``results``: ``<results>/<dataset>/<threat_model>/*.json``
    (RobustBench's layout, what :func:`oat_plugins.robustbench.benchmark` writes)."""
    dataset = check_dataset(dataset)
    threat_model = check_threat_model(threat_model)
    root = Path(results)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist")
    folder = root / dataset / threat_model
    entries = {p.stem: read_entry(p) for p in sorted(folder.glob("*.json"))}
    for stem, entry in entries.items():
        if entry["dataset"] != dataset:
            raise ValueError(f"{folder / stem}.json is for {entry['dataset']}, not {dataset}")
    return entries


def _robust(entry: dict[str, Any]) -> float:
    return float(entry.get("external") or entry["autoattack_acc"])


def load_leaderboard(
    dataset: str = "cifar10",
    threat_model: str = "Linf",
    results: str | os.PathLike | None = None,
    extra: dict[str, dict] | None = None,
) -> list[LeaderboardRow]:
    """The snapshot plus our entries (from ``results`` and/or ``extra``), ranked.

    ``extra`` maps model ids to entries (e.g. fresh ones not yet written). Our model ids must
    not collide with snapshot ids.
    """
    snapshot = snapshot_entries(dataset, threat_model)
    ours: dict[str, dict] = {}
    if results is not None:
        ours.update(result_entries(results, dataset, threat_model))
    if extra:
        ours.update(extra)
    clash = sorted(set(ours) & set(snapshot))
    if clash:
        raise ValueError(f"our model ids clash with RobustBench ids: {clash}")

    items = [(mid, e, False) for mid, e in snapshot.items()]
    items += [(mid, e, True) for mid, e in ours.items()]
    items.sort(key=lambda t: (-_robust(t[1]), -float(t[1]["clean_acc"]), t[0]))
    rows = []
    for rank, (mid, e, is_ours) in enumerate(items, start=1):
        rows.append(LeaderboardRow(
            rank=rank,
            model_id=mid,
            name=e["name"],
            clean_acc=float(e["clean_acc"]),
            robust_acc=_robust(e),
            architecture=e["architecture"],
            eps=e["eps"],
            venue=e["venue"] or "Unpublished",
            additional_data=bool(e["additional_data"]),
            ours=is_ours,
            measured_on=(measured_on(e) or "unknown data") if is_ours else _SNAPSHOT_LABEL[
                e["dataset"]],
            link=e["link"],
        ))
    return rows


_COLUMNS = ("#", "Model", "Paper / entry", "Clean (%)", "AutoAttack (%)", "Architecture", "ε",
            "Extra data", "Venue", "Measured on")


def _cells(row: LeaderboardRow) -> list[str]:
    return [str(row.rank), row.model_id + (" (ours)" if row.ours else ""), row.name,
            f"{row.clean_acc:.2f}", f"{row.robust_acc:.2f}", row.architecture, row.eps,
            "yes" if row.additional_data else "no", row.venue, row.measured_on]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_leaderboard(rows: list[LeaderboardRow], fmt: str = "markdown") -> str:
    """Render ranked rows as a markdown table (ours in bold), CSV, or an HTML table."""
    if fmt == "markdown":
        lines = ["| " + " | ".join(_COLUMNS) + " |",
                 "|" + "|".join(":---:" if c in ("#", "Clean (%)", "AutoAttack (%)") else "---"
                                for c in _COLUMNS) + "|"]
        for row in rows:
            cells = [_md_escape(c) for c in _cells(row)]
            if row.ours:
                cells = [f"**{c}**" for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        fields = list(asdict(rows[0]).keys()) if rows else [
            f for f in LeaderboardRow.__dataclass_fields__]
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
        return buf.getvalue()
    if fmt == "html":
        out = ["<table class=\"leaderboard\">", "<thead><tr>"
               + "".join(f"<th>{html.escape(c)}</th>" for c in _COLUMNS) + "</tr></thead>",
               "<tbody>"]
        for row in rows:
            cls = ' class="ours"' if row.ours else ""
            out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>"
                                              for c in _cells(row)) + "</tr>")
        out.append("</tbody></table>")
        return "\n".join(out) + "\n"
    raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
