"""Evaluation: the λ sweep table, its attacks, and its JSON / CSV / markdown / plot outputs."""

import csv
import json
import logging
import math

import pytest
import timm
import torch
import torchattacks
from torch.utils.data import DataLoader, TensorDataset

import oat_plugins
from oat_plugins.attacks import MULTIEXIT_ATTACKS
from oat_plugins.evaluate import (
    ATTACKS,
    DEFAULT_LAMBDAS,
    CWLinf,
    SweepResult,
    evaluate,
    plot_tradeoff,
    resolve_attack,
)

TINY = {"num_classes": 10, "channels": (8, 16, 16, 16), "stem_width": 8}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = oat_plugins.wrap("resnet10t", "film", model_kwargs=TINY)
    with torch.no_grad():  # move FiLM off identity so every λ computes a different function
        for name, p in m.named_parameters():
            if ".post." in name or "film" in name.lower():
                p.add_(0.3 * torch.randn_like(p))
    # Give the two norm branches different statistics.
    m.train()
    with torch.no_grad():
        for lam in (0.0, 1.0):
            m.set_lambda(lam)
            m(torch.rand(32, 3, 32, 32))
    m.set_lambda(0.0)
    return m.eval()


@pytest.fixture(scope="module")
def data(model):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(24, 3, 32, 32, generator=g)
    with torch.no_grad():
        y = model.set_lambda(0.0)(x).argmax(1)  # λ=0 classifies every example correctly
    y[::3] = (y[::3] + 1) % 10                  # ...except every third one
    return x, y


def _accuracy(model, x, y, lam):
    with torch.no_grad(), oat_plugins.condition(model, lam):
        return float((model(x).argmax(1) == y).float().mean())


def test_table_shape_and_values_in_range(model, data):
    result = evaluate(model, data, [0.0, 0.5, 1.0], steps=1, batch_size=10, progress=False)
    assert isinstance(result, SweepResult)
    assert len(result) == 3 and result.lambdas == [0.0, 0.5, 1.0]
    for row in result:
        assert row.n == 24
        assert 0.0 <= row.robust_acc <= row.clean_acc <= 1.0
        assert row.attack == result.meta["attack"] == "PGD-1 (L∞, ε=8/255, α=20/255)"
    x, y = data
    for lam in (0.0, 0.5, 1.0):
        assert result.row(lam).clean_acc == pytest.approx(_accuracy(model, x, y, lam))
    assert result.row(0.0).clean_acc == pytest.approx(16 / 24)


def test_default_lambdas_and_state_restored(model, data):
    model.set_lambda(0.3)
    model.train()
    try:
        result = evaluate(model, data, attack="fgsm", n_examples=8, progress=False)
        assert result.lambdas == list(DEFAULT_LAMBDAS)
        assert model.training and model.lam == 0.3
    finally:
        model.eval()
        model.set_lambda(0.0)


def test_reproducible_and_same_examples_for_every_input_kind(model, data):
    x, y = data
    kwargs = dict(lambdas=[0.0, 1.0], steps=1, n_examples=12, batch_size=8, progress=False)
    first = evaluate(model, (x, y), **kwargs)
    again = evaluate(model, (x, y), **kwargs)
    from_dataset = evaluate(model, TensorDataset(x, y), **kwargs)
    from_loader = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=8), **kwargs)
    key = [(r.lam, r.clean_acc, r.robust_acc, r.n) for r in first]
    for other in (again, from_dataset, from_loader):
        assert [(r.lam, r.clean_acc, r.robust_acc, r.n) for r in other] == key
    assert all(r.n == 12 for r in first)


def test_random_subset_is_seeded_and_the_same_for_tensors_and_datasets(model, data):
    x, y = data
    kwargs = dict(lambdas=[0.5], attack="fgsm", n_examples=9, subset_seed=3, progress=False)
    picked = torch.randperm(24, generator=torch.Generator().manual_seed(3))[:9].sort().values
    expected = evaluate(model, (x[picked], y[picked]), [0.5], attack="fgsm", progress=False)
    for source in ((x, y), TensorDataset(x, y)):
        result = evaluate(model, source, **kwargs)
        assert result.rows[0].clean_acc == expected.rows[0].clean_acc
        assert result.rows[0].robust_acc == expected.rows[0].robust_acc
        assert result.meta["subset"] == "random (seed 3)"
    assert expected.meta["subset"] == "all"
    with pytest.raises(ValueError, match="DataLoader"):
        evaluate(model, DataLoader(TensorDataset(x, y)), **kwargs)


