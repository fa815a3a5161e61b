"""Training loop (oat_plugins.train), resume, DDP and the ``train`` CLI command."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchattacks
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

import oat_plugins
from oat_plugins.cli import main as cli_main
from oat_plugins.evaluate import evaluate
from oat_plugins.layers.weight_mask import weight_masks
from oat_plugins.methods.film import Film
from oat_plugins.samplers import DiscreteLambdaSampler
from oat_plugins.train import (
    TrainConfig,
    _BufferSync,
    default_alpha,
    fit,
    make_attack,
    oat_loss,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.fspath(HERE))
from train_helpers import (  # noqa: E402
    BATCH,
    N_TRAIN,
    TINY_KWARGS,
    tiny_config,
    tiny_data,
    tiny_model,
)

STEPS_PER_EPOCH = N_TRAIN // BATCH


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor)
                                      else a[k] == b[k])]  # e.g. a mask's extra state
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-epoch run of the tiny model: what every resumed run must match."""
    out = tmp_path_factory.mktemp("reference")
    model = tiny_model()
    result = fit(model, tiny_data(), tiny_config(epochs=3), out)
    return {"state": _state(model), "history": result["history"],
            "checkpoint": torch.load(out / "last.pt", weights_only=True)}


def test_fit_trains_film_and_writes_checkpoint_and_metrics(tmp_path):
    model = tiny_model()
    before = _state(model)
    result = fit(model, tiny_data(), tiny_config(epochs=2), tmp_path,
                 eval_data=tiny_data(16, "test"))
    assert result["finished"] and result["epoch"] == 2
    assert result["global_step"] == 2 * STEPS_PER_EPOCH
    changed = [k for k, v in model.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(".clean." in k for k in changed) and any(".robust." in k for k in changed)
    assert any(".post." in k for k in changed), "FiLM generators were not trained"

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert torch.isfinite(torch.tensor(r["loss"]))
        assert 0.0 <= r["clean_acc"] <= 1.0 and 0.0 <= r["adv_acc"] <= 1.0
        assert {"eval_clean_acc@0", "eval_adv_acc@1", "lr", "seconds"} <= r.keys()
    # Cosine per step: the last step of epoch 2 (of 2) runs at lr·(1 + cos(π·5/6))/2.
    assert records[-1]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert records[0]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 2 / 6)))
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,loss") and len(csv_lines) == 3
    # The per-epoch evaluation is oat_plugins.evaluate with the training attack.
    config = tiny_config(epochs=2)
    sweep = evaluate(model, tiny_data(16, "test"), (0.0, 1.0),
                     attack=lambda m: make_attack(m, config), n_examples=1000,
                     batch_size=BATCH, seed=config.seed, progress=False)
    for row in sweep:
        assert records[-1][f"eval_clean_acc@{row.lam:g}"] == row.clean_acc
        assert records[-1][f"eval_adv_acc@{row.lam:g}"] == row.robust_acc

    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 2 * STEPS_PER_EPOCH
    assert {"optimizer", "scheduler", "rng", "config"} <= ckpt.keys()
    loaded = oat_plugins.load(tmp_path / "last.pt").eval()  # a named timm backbone
    x = torch.rand(4, 3, 32, 32)
    model.eval()
    for lam in (0.0, 0.3, 1.0):
        model.set_lambda(lam)
        loaded.set_lambda(lam)
        assert torch.equal(model(x), loaded(x))


def test_clean_only_evaluation(tmp_path, caplog):
    config = tiny_config(epochs=1, eval_adversarial=False, eval_lambdas=(0.0, 0.5))
    with caplog.at_level(logging.INFO, logger="oat_plugins"):
        record = fit(tiny_model(), tiny_data(), config, tmp_path,
                     eval_data=tiny_data(16, "test"))["history"][0]
    assert {k for k in record if k.startswith("eval_")} == {"eval_clean_acc@0",
                                                            "eval_clean_acc@0.5"}
    # no "robust" rows of the identity stand-in attack in the log
    assert not [r for r in caplog.records if "robust" in r.getMessage()]


def test_fit_reduces_the_loss_on_a_fixed_batch(tmp_path):
    model = tiny_model()
    config = tiny_config(epochs=8, lr=0.05, schedule="constant")
    result = fit(model, tiny_data(BATCH), config, tmp_path)
    losses = [r["loss"] for r in result["history"]]
    assert losses[-1] < losses[0] - 0.1, losses


