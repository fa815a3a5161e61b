"""One adversarial training loop for every conditional method (OAT's recipe by default).

Per step: λ is drawn per sample by the method's sampler (or ``config.lambdas``); adversarial
examples are generated with torchattacks only for the samples with λ > 0, with the model in
eval mode at their λ; the loss is ``mean_i[(1 − λ_i)·CE(f_λi(x_i)) + λ_i·CE(f_λi(x_adv_i))]``
(the adversarial term exists only for λ_i > 0).

>>> import oat_plugins
>>> from oat_plugins.data import load_dataset
>>> from oat_plugins.train import TrainConfig, fit
>>> model = oat_plugins.wrap("resnet18", "film", model_kwargs={"num_classes": 10})
>>> fit(model, load_dataset("bundled"), TrainConfig(epochs=1), "runs/demo")

The same script runs under ``torchrun --nproc_per_node N`` (DistributedDataParallel; gloo on
CPU, nccl on GPU): ``batch_size`` is the global batch, split over the processes.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torchattacks
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ._io import atomic_torch_save, atomic_write_text
from .attacks import ATTACKS, build_attack, find_attack  # noqa: F401  (ATTACKS: public name)
from .condition import lambda_groups
from .losses import LossContext, LossForward
from .model import ConditionalModel, read_checkpoint, to_checkpoint
from .samplers import DiscreteLambdaSampler, LambdaSampler

logger = logging.getLogger(__name__)

__all__ = [
    "LossForward",
    "TrainConfig",
    "config_from_dict",
    "default_alpha",
    "fit",
    "make_attack",
    "oat_loss",
]

CHECKPOINT_NAME = "last.pt"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
SCHEDULES = ("cosine", "step", "constant")

AttackFactory = Callable[[nn.Module], torchattacks.attack.Attack]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]


@dataclass
class TrainConfig:
    """Training settings; defaults follow OAT's recipe (SGD 0.1, momentum 0.9, wd 5e-4,
    cosine, batch 128, PGD-7 at ε = 8/255 with step min(1.25ε, ε + 4/255)/7).

    Attributes:
        epochs: passes over the training data.
        batch_size: global batch size (split evenly over DDP processes).
        lr, momentum, weight_decay, nesterov: SGD settings.
        schedule: learning-rate schedule per optimizer step: ``'cosine'`` (to 0),
            ``'step'`` (×0.1 at 50 % and 75 %) or ``'constant'``.
        eps: attack budget (L∞ for ``'pgd'`` / ``'fgsm-rs'``).
        alpha: attack step; None → ``min(1.25ε, ε + 4/255) / steps`` for PGD (OAT), 1.25ε for
            FGSM with random start (Wong et al., "Fast is better than free").
        steps: attack iterations (PGD).
        random_start: PGD starts from a uniform point in the ε-ball.
        attack: ``'pgd'``, ``'fgsm-rs'`` (fast training) or the class name of any torchattacks
            attack (built with whichever of eps/alpha/steps/random_start it accepts); for full
            control pass ``fit(..., attack=factory)``.
        lambdas: training λ set for OAT's discrete sampler; None → the method's default sampler.
        clean_fraction: share of each batch at λ = 0 with ``lambdas`` (None: 1/len(lambdas)).
        amp: mixed precision (float16 + GradScaler on CUDA, bfloat16 on CPU).
        seed: seeds everything; the randomness of each step is a function of
            (seed, epoch, step, rank), so runs and resumed runs are reproducible.
        max_steps: stop after this many optimizer steps in total (smoke runs); a checkpoint is
            written there and ``resume`` continues from it.
        num_workers: DataLoader worker processes.
        log_every: log a line every this many steps (0: only per epoch).
        eval_lambdas: λ values to evaluate ``eval_data`` at after each epoch.
        eval_adversarial: also measure accuracy under the training attack on ``eval_data``.
        eval_max_samples: cap on evaluated samples per epoch.
        find_unused_parameters: passed to DistributedDataParallel (a norm branch, or a
            method's piece, can be unused on one rank in one step).
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        progress: show a tqdm progress bar (rank 0, when stderr is a terminal).
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    eps: float = 8 / 255
    alpha: float | None = None
    steps: int = 7
    random_start: bool = True
    attack: str = "pgd"
    lambdas: tuple[float, ...] | None = None
    clean_fraction: float | None = None
    amp: bool = False
    seed: int = 0
    max_steps: int | None = None
    num_workers: int = 0
    log_every: int = 50
    eval_lambdas: tuple[float, ...] = (0.0, 1.0)
    eval_adversarial: bool = True
    eval_max_samples: int = 1000
    find_unused_parameters: bool = True
    grad_clip: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.lambdas is not None:
            self.lambdas = tuple(float(v) for v in self.lambdas)
        self.eval_lambdas = tuple(float(v) for v in self.eval_lambdas)
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.eps >= 0, f"eps must be >= 0, got {self.eps}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.alpha is None or self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
            (self.schedule in SCHEDULES,
             f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.max_steps is None or self.max_steps >= 1,
             f"max_steps must be >= 1, got {self.max_steps}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.lambdas is not None:
            # Validates the set (range, share) with the sampler's own checks.
            DiscreteLambdaSampler(self.lambdas, self.clean_fraction)
            if not any(v > 0 for v in self.lambdas):
                raise ValueError(f"lambdas needs at least one λ > 0 (λ = 0 alone is plain "
                                 f"training), got {self.lambdas}")
        for lam in self.eval_lambdas:
            if not 0.0 <= lam <= 1.0:
                raise ValueError(f"eval_lambdas must be in [0, 1], got {self.eval_lambdas}")


def default_alpha(attack: str, eps: float, steps: int) -> float:
    """OAT's PGD step ``min(1.25ε, ε + 4/255) / steps``, or the attack's own default step
    where it has one (1.25ε for ``'fgsm-rs'``, FGSM with random start)."""
    spec = find_attack(attack)
    if spec is not None and spec.default_alpha is not None:
        return spec.default_alpha(eps, steps)
    return min(1.25 * eps, eps + 4 / 255) / steps


def make_attack(model: nn.Module, config: TrainConfig) -> torchattacks.attack.Attack:
    """The attack named by ``config.attack`` (:mod:`oat_plugins.attacks`) on ``model`` (build
    it after the model is on its device: torchattacks reads the device from the parameters)."""
    alpha = config.alpha if config.alpha is not None else default_alpha(
        config.attack, config.eps, config.steps)
    return build_attack(config.attack, model, eps=config.eps, alpha=alpha, steps=config.steps,
                        random_start=config.random_start, seed=config.seed)


# -- distributed helpers ---------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _sync_buffers(model: nn.Module) -> None:
    """Broadcast every buffer (BN running statistics, ...) from rank 0, one flat tensor per
    dtype and device."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for buffer in model.buffers():
        groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
    for buffers in groups.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, 0)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def _setup_distributed() -> _Dist:
    """Join the process group when launched by torchrun (RANK / WORLD_SIZE in the
    environment); nccl on CUDA, gloo on CPU. A no-op for a plain single process."""
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return _Dist()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, initialised_here=True)


def _device(d: _Dist) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", d.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


# -- reproducibility -------------------------------------------------------------------------
def _step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    state = np.random.SeedSequence([seed, epoch, step, rank]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    """RNG states as tensors / plain lists (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
        "lambda_generator": generator.get_state(),
    }


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    generator.set_state(state["lambda_generator"])


# -- optimisation ----------------------------------------------------------------------------
def _default_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, nesterov=config.nesterov)


def _default_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                       schedule: str) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(total_steps, 1)
    if schedule == "cosine":
        def factor(step: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    elif schedule == "step":
        def factor(step: int) -> float:
            return 0.1 ** ((step >= 0.5 * total) + (step >= 0.75 * total))
    else:
        def factor(step: int) -> float:
            return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- the loss --------------------------------------------------------------------------------
def adversarial_examples(model: ConditionalModel, attack: torchattacks.attack.Attack,
                         x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Adversarial examples with each sample attacked at its λ, one λ group at a time: each
    group is attacked at a scalar λ, so attacks that query the model on a subset of their
    batch (APGD, FAB, Square, AutoAttack) see a consistent model."""
    x_adv = torch.empty_like(x)
    for value, idx in lambda_groups(lam):
        # frozen: each group's conditioned weights are folded once per attack, not per step
        with model.at(value), model.frozen():
            x_adv[idx] = attack(x[idx], y[idx]).detach()
    return x_adv


def oat_loss(
    model: ConditionalModel,
    x: torch.Tensor,
    y: torch.Tensor,
    lam: torch.Tensor,
    attack: torchattacks.attack.Attack,
    *,
    forward: nn.Module | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch: ``attack`` is run on the λ > 0 samples only, at
    their λ (torchattacks puts the model in eval mode for it), then the method's
    ``training_loss`` (OAT's loss ``Σ_i [(1 − λ_i)·CE(f_λi(x_i)) + λ_i·CE(f_λi(x_adv_i))] / N``
    by default) sees a :class:`~oat_plugins.losses.LossContext`. ``forward`` is the
    :class:`LossForward` of ``model``, or a wrapper of it such as DistributedDataParallel
    (default: a new ``LossForward(model)``). Returns the loss and batch statistics.
    """
    autocast = contextlib.nullcontext if autocast is None else autocast
    was_training = model.training
    adv = lam > 0
    x_adv = x[:0]
    if bool(adv.any()):
        with autocast():
            x_adv = adversarial_examples(model, attack, x[adv], y[adv], lam[adv])
        if model.training != was_training:
            raise RuntimeError("the attack changed the model's train/eval mode")
    ctx = LossContext(model, x, y, lam, x_adv,
                      LossForward(model) if forward is None else forward, autocast)
    return model.method.training_loss(ctx)


# -- data --------------------------------------------------------------------------------------
class _IndexSampler(Sampler[int]):
    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = list(indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _epoch_loader(dataset: Dataset, config: TrainConfig, d: _Dist, epoch: int,
                  skip_batches: int, local_batch: int, pin: bool) -> DataLoader:
    """The batches of one epoch for this rank: order a function of (seed, epoch)."""
    sampler = DistributedSampler(dataset, num_replicas=d.world_size, rank=d.rank,
                                 shuffle=True, seed=config.seed, drop_last=True)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    usable = len(indices) // local_batch * local_batch
    indices = indices[skip_batches * local_batch:usable]
    generator = torch.Generator().manual_seed(_step_seed(config.seed, epoch, 1 << 30, d.rank))
    return DataLoader(dataset, batch_size=local_batch, sampler=_IndexSampler(indices),
                      num_workers=config.num_workers, drop_last=True, pin_memory=pin,
                      generator=generator)


@torch.no_grad()
def _accuracy(model: ConditionalModel, data: Dataset, lam: float, device: torch.device,
              batch_size: int, max_samples: int) -> float:
    correct = total = 0
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    with _lambda(model, lam):
        for x, y in loader:
            x, y = x.to(device)[: max_samples - total], y.to(device)[: max_samples - total]
            correct += int((model(x).argmax(1) == y).sum())
            total += y.numel()
            if total >= max_samples:
                break
    return correct / max(total, 1)


def _adv_accuracy(model: ConditionalModel, attack: torchattacks.attack.Attack, data: Dataset,
                  lam: float, device: torch.device, batch_size: int, max_samples: int) -> float:
    correct = total = 0
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    with _lambda(model, lam):
        for x, y in loader:
            x, y = x.to(device)[: max_samples - total], y.to(device)[: max_samples - total]
            x_adv = attack(x, y)
            with torch.no_grad():
                correct += int((model(x_adv).argmax(1) == y).sum())
            total += y.numel()
            if total >= max_samples:
                break
    return correct / max(total, 1)


@contextlib.contextmanager
def _lambda(model: ConditionalModel, lam: float) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with model.at(lam):
            yield
    finally:
        model.train(was_training)


# -- metrics -----------------------------------------------------------------------------------
def _write_metrics(out: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text("".join(json.dumps(r) + "\n" for r in history), out / METRICS_JSONL)
    keys: list[str] = []
    for record in history:
        keys += [k for k in record if k not in keys]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(buffer.getvalue(), out / METRICS_CSV)


def _read_metrics(out: Path, up_to_epoch: int) -> list[dict[str, Any]]:
    path = out / METRICS_JSONL
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("epoch", 0) <= up_to_epoch:
                records.append(record)
    return records


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


# -- the loop ----------------------------------------------------------------------------------
def fit(
    model: ConditionalModel,
    train_data: Dataset,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    eval_data: Dataset | None = None,
    sampler: LambdaSampler | None = None,
    attack: AttackFactory | None = None,
    optimizer: OptimizerFactory | None = None,
    scheduler: SchedulerFactory | None = None,
) -> dict[str, Any]:
    """Adversarially train ``model`` (any method) on ``train_data`` of (image in [0, 1], label).

    Writes ``out_dir/last.pt`` (atomically, after every epoch and at ``max_steps``) holding the
    model (``oat_plugins.load`` reads it), optimizer, scheduler, GradScaler, RNG states, epoch
    and step, and ``metrics.jsonl`` / ``metrics.csv`` with one line per epoch.

    Args:
        model: a :class:`~oat_plugins.ConditionalModel`; moved to CUDA when available.
        train_data: training dataset (augmentation is the dataset's transform).
        config: :class:`TrainConfig`.
        out_dir: directory for the checkpoint and metrics (rank 0 writes).
        resume: continue from ``out_dir/last.pt`` if it exists (else start fresh). The
            finished run has the same weights as an uninterrupted one (bit-identical on CPU
            and with ``num_workers=0``; GPU kernels may be non-deterministic).
        eval_data: evaluated after each epoch at ``config.eval_lambdas`` (clean, and under the
            training attack when ``config.eval_adversarial``), on rank 0.
        sampler: λ sampler; default ``config.lambdas`` if set, else the method's own.
        attack: ``factory(model) -> torchattacks.Attack`` replacing ``config.attack``.
        optimizer: ``factory(params) -> Optimizer`` replacing SGD.
        scheduler: ``factory(optimizer, total_steps) -> LRScheduler`` stepped every optimizer
            step, replacing ``config.schedule``.

    Returns:
        ``{'history': [per-epoch metrics], 'epoch': epochs done, 'global_step': steps done,
        'checkpoint': path of last.pt, 'finished': whether all epochs ran}``. The model is
        left in eval mode at the scalar λ it had before (0 if it had a per-sample λ).
    """
    if not isinstance(model, ConditionalModel):
        raise ValueError(f"fit trains a ConditionalModel (oat_plugins.wrap), got "
                         f"{type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    out = Path(out_dir)
    d = _setup_distributed()
    try:
        return _fit(model, train_data, config, out, d, resume, eval_data, sampler, attack,
                    optimizer, scheduler)
    finally:
        if d.initialised_here:
            dist.destroy_process_group()


def _fit(model, train_data, config, out, d, resume, eval_data, lam_sampler, attack_factory,
         optimizer_factory, scheduler_factory) -> dict[str, Any]:
    if config.batch_size % d.world_size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                         f"{d.world_size} processes")
    local_batch = config.batch_size // d.world_size
    per_rank = len(train_data) // d.world_size
    steps_per_epoch = per_rank // local_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(train_data)} samples) is smaller than one "
                         f"batch ({config.batch_size})")
    if lam_sampler is None and config.lambdas is not None:
        lam_sampler = DiscreteLambdaSampler(config.lambdas, config.clean_fraction)
    elif lam_sampler is None:
        try:
            lam_sampler = model.method.default_sampler()
        except NotImplementedError:
            raise ValueError(
                f"method {model.method_name!r} declares no default λ sampler; pass "
                "TrainConfig(lambdas=...) or fit(..., sampler=...)"
            ) from None
    model.method.check_sampler(lam_sampler)
    n_clean = round(getattr(lam_sampler, "clean_fraction", 0.5) * local_batch)
    if 0 < n_clean < 2 or local_batch - n_clean < 2:
        logger.warning("only %d of the %d samples per process are at λ = 0: batch norms see "
                       "tiny routed sub-batches; use a larger batch", n_clean, local_batch)
    device = _device(d)
    model.to(device)
    x0, y0 = next(iter(DataLoader(train_data, batch_size=local_batch)))
    model.method.prepare(model, x0.to(device), y0.to(device))
    final_lam = model.lam if isinstance(model.lam, float) else 0.0
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = (optimizer_factory(params) if optimizer_factory is not None
           else _default_optimizer(params, config))
    total_steps = config.epochs * steps_per_epoch
    sched = (scheduler_factory(opt, total_steps) if scheduler_factory is not None
             else _default_scheduler(opt, total_steps, config.schedule))
    use_scaler = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    lam_generator = torch.Generator()

    start_epoch, start_step, global_step, history = 0, 0, 0, []
    resumed_partial: dict[str, Any] = {}
    ckpt_path = out / CHECKPOINT_NAME
    d.barrier()  # rank 0 may have just created out/
    if resume and ckpt_path.is_file():
        state = read_checkpoint(ckpt_path, map_location="cpu")
        if not isinstance(state, dict) or "optimizer" not in state:
            raise ValueError(f"{os.fspath(ckpt_path)!r} is not a training checkpoint")
        if state["model"]["method"] != model.method_name:
            raise ValueError(f"{os.fspath(ckpt_path)!r} trained method "
                             f"{state['model']['method']!r}, not {model.method_name!r}")
        model.load_state_dict(state["model"]["state_dict"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_step = state["epoch"], state["step_in_epoch"]
        resumed_partial = state.get("epoch_partial") or {}
        global_step = state["global_step"]
        _set_rng_state(state["rng"], lam_generator)
        old = state.get("config", {})
        changed = {k: (old[k], v) for k, v in asdict(config).items()
                   if k in old and old[k] != v and k not in ("max_steps", "progress")}
        if changed:
            logger.warning("resuming with a changed config (old, new): %s", changed)
        if state.get("world_size", 1) != d.world_size and start_step:
            logger.warning("resuming mid-epoch with %d processes instead of %d: the rest of "
                           "that epoch's data order differs", d.world_size, state["world_size"])
        history = _read_metrics(out, start_epoch)
        logger.info("resumed from %s at epoch %d, step %d", ckpt_path, start_epoch, global_step)
    elif resume:
        logger.info("no checkpoint at %s; starting from scratch", ckpt_path)
    elif ckpt_path.is_file() and d.is_main:
        logger.warning("%s exists and will be overwritten (resume=True / --resume continues "
                       "from it)", ckpt_path)
    d.barrier()  # nobody writes last.pt before every rank has read it

    net: nn.Module = LossForward(model)
    if d.enabled:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters,
            broadcast_buffers=False)  # _sync_buffers runs before the attack instead
    atk = attack_factory(model) if attack_factory is not None else make_attack(model, config)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=amp_dtype, enabled=config.amp)

    partial: dict[str, Any] = {}  # sums and seconds of an epoch interrupted by max_steps

    def save_checkpoint(epoch: int, step_in_epoch: int) -> None:
        if not d.is_main:
            return
        model.set_lambda(final_lam)
        atomic_torch_save({
            "model": to_checkpoint(model),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if use_scaler else None,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "epoch_partial": partial if step_in_epoch else {},
            "global_step": global_step,
            "steps_per_epoch": steps_per_epoch,
            "rng": _rng_state(lam_generator),
            "config": asdict(config),
            "sampler": lam_sampler.describe(),
            "world_size": d.world_size,
        }, ckpt_path)

    if d.is_main:
        logger.info("training %s (%s) for %d epochs x %d steps, batch %d on %d process(es), "
                    "device %s, λ sampler %s", type(model.backbone).__name__, model.method_name,
                    config.epochs, steps_per_epoch, config.batch_size, d.world_size, device,
                    lam_sampler.describe())
    stopped = False
    epoch_done = start_epoch
    for epoch in range(start_epoch, config.epochs):
        if config.max_steps is not None and global_step >= config.max_steps:
            stopped = True
            break
        skip = start_step if epoch == start_epoch else 0
        loader = _epoch_loader(train_data, config, d, epoch, skip, local_batch,
                               pin=device.type == "cuda")
        model.train()
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        if skip and resumed_partial:
            if d.is_main:  # the saved sums are already summed over ranks
                sums = dict(resumed_partial["sums"])
            t0 -= resumed_partial["seconds"]
        last_lr = float(opt.param_groups[0]["lr"])
        bar = _progress(steps_per_epoch, skip, config.progress and d.is_main,
                        f"epoch {epoch + 1}/{config.epochs}")
        batches = iter(loader)
        step_in_epoch = skip
        for step_in_epoch in range(skip, steps_per_epoch):
            if config.max_steps is not None and global_step >= config.max_steps:
                stopped = True
                break
            seed = _step_seed(config.seed, epoch, step_in_epoch, d.rank)
            torch.manual_seed(seed)  # augmentation (num_workers=0), attack random starts
            lam_generator.manual_seed(seed)
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            lam = lam_sampler(x.shape[0], lam_generator).to(device)
            if d.enabled:
                # Every rank attacks (eval mode) and trains with rank 0's running statistics,
                # so a resumed run, restarted from rank 0's checkpoint, matches exactly.
                with torch.no_grad():
                    _sync_buffers(model)
            loss, stats = oat_loss(model, x, y, lam, atk, forward=net, autocast=autocast)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip is not None:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            scaler.step(opt)
            scaler.update()
            last_lr = float(opt.param_groups[0]["lr"])
            sched.step()
            global_step += 1
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at epoch {epoch + 1}, "
                                         f"step {global_step}")
            stats["loss_sum"] = loss_value * stats["n"]
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if d.is_main and config.log_every and global_step % config.log_every == 0:
                logger.info("epoch %d step %d/%d loss %.4f lr %.4g", epoch + 1,
                            step_in_epoch + 1, steps_per_epoch, loss_value,
                            opt.param_groups[0]["lr"])
        else:
            step_in_epoch = steps_per_epoch
        bar.close()
        model.set_lambda(final_lam)
        if d.enabled:
            # DDP keeps parameters in sync; buffers (BN running statistics) are broadcast from
            # rank 0 only at the next forward. Sync them now, so every rank holds the model
            # that rank 0 checkpoints and evaluates.
            with torch.no_grad():
                _sync_buffers(model)
        if stopped and step_in_epoch < steps_per_epoch:
            partial.update(sums=_reduce_sums(sums, d, device), seconds=time.perf_counter() - t0)
            save_checkpoint(epoch, step_in_epoch)
            d.barrier()
            logger.info("stopped at max_steps=%s (epoch %d, step %d of %d)", config.max_steps,
                        epoch + 1, step_in_epoch, steps_per_epoch)
            break
        record = _epoch_record(epoch, sums, last_lr, time.perf_counter() - t0, d, device)
        if eval_data is not None and d.is_main:
            record.update(_evaluate(model, eval_data, config, local_batch, device, atk))
        save_checkpoint(epoch + 1, 0)
        history.append(record)  # the same training metrics on every rank (all-reduced)
        if d.is_main:
            _write_metrics(out, history)
            logger.info("epoch %d: %s", epoch + 1, ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in record.items() if k != "epoch"))
        d.barrier()
        epoch_done = epoch + 1
    model.set_lambda(final_lam)
    model.eval()
    return {"history": history, "epoch": epoch_done, "global_step": global_step,
            "checkpoint": os.fspath(ckpt_path), "finished": epoch_done >= config.epochs}


def _reduce_sums(sums: dict[str, float], d: _Dist, device: torch.device) -> dict[str, float]:
    """Sum the per-rank epoch sums over all ranks (a collective: every rank calls it)."""
    if not d.enabled:
        return dict(sums)
    gathered: list[list[str] | None] = [None] * d.world_size
    dist.all_gather_object(gathered, sorted(sums))
    keys = sorted(set().union(*gathered))
    totals = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64,
                          device=device if device.type == "cuda" else None)
    dist.all_reduce(totals)
    return dict(zip(keys, totals.tolist(), strict=True))


