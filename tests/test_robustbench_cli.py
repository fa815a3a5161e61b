"""``oat-plugins leaderboard`` and ``oat-plugins benchmark``: ranking with the bundled
RobustBench snapshot, and per-λ benchmark runs on a real (perturbed) checkpoint and images of
the bundled CIFAR-10 sample written out as an image folder. Nothing outside the repository is
read."""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
from pathlib import Path

import pytest
import torch

import oat_plugins
from oat_plugins.cli import benchmark as benchmark_cli
from oat_plugins.cli import leaderboard as leaderboard_cli
from oat_plugins.robustbench import (
    load_data,
    make_entry,
    read_entry,
    snapshot_entries,
    write_entry,
)
from oat_plugins.robustbench.entries import entry_path

sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
from _helpers import bundled_uint8, perturb, write_image_folder  # noqa: E402

TINY = {"num_classes": 10, "channels": [8, 16, 16, 16], "stem_width": 8}
# the bundled leaderboard snapshot: RobustBench's model_info as of 2025-03-31
SNAPSHOT_SIZES = {("cifar10", "Linf"): 99, ("cifar10", "L2"): 21, ("cifar100", "Linf"): 38}


def _run(module, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def _markdown_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")][2:]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines]


def _our_entries(results: Path) -> dict[str, dict]:
    entries = {}
    for lam, clean, robust in ((0.0, 0.951, 0.1), (1.0, 0.8034, 0.6012)):
        entry = make_entry(model_name="OatR18", dataset="cifar10", threat_model="Linf",
                           eps=8 / 255, clean_acc=clean, robust_acc=robust,
                           architecture="resnet18", method="film", lam=lam,
                           data_label="CIFAR-10 (JPEG q75)", n_examples=100)
        path = entry_path(results, "cifar10", "Linf", f"OatR18_lam{lam:g}".replace(".", "p"))
        write_entry(entry, path)
        entries[path.stem] = entry
    return entries


def _expected_rank(others: list[dict], robust: str) -> int:
    values = [float(e.get("external") or e["autoattack_acc"]) for e in others]
    assert float(robust) not in values  # no tie, so the rank is unambiguous
    return 1 + sum(v > float(robust) for v in values)


def test_leaderboard_has_every_snapshot_entry_and_ours_ranked(tmp_path, capsys):
    ours = _our_entries(tmp_path)
    assert _run(leaderboard_cli, ["leaderboard", "--dataset", "cifar10", "--threat-model",
                                  "Linf", "--results", str(tmp_path)]) == 0
    rows = _markdown_rows(capsys.readouterr().out)
    snapshot = snapshot_entries("cifar10", "Linf")
    assert len(snapshot) == SNAPSHOT_SIZES["cifar10", "Linf"]
    assert len(rows) == len(snapshot) + 2
    assert [int(r[0].strip("*")) for r in rows] == list(range(1, len(rows) + 1))
    theirs = {r[1] for r in rows if "(ours)" not in r[1]}
    assert theirs == set(snapshot)
    # RobustBench's order among its own entries: by robust accuracy, descending
    robust = [float(r[4].strip("*")) for r in rows]
    assert robust == sorted(robust, reverse=True)
    for stem, entry in ours.items():
        (row,) = [r for r in rows if r[1].strip("*") == f"{stem} (ours)"]
        assert all(c.startswith("**") for c in row)  # marked
        others = list(snapshot.values()) + [e for s, e in ours.items() if s != stem]
        assert int(row[0].strip("*")) == _expected_rank(others, entry["autoattack_acc"])
        assert row[9].strip("*") == "CIFAR-10 (JPEG q75), n=100"
        assert f"λ={stem[-1]}" in row[2]
    snapshot_row = next(r for r in rows if "(ours)" not in r[1])
    assert snapshot_row[9] == "CIFAR-10 test set (RobustBench)"


@pytest.mark.parametrize(("dataset", "threat", "count"), [("cifar10", "L2", 21),
                                                          ("cifar100", "Linf", 38)])
def test_leaderboard_formats(dataset, threat, count, tmp_path, capsys):
    _run(leaderboard_cli, ["leaderboard", "--dataset", dataset, "--threat-model", threat,
                           "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == count == SNAPSHOT_SIZES[dataset, threat]
    assert {r["model_id"] for r in rows} == set(snapshot_entries(dataset, threat))
    assert all(r["ours"] == "False" for r in rows)
    out = tmp_path / "board.html"
    _run(leaderboard_cli, ["leaderboard", "--dataset", dataset, "--threat-model", threat,
                           "--format", "html", "--top", "5", "-o", str(out)])
    html = out.read_text(encoding="utf-8")
    assert html.count("<tr>") == 1 + 5 and "<table" in html


def _model_and_folder(tmp_path: Path, n: int) -> tuple[oat_plugins.ConditionalModel, Path]:
    """A perturbed tiny conditional model, and an image folder of n bundled test images each
    filed under the class the model predicts at λ = 0: 100 % clean accuracy at λ = 0 only."""
    torch.manual_seed(0)
    model = perturb(oat_plugins.wrap("resnet10t", "film", model_kwargs=TINY)).eval()
    images, _ = bundled_uint8("test")
    images = images[:n]
    with torch.no_grad(), oat_plugins.condition(model, 0.0):
        labels = model(images.float() / 255).argmax(1)
    return model, write_image_folder(tmp_path / "images", images, labels)


def test_benchmark_command_writes_one_entry_per_lambda(tmp_path, capsys):
    model, folder = _model_and_folder(tmp_path, 6)
    ckpt = tmp_path / "tiny.pt"
    oat_plugins.save(model, ckpt)
    results = tmp_path / "results"
    assert _run(benchmark_cli, [
        "benchmark", "--checkpoint", str(ckpt), "--lambdas", "0,0.5", "--n-examples", "6",
        "--data", str(folder), "--data-label", "bundled PNGs", "--batch-size", "6",
        "--eps", "8/255", "--results", str(results),
        "--attack-budget", "n_iter=2,n_target_classes=1,n_queries=5", "--no-progress",
    ]) == 0
    printed = capsys.readouterr().out
    x, y, _ = load_data("cifar10", 6, folder)
    clean = {}
    for lam, stem in ((0.0, "tiny_lam0"), (0.5, "tiny_lam0p5")):
        entry = read_entry(results / "cifar10" / "Linf" / f"{stem}.json")
        assert entry["name"] == f"tiny (film, λ={lam:g})"
        assert entry["architecture"] == "resnet10t" and entry["eps"] == "8/255"
        assert "measured on bundled PNGs, first 6 test images" in entry["footnote"]
        with torch.no_grad(), oat_plugins.condition(model, lam):
            accuracy = (model(x).argmax(1) == y).float().mean().item()
        assert entry["clean_acc"] == f"{100 * accuracy:.2f}"
        assert float(entry["autoattack_acc"]) <= float(entry["clean_acc"])
        assert stem in printed
        clean[lam] = entry["clean_acc"]
    assert clean[0.0] == "100.00" != clean[0.5]  # each entry was measured at its own λ
    _run(leaderboard_cli, ["leaderboard", "--results", str(results), "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sorted(r["model_id"] for r in rows if r["ours"] == "True") == ["tiny_lam0",
                                                                          "tiny_lam0p5"]


def test_cli_input_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(leaderboard_cli, ["leaderboard", "--dataset", "imagenet"])
    with pytest.raises(SystemExit):
        _run(benchmark_cli, ["benchmark", "--checkpoint", "x.pt", "--lambdas", "a,b"])
    with pytest.raises(FileNotFoundError):
        _run(benchmark_cli, ["benchmark", "--checkpoint", str(tmp_path / "none.pt"),
                             "--lambdas", "0.5"])
    model, folder = _model_and_folder(tmp_path, 2)
    oat_plugins.save(model, tmp_path / "m.pt")
    with pytest.raises(SystemExit):
        _run(benchmark_cli, ["benchmark", "--checkpoint", str(tmp_path / "m.pt"), "--lambdas",
                             "1.5", "--n-examples", "2", "--data", str(folder), "--no-progress"])
    assert "values must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        _run(leaderboard_cli, ["leaderboard", "--results", str(tmp_path / "missing")])