class _RecordingFGSM(torchattacks.FGSM):
    """FGSM that records what the model looked like while it was attacked."""

    def __init__(self, model, eps):
        super().__init__(model, eps=eps)
        self.calls = []

    def forward(self, images, labels):
        lam = self.model.lam
        self.calls.append((images.shape[0], self.model.training,
                           lam.clone() if isinstance(lam, torch.Tensor) else lam))
        return super().forward(images, labels)


class ScalarFilm(Film):
    """``film`` serving a per-sample λ by one forward per λ group, like a method whose
    weights depend on λ (not registered: built directly)."""

    lambda_groups = True


def _groupnorm_backbone() -> nn.Module:
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, channels=(8, 16, 32, 64),
                  stem_width=8, norm_layer=lambda c: nn.GroupNorm(4, c))


def _groupnorm_model(per_sample: bool = True) -> oat_plugins.ConditionalModel:
    """Per-sample independent norms, so a batch equals its samples one by one."""
    torch.manual_seed(0)
    backbone = _groupnorm_backbone()
    if per_sample:
        return oat_plugins.wrap(backbone, "film", normalize=None)
    return oat_plugins.ConditionalModel(backbone, ScalarFilm(), normalize=None)


@pytest.mark.parametrize("per_sample", [True, False])
def test_oat_loss_is_the_per_sample_formula(per_sample):
    model = _groupnorm_model(per_sample).train()
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    lam = torch.tensor([0.0, 0.1, 1.0, 0.0, 0.4, 0.2])
    attack = _RecordingFGSM(model, eps=8 / 255)
    loss, stats = oat_loss(model, x, y, lam, attack)

    # The attack saw only the λ > 0 samples, in eval mode; train mode is back. FGSM queries
    # its whole batch, so a method serving a per-sample λ in one forward is attacked in one
    # call; a method that needs λ groups is attacked one distinct λ at a time.
    assert all(not training for _, training, _ in attack.calls)
    if per_sample:
        assert len(attack.calls) == 1
        n_attacked, _, lam_during_attack = attack.calls[0]
        assert n_attacked == 4 and torch.equal(lam_during_attack, lam[lam > 0])
    else:
        assert sorted((lam_seen, n) for n, _, lam_seen in attack.calls) == [
            (pytest.approx(0.1), 1), (pytest.approx(0.2), 1), (pytest.approx(0.4), 1),
            (1.0, 1)]
    assert model.training
    assert stats["n"] == 6 and stats["n_adv"] == 4 and stats["n_clean"] == 5  # λ=1: no clean

    expected = torch.zeros(())
    for i in range(6):
        li = float(lam[i])
        model.set_lambda(li)
        ce_clean = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        term = (1 - li) * ce_clean
        if li > 0:
            x_adv = torchattacks.FGSM(model, eps=8 / 255)(x[i:i + 1], y[i:i + 1])
            model.train()
            term = term + li * F.cross_entropy(model(x_adv), y[i:i + 1])
        expected = expected + term
    torch.testing.assert_close(loss, expected / 6, rtol=1e-4, atol=1e-5)


class RegularisedFilm(Film):
    """A method whose training loss adds a term computed from the loss context."""

    def training_loss(self, ctx):
        loss, stats = super().training_loss(ctx)
        reg = 0.5 * ctx.lam.mean()  # sees the batch's λ
        return loss + reg, {**stats, "loss_reg": float(reg)}


def test_a_method_training_loss_hook_is_used():
    torch.manual_seed(0)
    model = _groupnorm_model().train()
    hooked = oat_plugins.ConditionalModel(_groupnorm_backbone(), RegularisedFilm(),
                                          normalize=None).train()
    hooked.load_state_dict(model.state_dict())
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    lam = torch.tensor([0.0, 1.0, 0.0, 1.0])
    base, _ = oat_loss(model, x, y, lam, torchattacks.FGSM(model, eps=1 / 255))
    with_hook, stats = oat_loss(hooked, x, y, lam, torchattacks.FGSM(hooked, eps=1 / 255))
    torch.testing.assert_close(with_hook, base + 0.25)
    assert stats["loss_reg"] == 0.25