def _epoch_record(epoch: int, sums: dict[str, float], lr: float, seconds: float, d: _Dist,
                  device: torch.device) -> dict[str, Any]:
    sums = _reduce_sums(sums, d, device)
    keys = sorted(sums)
    n = max(sums.get("n", 0.0), 1.0)
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "loss": sums.get("loss_sum", 0.0) / n,
        "clean_acc": sums.get("clean_correct", 0.0) / max(sums.get("n_clean", 0.0), 1.0),
        "adv_acc": sums.get("adv_correct", 0.0) / max(sums.get("n_adv", 0.0), 1.0),
        "lr": lr,  # used by the epoch's last step
        "seconds": seconds,
    }
    for key in keys:
        if key.startswith("loss_") and key != "loss_sum":  # a method's extra loss terms
            record[key] = sums[key] / max(sums.get("steps", 1.0), 1.0)
    return record


def _evaluate(model: ConditionalModel, data: Dataset, config: TrainConfig, batch_size: int,
              device: torch.device, atk: torchattacks.attack.Attack) -> dict[str, float]:
    results: dict[str, float] = {}
    state = torch.get_rng_state()
    for lam in config.eval_lambdas:
        results[f"eval_clean_acc@{lam:g}"] = _accuracy(
            model, data, lam, device, batch_size, config.eval_max_samples)
        if config.eval_adversarial:
            results[f"eval_adv_acc@{lam:g}"] = _adv_accuracy(
                model, atk, data, lam, device, batch_size, config.eval_max_samples)
    torch.set_rng_state(state)
    return results


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from a dict (e.g. a checkpoint's ``'config'``); unknown keys
    raise a ``ValueError`` listing the known ones."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(known)}")
    return TrainConfig(**values)