def test_tiny_eps_keeps_accuracy_and_huge_eps_breaks_it(model, data):
    tiny = evaluate(model, data, [0.0], attack="pgd", eps=1e-7, steps=1, progress=False)
    assert tiny.rows[0].robust_acc == tiny.rows[0].clean_acc
    huge = evaluate(model, data, [0.0], attack="pgd", eps=1.0, steps=3, progress=False)
    assert huge.rows[0].robust_acc < huge.rows[0].clean_acc


def test_plain_module_gives_one_row(model, data):
    plain = model.export(0.5)
    result = evaluate(plain, data, attack="fgsm", progress=False)
    assert result.lambdas == [None]
    assert result.rows[0].clean_acc == pytest.approx(_accuracy(model, *data, 0.5))
    with pytest.raises(ValueError, match="not a ConditionalModel"):
        evaluate(plain, data, [0.0, 1.0], progress=False)


@pytest.mark.parametrize(
    "lambdas, message",
    [([], "empty"), ([0.0, 1.5], r"\[0, 1\]"), ([0.5, 0.5], "repeated"), ("0,1", "list"),
     ([float("nan")], "NaN")],
)
def test_bad_lambdas_are_clear_errors(model, data, lambdas, message):
    with pytest.raises(ValueError, match=message):
        evaluate(model, data, lambdas, progress=False)


def test_unknown_attack_lists_the_names(model, data):
    with pytest.raises(ValueError, match="unknown attack 'pgd7'.*pgd, fgsm, cw"):
        evaluate(model, data, [0.0], attack="pgd7", progress=False)


def test_bad_data_and_arguments(model, data):
    x, y = data
    with pytest.raises(ValueError, match="examples"):
        evaluate(model, (x, y[:5]), [0.0], progress=False)
    with pytest.raises(ValueError, match="Dataset"):
        evaluate(model, [1, 2, 3], [0.0], progress=False)
    with pytest.raises(ValueError, match="n_examples"):
        evaluate(model, data, [0.0], n_examples=0, progress=False)
    with pytest.raises(ValueError, match="steps"):
        resolve_attack("pgd", steps=0)


def test_every_named_attack_builds_a_torchattacks_attack(model):
    for name in set(ATTACKS) - set(MULTIEXIT_ATTACKS):  # those need exits: own test file
        config = resolve_attack(name, steps=3)
        assert isinstance(config.factory(model), torchattacks.attack.Attack), name
        assert config.description
    assert resolve_attack("pgd-l2").eps == 0.5
    assert resolve_attack("pgd").eps == pytest.approx(8 / 255)


def test_attack_factory_and_cw_stay_in_the_ball(model, data):
    x, y = data
    calls = []

    def factory(m):
        calls.append(m)
        return torchattacks.FGSM(m, eps=4 / 255)

    result = evaluate(model, data, [0.0], attack=factory, progress=False)
    assert calls == [model] and result.rows[0].attack == "custom attack factory"
    adv = CWLinf(model, eps=4 / 255, alpha=1 / 255, steps=3)(x, y)
    assert float((adv - x).abs().max()) <= 4 / 255 + 1e-6
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1


@pytest.mark.parametrize("attack", ["apgd", "apgd-t", "square", "cw", "autoattack"])
def test_attack_runs_through_evaluate(model, data, attack):
    """Every named attack through evaluate() on the perturbed model (8 images, 3 steps or
    queries; autoattack is torchattacks' full preset, cheap here because APGD-CE already
    breaks every image): robust ≤ clean at each λ, the attack actually breaks images,
    and a second run gives the same numbers."""
    x, y = data
    kwargs = dict(attack=attack, steps=3, n_examples=8, batch_size=8, progress=False)
    result = evaluate(model, data, [0.0, 1.0], **kwargs)
    assert result.meta["attack_name"] == attack
    for row in result:
        assert row.n == 8 and row.attack == result.meta["attack"]
        assert row.clean_acc == pytest.approx(_accuracy(model, x[:8], y[:8], row.lam))
        assert 0.0 <= row.robust_acc <= row.clean_acc <= 1.0
    assert result.row(0.0).clean_acc > 0
    # an undefended random network at ε = 8/255: every attack breaks some correct image
    assert sum(result.robust_acc) < sum(result.clean_acc)
    again = evaluate(model, data, [0.0, 1.0], **kwargs)
    assert again.robust_acc == result.robust_acc