@pytest.mark.parametrize("name", ["APGD", "Square"])
def test_attacks_that_query_part_of_their_batch_train(name):
    """APGD and Square call the model on the samples it still classifies correctly only.
    With the whole per-sample λ set during the attack that failed ("per-sample λ has 8
    entries but the batch has 4 samples"); attacked one λ group at a time, at a scalar λ,
    they train."""
    model = _groupnorm_model()
    x = torch.rand(10, 3, 32, 32)
    lam = torch.tensor([0.0, 0.2, 0.2, 1.0, 1.0, 0.2, 1.0, 0.0, 0.2, 1.0])
    model.eval()
    with torch.no_grad(), model.at(lam):
        predicted = model(x).argmax(1)
    # Right labels for the even samples, wrong ones for the odd: every λ > 0 group then holds
    # samples the model classifies correctly and samples it does not.
    y = torch.where(torch.arange(10) % 2 == 0, predicted, (predicted + 1) % 10)
    for value in (0.2, 1.0):
        group = lam == value
        with torch.no_grad(), model.at(value):
            correct = model(x[group]).argmax(1) == y[group]
        assert 0 < int(correct.sum()) < int(group.sum())
    attack = (torchattacks.APGD(model, eps=8 / 255, steps=2) if name == "APGD"
              else torchattacks.Square(model, eps=8 / 255, n_queries=5))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = _state(model)
    loss, stats = oat_loss(model, x, y, lam, attack)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and stats["n_adv"] == 8
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("stop_at", [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 1])
def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, reference, stop_at):
    """Stop at an epoch boundary or mid-epoch (max_steps), resume: bit-identical weights,
    optimizer state and metrics."""
    first = tiny_model()
    partial = fit(first, tiny_data(), tiny_config(epochs=3, max_steps=stop_at), tmp_path)
    assert not partial["finished"] and partial["global_step"] == stop_at
    assert partial["stopped_by"] == "max_steps"
    resumed = tiny_model(seed=123)  # different initial weights: everything comes from last.pt
    result = fit(resumed, tiny_data(), tiny_config(epochs=3), tmp_path, resume=True)
    assert result["finished"] and result["global_step"] == 3 * STEPS_PER_EPOCH
    _assert_same_state(reference["state"], _state(resumed))

    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    for k, v in reference["checkpoint"]["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], ckpt["optimizer"]["state"][k]["momentum_buffer"])
    assert result["history"] == [
        {**r, "seconds": h["seconds"]} for r, h in zip(reference["history"], result["history"],
                                                      strict=True)]


def test_an_old_checkpoint_resumes(tmp_path, reference):
    """A mid-epoch last.pt of the previous release (no device/amp_dtype/save_every_* in its
    config, no learning rate in its epoch_partial) still resumes exactly."""
    fit(tiny_model(), tiny_data(), tiny_config(epochs=3, max_steps=STEPS_PER_EPOCH + 1),
        tmp_path)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    for key in ("device", "amp_dtype", "save_every_steps", "save_every_minutes"):
        del ckpt["config"][key]
    del ckpt["epoch_partial"]["lr"]
    torch.save(ckpt, tmp_path / "last.pt")
    resumed = tiny_model(seed=3)
    result = fit(resumed, tiny_data(), tiny_config(epochs=3), tmp_path, resume=True)
    assert result["finished"]
    _assert_same_state(reference["state"], _state(resumed))
    assert [r["lr"] for r in result["history"]] == [r["lr"] for r in reference["history"]]


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    result = fit(tiny_model(), tiny_data(), tiny_config(epochs=1), tmp_path, resume=True)
    assert result["finished"] and (tmp_path / "last.pt").is_file()


def test_resume_rejects_a_checkpoint_of_another_method_or_no_training_checkpoint(tmp_path):
    fit(tiny_model(), tiny_data(), tiny_config(epochs=1, max_steps=1), tmp_path)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    ckpt["model"]["method"] = "other"
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="'other'"):
        fit(tiny_model(), tiny_data(), tiny_config(epochs=1), tmp_path, resume=True)
    oat_plugins.save(tiny_model(), tmp_path / "last.pt")  # a model file, not a training one
    with pytest.raises(ValueError, match=r"not a training checkpoint .*missing \['model', 'opt"):
        fit(tiny_model(), tiny_data(), tiny_config(epochs=1), tmp_path, resume=True)


