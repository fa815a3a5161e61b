"""The ``oat-plugins`` commands eval, export and demo, end to end on the bundled sample."""

import json

import pytest
import timm
import torch

import oat_plugins
from oat_plugins.cli import COMMANDS, build_parser, main
from oat_plugins.data import load_dataset
from oat_plugins.evaluate import SweepResult

TINY = {"num_classes": 10, "channels": [8, 16, 16, 16], "stem_width": 8}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = oat_plugins.wrap("resnet10t", "film", model_kwargs=TINY)
    with torch.no_grad():  # FiLM off identity, so λ matters
        for name, p in model.named_parameters():
            if ".post." in name:
                p.add_(0.3 * torch.randn_like(p))
    model.train()
    with torch.no_grad():
        for lam in (0.0, 1.0):
            model.set_lambda(lam)(torch.rand(16, 3, 32, 32))
    model.set_lambda(0.0).eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    oat_plugins.save(model, path)
    return path


def _bundled_test(n):
    data = load_dataset("bundled", "test")
    x = torch.stack([data[i][0] for i in range(n)])
    y = torch.tensor([data[i][1] for i in range(n)])
    return x, y


def test_every_command_has_help(capsys):
    assert {"eval", "export", "demo"} <= set(COMMANDS)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    for name in COMMANDS:
        assert name in top
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"oat-plugins {name}" in capsys.readouterr().out


def test_export_writes_a_weights_only_plain_model(checkpoint, tmp_path, capsys):
    out = tmp_path / "plain.pt"
    assert main(["export", "--checkpoint", str(checkpoint), "--lambda", "0.4",
                 "--out", str(out)]) == 0
    assert "λ=0.4" in capsys.readouterr().out
    payload = torch.load(out, weights_only=True)
    assert payload["lam"] == 0.4 and payload["backbone"]["name"] == "resnet10t"
    plain = oat_plugins.load_exported(out)
    assert oat_plugins.exported.exported_lambda(out) == 0.4
    assert not any(type(m).__module__.startswith("oat_plugins") for m in plain.modules())
    n_backbone = sum(p.numel() for p in timm.create_model("resnet10t", **TINY).parameters())
    assert sum(p.numel() for p in plain.parameters()) == n_backbone
    model = oat_plugins.load(checkpoint).eval()
    x, _ = _bundled_test(8)
    with torch.no_grad(), oat_plugins.condition(model, 0.4):
        expected = model(x)
    with torch.no_grad():
        assert torch.allclose(plain(x), expected, atol=1e-4)
        with oat_plugins.condition(model, 1.0):
            assert not torch.allclose(plain(x), model(x), atol=1e-4)


def test_export_errors(checkpoint, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--lambda", "0.5",
                 "--out", str(tmp_path / "x.pt")]) == 2
    assert "no checkpoint file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--checkpoint", str(checkpoint), "--lambda", "1.5", "--out", "x.pt"])
    assert exit_info.value.code == 2
    assert "[0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_eval_end_to_end_on_the_bundled_sample(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--checkpoint", str(checkpoint), "--data", "bundled",
                 "--lambdas", "0,0.5,1", "--attack", "pgd", "--steps", "1", "--eps", "4/255",
                 "--n-examples", "12", "--batch-size", "6", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| λ | clean acc (%)" in printed and "PGD-1 (L∞, ε=4/255" in printed
    result = SweepResult.from_json(out / "metrics.json")
    assert result.lambdas == [0.0, 0.5, 1.0]
    assert all(r.n == 12 and 0 <= r.robust_acc <= r.clean_acc <= 1 for r in result)
    assert (out / "metrics.csv").read_text().count("\n") == 4
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    # The CLI measures what the library measures on the same first 12 test images.
    model = oat_plugins.load(checkpoint).eval()
    x, y = _bundled_test(12)
    with torch.no_grad(), oat_plugins.condition(model, 0.5):
        clean = float((model(x).argmax(1) == y).float().mean())
    assert result.row(0.5).clean_acc == pytest.approx(clean)
    meta = json.loads((out / "metrics.json").read_text())["meta"]
    assert meta["data"] == "bundled" and meta["steps"] == 1
    assert meta["eps"] == pytest.approx(4 / 255)


def test_eval_of_an_exported_model_has_one_row(checkpoint, tmp_path, capsys):
    plain = tmp_path / "plain.pt"
    assert main(["export", "--checkpoint", str(checkpoint), "--lambda", "1",
                 "--out", str(plain)]) == 0
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(plain), "--attack", "fgsm", "--n-examples", "8",
                 "--out", str(out), "--no-progress"]) == 0
    result = SweepResult.from_json(out / "metrics.json")
    assert result.lambdas == [None]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(plain), "--lambdas", "0,1", "--n-examples", "8",
                 "--out", str(out)]) == 2
    assert "drop --lambdas" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [(["--lambdas", "0,2"], "must be in [0, 1]"), (["--lambdas", "0,,1"], "comma-separated"),
     (["--lambdas", "a"], "not a number"), (["--attack", "pgd7"], "invalid choice"),
     (["--n-examples", "0"], "positive integer"), (["--eps", "8/0"], "8/255"),
     (["--eps", "-1"], "positive number")],
)
def test_eval_rejects_bad_arguments(checkpoint, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["eval", "--checkpoint", str(checkpoint), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_errors_for_missing_checkpoint_and_unknown_data(checkpoint, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--out",
                 str(tmp_path)]) == 2
    assert "no checkpoint file" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", "imagenet7",
                 "--out", str(tmp_path)]) == 2
    assert "unknown dataset" in capsys.readouterr().err


def test_demo_end_to_end_with_tiny_settings(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--model-kwargs", json.dumps(TINY), "--epochs", "1",
                 "--max-steps", "2", "--batch-size", "32", "--lambdas", "0,1",
                 "--steps", "1", "--n-examples", "16", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| λ | clean acc (%)" in printed and "conditioned with 'film'" in printed
    result = SweepResult.from_json(out / "metrics.json")
    assert result.lambdas == [0.0, 1.0]
    assert all(r.n == 16 and 0 <= r.robust_acc <= r.clean_acc <= 1 for r in result)
    assert (out / "tradeoff.png").is_file()
    assert (out / "metrics.csv").read_text().startswith("lam,clean_acc,robust_acc")
    assert (out / "train" / "last.pt").is_file()
    model = oat_plugins.load(out / "model.pt")
    assert model.method_name == "film" and model.backbone_spec["kwargs"]["stem_width"] == 8
    # The training checkpoint next to it feeds eval and export directly.
    assert main(["eval", "--checkpoint", str(out / "train" / "last.pt"), "--lambdas", "1",
                 "--attack", "fgsm", "--n-examples", "16", "--out", str(out / "eval"),
                 "--no-progress"]) == 0
    again = SweepResult.from_json(out / "eval" / "metrics.json")
    assert again.rows[0].clean_acc == result.row(1.0).clean_acc
    assert main(["export", "--checkpoint", str(out / "train" / "last.pt"), "--lambda", "0",
                 "--out", str(out / "plain.pt")]) == 0
    assert oat_plugins.exported.exported_lambda(out / "plain.pt") == 0.0