def test_non_deterministic_model_warns_about_eot(data, caplog):
    m = oat_plugins.wrap("resnet10t", "float", model_kwargs=TINY, noise="resample").eval()
    assert not m.deterministic
    with caplog.at_level(logging.WARNING, logger="oat_plugins.evaluate"):
        evaluate(m, data, [1.0], attack="fgsm", n_examples=4, progress=False)
    assert "expectation over transformation" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="oat_plugins.evaluate"):
        evaluate(m, data, [1.0], attack="eot-pgd", steps=1, n_examples=4, progress=False)
    assert "expectation over transformation" not in caplog.text


def test_outputs_json_csv_markdown_plot(model, data, tmp_path):
    result = evaluate(model, data, [0.0, 1.0], attack="fgsm", progress=False)
    result.to_json(tmp_path / "m.json")
    back = SweepResult.from_json(tmp_path / "m.json")
    assert back.rows == result.rows and back.meta == json.loads(json.dumps(result.meta))
    result.to_csv(tmp_path / "m.csv")
    with open(tmp_path / "m.csv", newline="", encoding="utf-8") as handle:
        lines = list(csv.DictReader(handle))
    assert [float(r["lam"]) for r in lines] == [0.0, 1.0]
    assert [float(r["robust_acc"]) for r in lines] == result.robust_acc
    table = result.to_markdown().splitlines()
    assert len(table) == 4 and table[2].startswith("| 0 | ")
    assert f"{100 * result.rows[1].clean_acc:.1f}" in table[3]
    result.plot(tmp_path / "plot.png", references={"PGD-AT": (0.5, 0.3)})
    plot_tradeoff({"a": result, "b": back}, tmp_path / "two.png")
    for name in ("plot.png", "two.png"):
        data_bytes = (tmp_path / name).read_bytes()
        assert data_bytes[:8] == b"\x89PNG\r\n\x1a\n" and len(data_bytes) > 5000
    assert not list(tmp_path.glob(".*.tmp"))


def test_plain_row_csv_and_markdown(model, data, tmp_path):
    result = evaluate(model.export(0.0), data, attack="fgsm", progress=False)
    result.to_csv(tmp_path / "p.csv")
    assert (tmp_path / "p.csv").read_text().splitlines()[1].startswith(",")
    assert "| – |" in result.to_markdown()
    assert not math.isnan(result.rows[0].clean_acc)


def test_timm_model_without_wrapper(data):
    plain = timm.create_model("resnet10t", **TINY).eval()
    result = evaluate(plain, data, attack="fgsm", progress=False)
    assert len(result) == 1 and 0 <= result.rows[0].robust_acc <= result.rows[0].clean_acc


# -- dial check ---------------------------------------------------------------------------

SIX = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


def _sweep(lambdas, clean_points, robust_points, n=1000):
    """A hand-made SweepResult; accuracies given in percent."""
    rows = [{"lam": lam, "clean_acc": c / 100, "robust_acc": r / 100, "n": n, "attack": "PGD"}
            for lam, c, r in zip(lambdas, clean_points, robust_points, strict=True)]
    return SweepResult.from_dict({"rows": rows, "meta": {}})


def test_dial_check_of_a_monotone_dial():
    dial = _sweep(SIX, [90, 85, 80, 74, 68, 60], [10, 16, 22, 28, 33, 40]).dial()
    assert dial.monotone_clean and dial.monotone_robust and dial.is_dial is True
    assert dial.interior_lambdas == (0.2, 0.4, 0.6, 0.8)
    assert dial.clean_positions == pytest.approx((5 / 30, 10 / 30, 16 / 30, 22 / 30))
    assert dial.robust_positions == pytest.approx((6 / 30, 12 / 30, 18 / 30, 23 / 30))
    # 1 − the largest step between adjacent λ, as a share of the end-to-end change
    assert dial.clean_spread == pytest.approx(1 - 8 / 30)
    assert dial.robust_spread == pytest.approx(1 - 7 / 30)
    assert dial.clean_change == pytest.approx(30) and dial.robust_change == pytest.approx(30)
    assert dial.summary().startswith("dial: yes — monotone within 0.5 pt")