def _env() -> dict[str, str]:
    root = os.fspath(HERE.parent)
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def test_resume_after_a_killed_process_matches_an_uninterrupted_run(tmp_path, reference):
    out = tmp_path / "killed"
    kill_at = STEPS_PER_EPOCH + 2  # in the middle of the second epoch
    proc = subprocess.run(
        [sys.executable, os.fspath(HERE / "train_script.py"), os.fspath(out),
         "--kill-at-step", str(kill_at)],
        env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == STEPS_PER_EPOCH  # lost < 1 epoch

    resumed = tiny_model(seed=5)
    fit(resumed, tiny_data(), tiny_config(epochs=3), out, resume=True)
    _assert_same_state(reference["state"], _state(resumed))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_sigterm_mid_epoch_checkpoints_the_step_and_resumes_exactly(tmp_path, reference):
    """Pre-emption: SIGTERM arrives in the middle of step 5 (epoch 2); the run finishes that
    step, writes last.pt there, returns; a resumed run ends bit-identical to an
    uninterrupted one."""
    out = tmp_path / "preempted"
    pause_at = STEPS_PER_EPOCH + 2
    proc = subprocess.Popen(
        [sys.executable, os.fspath(HERE / "train_script.py"), os.fspath(out),
         "--pause-at-step", str(pause_at)],
        env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        line = proc.stdout.readline()  # the step has started and waits for us
        assert line.strip() == f"paused at step {pause_at}", line + proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGTERM)
        out_text, err = proc.communicate("go\n", timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "stopped_by SIGTERM" in out_text and "SIGTERM received" in err
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, 2, pause_at)

    resumed = tiny_model(seed=5)
    result = fit(resumed, tiny_data(), tiny_config(epochs=3), out, resume=True)
    assert result["finished"] and result["stopped_by"] is None
    _assert_same_state(reference["state"], _state(resumed))
    assert [r["loss"] for r in result["history"]] == [r["loss"] for r in reference["history"]]


class _SignallingSampler(DiscreteLambdaSampler):
    """OAT's sampler that sends the process ``signum`` at its ``at``-th call (1-based), i.e.
    in the middle of that training step."""

    def __init__(self, at: int, signum: int) -> None:
        super().__init__()
        self.at, self.signum, self.calls = at, signum, 0

    def __call__(self, batch_size, generator=None):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return super().__call__(batch_size, generator)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_at_the_end_of_an_epoch_resumes_exactly(tmp_path, reference, signum):
    """A signal during an epoch's last step: that step finishes, last.pt holds the whole
    epoch (not yet recorded), fit returns, the previous handler is back; resuming records the
    epoch (its learning rate included) and ends identical to an uninterrupted run."""
    previous = signal.getsignal(signum)
    result = fit(tiny_model(), tiny_data(), tiny_config(epochs=3), tmp_path,
                 sampler=_SignallingSampler(STEPS_PER_EPOCH, signum))
    assert signal.getsignal(signum) is previous
    assert result["stopped_by"] == signal.Signals(signum).name and not result["finished"]
    assert result["global_step"] == STEPS_PER_EPOCH and result["history"] == []
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, STEPS_PER_EPOCH)

    resumed = tiny_model(seed=9)
    result = fit(resumed, tiny_data(), tiny_config(epochs=3), tmp_path, resume=True)
    _assert_same_state(reference["state"], _state(resumed))
    for got, want in zip(result["history"], reference["history"], strict=True):
        assert {**got, "seconds": 0} == {**want, "seconds": 0}


class _CheckpointWatcher(DiscreteLambdaSampler):
    """OAT's sampler that records, at the start of every step, the step last.pt holds."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out, self.seen = out, []

    def __call__(self, batch_size, generator=None):
        path = self.out / "last.pt"
        self.seen.append(torch.load(path, weights_only=True)["global_step"]
                         if path.is_file() else None)
        return super().__call__(batch_size, generator)


@pytest.mark.parametrize(("every", "expected"), [
    ({}, [None, None, None, 3, 3, 3]),  # once per epoch (3 steps)
    ({"save_every_steps": 2}, [None, None, 2, 3, 4, 4]),
    ({"save_every_minutes": 1e-9}, [None, 1, 2, 3, 4, 5]),  # due after every step
])
def test_checkpoints_within_an_epoch(tmp_path, every, expected):
    watcher = _CheckpointWatcher(tmp_path)
    fit(tiny_model(), tiny_data(), tiny_config(epochs=2, **every), tmp_path, sampler=watcher)
    assert watcher.seen == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["film", "float", "floats"])
def test_ddp_two_processes_on_cpu_with_gloo(tmp_path, method):
    """torchrun, 2 processes, gloo: ranks end identical, the loss falls, rank 0 writes the
    checkpoint, and a run stopped mid-epoch then resumed matches the uninterrupted one."""
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
         os.fspath(HERE / "train_script.py"), os.fspath(out), "--ddp", "--epochs", "4",
         "--n-train", "64", "--batch-size", "32",  # 16 per process, 2 steps per epoch
         "--interrupt-at", "3", "--method", method],  # in the middle of epoch 2
        env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    full = [torch.load(out / "full" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    _assert_same_state(full[0]["state_dict"], full[1]["state_dict"])
    initial = tiny_model(method=method).state_dict()
    fc = "backbone.fc.weight"
    assert not torch.equal(full[0]["state_dict"][fc], initial[fc])
    losses = [r["loss"] for r in full[0]["history"]]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    for key in ("loss", "clean_acc", "adv_acc"):  # epoch metrics are all-reduced
        assert [r[key] for r in full[0]["history"]] == [r[key] for r in full[1]["history"]]
    ckpt = torch.load(out / "full" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["global_step"] == 4 * 2
    assert len((out / "full" / "metrics.jsonl").read_text().splitlines()) == 4
    _assert_same_state(ckpt["model"]["state_dict"], full[0]["state_dict"])

    for r in (0, 1):
        resumed = torch.load(out / "resumed" / f"rank{r}.pt", weights_only=True)
        _assert_same_state(full[r]["state_dict"], resumed["state_dict"])
        assert [h["loss"] for h in resumed["history"]] == losses
    if method != "film":
        return
    for r in (0, 1):  # both ranks stopped after the signalled step, and resumed exactly
        stop = torch.load(out / "preempted" / f"stop{r}.pt", weights_only=True)
        assert stop == {"stopped_by": "SIGTERM", "global_step": 3}
        preempted = torch.load(out / "preempted" / f"rank{r}.pt", weights_only=True)
        _assert_same_state(full[r]["state_dict"], preempted["state_dict"])
    unused = [torch.load(out / "unused" / f"rank{r}.pt", weights_only=True)["state_dict"]
              for r in (0, 1)]
    _assert_same_state(unused[0], unused[1])
    for key, value in unused[0].items():
        if ".clean." in key and key.endswith(("weight", "bias")):
            assert torch.equal(value, initial[key]), key  # no λ = 0 sample: untouched
    assert not torch.equal(unused[0][fc], initial[fc])


def test_fit_in_a_thread_leaves_signal_handlers_alone(tmp_path):
    """Only the main thread may install signal handlers: elsewhere fit trains without."""
    previous = signal.getsignal(signal.SIGTERM)
    results, errors = [], []

    def train():
        try:
            results.append(fit(tiny_model(), tiny_data(), tiny_config(max_steps=1), tmp_path))
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    assert not errors and results[0]["global_step"] == 1
    assert signal.getsignal(signal.SIGTERM) is previous


def test_ddp_syncs_only_the_norm_running_statistics():
    """Fixed buffers (FLOAT's noise, FLOATS' masks) are not broadcast every step."""
    model = tiny_model(method="floats")
    names = {id(b): n for n, b in model.named_buffers()}
    synced = [names[id(b)] for b in _BufferSync(model).buffers]
    running = [n for n in names.values()
               if n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    fixed = [n for n in names.values() if n.endswith((".noise", ".mask"))]
    assert running and fixed
    assert sorted(synced) == sorted(running)


def test_fast_fgsm_and_named_torchattacks_attacks():
    model = tiny_model()
    fast = make_attack(model, TrainConfig(attack="fgsm-rs", eps=8 / 255))
    assert isinstance(fast, torchattacks.FFGSM) and fast.alpha == pytest.approx(10 / 255)
    pgd = make_attack(model, TrainConfig())
    assert isinstance(pgd, torchattacks.PGD) and pgd.steps == 7
    assert pgd.alpha == pytest.approx(min(1.25 * 8 / 255, 12 / 255) / 7)
    assert default_alpha("pgd", 8 / 255, 10) == pytest.approx(10 / 255 / 10)
    tpgd = make_attack(model, TrainConfig(attack="TPGD", steps=3))
    assert isinstance(tpgd, torchattacks.TPGD) and tpgd.steps == 3
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        make_attack(model, TrainConfig(attack="nope"))


def test_fit_with_fgsm_rs_amp_and_custom_optimizer(tmp_path):
    model = tiny_model(lambdas=(0.0, 1.0))
    seen = []

    def optimizer(params):
        opt = torch.optim.Adam(params, lr=1e-3)
        seen.append(opt)
        return opt

    config = tiny_config(epochs=1, attack="fgsm-rs", amp=True, lambdas=(0.0, 1.0))
    result = fit(model, tiny_data(), config, tmp_path, optimizer=optimizer)
    assert len(seen) == 1 and result["finished"]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]["state"]


class _AutocastRecorder(torchattacks.FGSM):
    """FGSM recording the autocast dtype (None: no autocast) it ran under."""

    def __init__(self, model, eps):
        super().__init__(model, eps=eps)
        self.seen = []

    def forward(self, images, labels):
        enabled = torch.is_autocast_enabled("cpu")
        self.seen.append(torch.get_autocast_dtype("cpu") if enabled else None)
        return super().forward(images, labels)


@pytest.mark.parametrize(("amp_dtype", "attack_dtype"), [
    ("bfloat16", torch.bfloat16),
    ("float16", None),  # float16 attack gradients are not loss-scaled: the attack runs in fp32
])
def test_amp_training_on_cpu_with_a_groupnorm_backbone(tmp_path, amp_dtype, attack_dtype):
    model = _groupnorm_model()
    before = _state(model)
    attacks = []

    def attack(m):
        attacks.append(_AutocastRecorder(m, eps=2 / 255))
        return attacks[-1]

    config = tiny_config(epochs=1, amp=True, amp_dtype=amp_dtype, device="cpu")
    result = fit(model, tiny_data(), config, tmp_path, attack=attack,
                 eval_data=tiny_data(16, "test"))
    record = result["history"][0]
    assert math.isfinite(record["loss"]) and 0.0 <= record["eval_adv_acc@1"] <= 1.0
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert attacks[0].seen and set(attacks[0].seen) == {attack_dtype}
    assert set(attacks[1].seen) == {None}  # the evaluation runs in float32
    scaler = torch.load(tmp_path / "last.pt", weights_only=True)["scaler"]
    assert (scaler is not None) == (amp_dtype == "float16")
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize(("overrides", "match"), [
    ({"epochs": 0}, "epochs"),
    ({"schedule": "linear"}, "schedule"),
    ({"lambdas": (0.0, 1.5)}, r"\[0, 1\]"),
    ({"lambdas": (0.0,)}, "λ > 0"),
    ({"eps": -1.0}, "eps"),
    ({"device": "gpu"}, "device must be 'cpu', 'cuda' or 'cuda:<index>'"),
    ({"device": "cpu:1"}, "device must be"),
    ({"amp": True, "amp_dtype": "float8"}, "amp_dtype must be one of"),
    ({"amp_dtype": "bfloat16"}, "needs amp=True"),
    ({"save_every_steps": 0}, "save_every_steps"),
    ({"save_every_minutes": -1.0}, "save_every_minutes"),
])
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**overrides)


def test_fit_rejects_a_cuda_device_it_cannot_use(tmp_path):
    # No CUDA here: "needs CUDA"; with CUDA, there is no 100th device: "does not exist".
    with pytest.raises(ValueError, match="CUDA"):
        fit(tiny_model(), tiny_data(), tiny_config(device="cuda:99"), tmp_path)


def test_fit_rejects_a_dataset_smaller_than_a_batch(tmp_path):
    with pytest.raises(ValueError, match="smaller than one batch"):
        fit(tiny_model(), tiny_data(8), tiny_config(), tmp_path)


def test_fit_refuses_a_lambda_set_that_leaves_film_codes_untrained(tmp_path):
    with pytest.raises(ValueError, match=r"codes of \[0.1, 0.2, 0.3, 0.4\] would stay untrained"):
        fit(tiny_model(), tiny_data(), tiny_config(lambdas=(0.0, 1.0)), tmp_path)
    assert not (tmp_path / "last.pt").exists()


def test_explicit_sampler_is_used(tmp_path):
    model = tiny_model(encoding="sinusoidal")  # continuous codes: any λ set trains them
    calls = []

    class Recording(DiscreteLambdaSampler):
        def __call__(self, batch_size, generator=None):
            lam = super().__call__(batch_size, generator)
            calls.append(lam)
            return lam

    fit(model, tiny_data(), tiny_config(epochs=1), tmp_path,
        sampler=Recording((0.0, 0.5), clean_fraction=0.25))
    assert len(calls) == STEPS_PER_EPOCH
    for lam in calls:
        assert int((lam == 0).sum()) == 4 and set(lam.tolist()) == {0.0, 0.5}


def test_fit_prepares_floats_snip_masks_from_the_first_batch(tmp_path):
    """FLOATS with SNIP masks: the method chooses them (prepare) before training starts."""
    model = tiny_model(method="floats", prune="snip")
    assert all(mask.pending for _, _, mask in weight_masks(model.backbone))
    result = fit(model, tiny_data(), tiny_config(epochs=1, max_steps=1), tmp_path)
    assert result["global_step"] == 1
    found = weight_masks(model.backbone)
    assert found and not any(mask.pending for _, _, mask in found)
    kept = sum(int(m.mask.sum()) for _, _, m in found) / sum(m.mask.numel() for _, _, m in found)
    assert kept == pytest.approx(0.5, abs=0.01)
    loaded = oat_plugins.load(tmp_path / "last.pt")
    assert not any(mask.pending for _, _, mask in weight_masks(loaded.backbone))


TINY_CLI = ["--model", "resnet10t", "--model-kwargs",
            '{"channels": [8, 16, 32, 64], "stem_width": 8}', "--method", "film",
            "--data", "bundled", "--batch-size", "16", "--lambdas", "0,0.2,1",
            "--eps", "8/255", "--steps", "1", "--no-progress"]


def test_cli_train_runs_end_to_end_on_the_bundled_sample(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(["train", *TINY_CLI, "--epochs", "1", "--limit-train", "32",
                     "--eval-samples", "16", "--device", "cpu", "--out", os.fspath(out)])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    model = oat_plugins.load(out / "model.pt")
    assert model.method_name == "film" and model.num_classes == 10
    assert list(model.method.options.lambdas) == [0.0, 0.2, 1.0]  # --lambdas reaches film
    assert oat_plugins.load(out / "last.pt").state_dict().keys() == model.state_dict().keys()
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["epoch"] == 1 and "eval_clean_acc@0" in record

    # --max-steps and --resume: a second run continues the first.
    out2 = tmp_path / "steps"
    assert cli_main(["train", *TINY_CLI, "--epochs", "1", "--max-steps", "1",
                     "--eval-samples", "0", "--out", os.fspath(out2)]) == 0
    assert cli_main(["train", *TINY_CLI, "--epochs", "1", "--max-steps", "2", "--resume",
                     "--eval-samples", "0", "--out", os.fspath(out2)]) == 0
    assert torch.load(out2 / "last.pt", weights_only=True)["global_step"] == 2


def test_cli_trains_floats_with_snip_masks(tmp_path):
    cli = [a if a != "film" else "floats" for a in TINY_CLI]
    cli = cli[:cli.index("--lambdas")] + cli[cli.index("--lambdas") + 2:]
    out = tmp_path / "floats"
    assert cli_main(["train", *cli, "--option", "prune=snip", "--epochs", "1",
                     "--max-steps", "1", "--eval-samples", "0", "--out", os.fspath(out)]) == 0
    model = oat_plugins.load(out / "model.pt")
    assert model.method.options.prune == "snip"
    assert not any(mask.pending for _, _, mask in weight_masks(model.backbone))


def test_cli_train_exits_143_on_sigterm_and_resumes(tmp_path):
    out = tmp_path / "preempted"
    args = ["train", *TINY_CLI, "--epochs", "10", "--limit-train", "32", "--eval-samples", "0",
            "--log-every", "1", "--out", os.fspath(out)]
    proc = subprocess.Popen([sys.executable, "-m", "oat_plugins.cli", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # wait until training has begun
            if "step 1/2" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert not (out / "model.pt").exists()
    step = torch.load(out / "last.pt", weights_only=True)["global_step"]
    assert 1 <= step < 20
    assert cli_main([*args, "--resume"]) == 0
    assert torch.load(out / "last.pt", weights_only=True)["global_step"] == 20


@pytest.mark.parametrize(("args", "message"), [
    (["--lambdas", "0,0.5,2"], "must be in [0, 1]"),
    (["--lambdas", "0,x"], "'x' is not a number"),
    (["--lambdas", "0"], "at least one λ > 0"),
    (["--eps", "8/0"], "expected a number"),
    (["--amp-dtype", "float8"], "invalid choice"),
    (["--save-every-steps", "0"], "expected a positive integer"),
])
def test_cli_train_rejects_bad_arguments(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", "--model", "resnet10t", "--method", "film", "--out",
                  os.fspath(tmp_path), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "imagenet"], "unknown dataset 'imagenet'"),
    (["--data", "./no/such/dir"], "does not exist"),
    (["--device", "gpu"], "device must be"),
])
def test_cli_train_reports_bad_data_or_device(tmp_path, capsys, args, message):
    code = cli_main(["train", "--model", "resnet10t", "--method", "film", *args,
                     "--out", os.fspath(tmp_path)])
    assert code == 2
    assert message in capsys.readouterr().err


def test_extremes_sampler_batches_hold_no_zero_weight_clean_terms():
    """With FLOAT's sampler (half λ=0, half λ=1) the training forward holds the clean λ=0
    samples and the adversarial λ=1 ones only: the robust norms never see clean images."""
    from oat_plugins.samplers import ExtremesLambdaSampler

    model = _groupnorm_model().train()
    seen = []
    model.backbone.register_forward_pre_hook(
        lambda m, args: seen.append((args[0].shape[0], model.lam.clone()))
        if m.training else None)
    lam = ExtremesLambdaSampler()(8, torch.Generator().manual_seed(0))
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    oat_loss(model, x, y, lam, torchattacks.FGSM(model, eps=2 / 255))
    assert len(seen) == 1
    batch, lam_seen = seen[0]
    assert batch == 8 and int((lam_seen == 0).sum()) == 4 and int((lam_seen == 1).sum()) == 4


def test_fit_trains_a_method_that_serves_lambda_groups(tmp_path):
    torch.manual_seed(0)
    model = oat_plugins.ConditionalModel(
        timm.create_model("resnet10t", num_classes=10, **TINY_KWARGS), ScalarFilm(),
        normalize=None)
    before = _state(model)
    result = fit(model, tiny_data(), tiny_config(epochs=1), tmp_path)
    assert result["finished"] and torch.isfinite(torch.tensor(result["history"][0]["loss"]))
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.lam == 0.0


def test_oat_sampler_spreads_each_batch_evenly_over_the_nonzero_lambdas():
    """The λ = 0 share is exact and every λ > 0 value gets n // k or n // k + 1 samples of the
    rest (so a method that runs one forward per λ group never gets a group of one from a batch
    of 16), in a shuffled order that changes from batch to batch."""
    from oat_plugins.samplers import DiscreteLambdaSampler

    sampler = DiscreteLambdaSampler()  # OAT's {0, .1, .2, .3, .4, 1}, 1/6 at λ = 0
    generator = torch.Generator().manual_seed(0)
    batches = [sampler(16, generator) for _ in range(60)]
    totals = torch.zeros(6)
    for lam in batches:
        values, counts = lam.unique(return_counts=True)
        assert values.tolist() == pytest.approx(sampler.lambdas)
        assert counts[0] == 3 and set(counts[1:].tolist()) <= {2, 3}
        totals += counts
    assert totals[1:].min() >= 0.9 * totals[1:].max()  # the extra samples rotate over values
    assert len({tuple(lam.tolist()) for lam in batches}) == len(batches)