def test_dial_check_of_a_switch():
    # Every interior λ already gives the λ = 1 model: λ is an on/off switch, not a dial.
    dial = _sweep(SIX, [90, 60, 60, 60, 60, 60], [10, 40, 40, 40, 40, 40]).dial()
    assert dial.monotone_clean and dial.monotone_robust
    assert dial.clean_positions == pytest.approx((1, 1, 1, 1))
    assert dial.robust_positions == pytest.approx((1, 1, 1, 1))
    assert dial.clean_spread == pytest.approx(0) and dial.robust_spread == pytest.approx(0)
    assert dial.is_dial is False and "a switch" in dial.summary()
    # A single interior point near one end is piled there; its spread is small.
    piled = _sweep([0, 0.5, 1], [90, 62, 60], [10, 38, 40]).dial()
    assert piled.clean_spread == pytest.approx(1 - 28 / 30) and piled.is_dial is False
    assert _sweep([0, 0.5, 1], [90, 62, 60], [10, 38, 40]).dial(min_spread=0.05).is_dial


def test_dial_check_of_a_non_monotone_curve_and_the_tolerance():
    bumpy = _sweep(SIX, [90, 85, 88, 74, 68, 60], [10, 16, 22, 28, 33, 40]).dial()
    assert not bumpy.monotone_clean and bumpy.monotone_robust and bumpy.is_dial is False
    assert bumpy.worst_clean_rise == pytest.approx(3.0)
    assert "not monotone (clean accuracy rises by 3.0 pt" in bumpy.summary()
    robust_dip = _sweep(SIX, [90, 85, 80, 74, 68, 60], [10, 16, 15, 28, 33, 40]).dial()
    assert not robust_dip.monotone_robust and robust_dip.worst_robust_drop == pytest.approx(1)
    # Sampling noise below the tolerance (0.5 pt by default) is not a violation.
    noisy = _sweep(SIX, [90, 85, 85.4, 74, 68, 60], [10, 16, 22, 21.7, 33, 40])
    assert noisy.dial().is_dial is True
    strict = noisy.dial(tolerance=0.2)
    assert not strict.monotone_clean and not strict.monotone_robust and not strict.is_dial


def test_dial_check_without_a_trade_off_or_interior_points():
    flat = _sweep(SIX, [90, 90, 90.2, 90, 90, 90], [10, 16, 22, 28, 33, 40]).dial()
    assert flat.monotone_clean and flat.clean_positions is None and flat.clean_spread is None
    assert flat.is_dial is False and "no trade-off" in flat.summary()
    ends = _sweep([0.0, 1.0], [90, 60], [10, 40]).dial()
    assert ends.is_dial is None and ends.interior_lambdas == ()
    assert ends.summary().startswith("dial: undecided")
    shuffled = _sweep([1.0, 0.0, 0.5], [60, 90, 75], [40, 10, 25]).dial()
    assert shuffled.lambdas == (0.0, 0.5, 1.0) and shuffled.clean_positions == (0.5,)
    with pytest.raises(ValueError, match="two or more λ"):
        _sweep([None], [90], [10]).dial()
    with pytest.raises(ValueError, match="tolerance"):
        _sweep(SIX, [90] * 6, [10] * 6).dial(tolerance=-1)


def test_dial_check_in_json_and_markdown(tmp_path):
    result = _sweep(SIX, [90, 85, 80, 74, 68, 60], [10, 16, 22, 28, 33, 40])
    result.to_json(tmp_path / "m.json")
    payload = json.loads((tmp_path / "m.json").read_text())
    assert payload["dial"]["is_dial"] is True
    assert payload["dial"]["summary"] == result.dial().summary()
    assert payload["dial"]["clean_positions"] == pytest.approx([5 / 30, 10 / 30, 16 / 30, 22 / 30])
    assert SweepResult.from_json(tmp_path / "m.json").rows == result.rows
    table = result.to_markdown().splitlines()
    assert table[-1] == result.dial().summary() and table[-2] == ""
    assert result.to_markdown(dial=False).splitlines() == table[:-2]
    two = _sweep([0.0, 1.0], [90, 60], [10, 40])
    assert "dial" in two.to_dict() and "dial:" not in two.to_markdown()
    plain = _sweep([None], [90], [10])
    assert "dial" not in plain.to_dict() and "dial:" not in plain.to_markdown()


def test_eval_command_prints_the_dial_check(model, tmp_path, capsys):
    from oat_plugins.cli import main

    oat_plugins.save(model, tmp_path / "model.pt")
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(tmp_path / "model.pt"), "--data", "bundled",
                 "--lambdas", "0,0.5,1", "--attack", "fgsm", "--n-examples", "8",
                 "--out", str(out), "--no-progress"]) == 0
    result = SweepResult.from_json(out / "metrics.json")
    summary = result.dial().summary()
    assert summary.startswith("dial: ") and summary in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["dial"]["summary"] == summary
