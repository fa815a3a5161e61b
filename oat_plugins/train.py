"""One adversarial training loop for every conditional method (OAT's recipe by default).

Per step: λ is drawn per sample by the method's sampler (or ``config.lambdas``); adversarial
examples are generated with torchattacks only for the samples with λ > 0, one λ group at a
time with the model in eval mode at that λ; then the method's ``training_loss`` (OAT's
``mean_i[(1 − λ_i)·CE(f_λi(x_i)) + λ_i·CE(f_λi(x_adv_i))]`` by default) is minimised.

>>> import oat_plugins
>>> from oat_plugins.data import load_dataset
>>> from oat_plugins.train import TrainConfig, fit
>>> model = oat_plugins.wrap("resnet18", "film", model_kwargs={"num_classes": 10})
>>> fit(model, load_dataset("bundled"), TrainConfig(epochs=1), "runs/demo")

The same script runs under ``torchrun --nproc_per_node N`` (DistributedDataParallel; gloo on
CPU, nccl on GPU): ``batch_size`` is the global batch, split over the processes. SIGTERM or
SIGINT (cluster pre-emption, Ctrl-C) finishes the current step, writes ``last.pt`` and returns;
``resume=True`` continues from it.
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
import signal
import sys
import threading
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
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from ._io import atomic_torch_save, atomic_write_text
from ._malloc import tune_cpu_allocator
from .attacks import (  # noqa: F401  (ATTACKS: public name)
    ATTACKS,
    build_attack,
    find_attack,
    queries_whole_batch,
)
from .condition import lambda_groups
from .evaluate import evaluate
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
AutocastFactory = Callable[[], contextlib.AbstractContextManager]

AMP_DTYPES = ("float16", "bfloat16")
STOP_SIGNALS = ("SIGTERM", "SIGINT")
"""Signals that stop a run cleanly after the current step (with a checkpoint)."""

# Settings a resumed run may change without a warning (where and how it runs, not what).
_RUNTIME_FIELDS = ("max_steps", "progress", "device", "num_workers", "log_every",
                   "save_every_steps", "save_every_minutes")


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
        device: ``'cpu'``, ``'cuda'`` or ``'cuda:<index>'``; None picks CUDA when available,
            else the CPU. Under torchrun ``'cuda'`` (or None) means ``cuda:<LOCAL_RANK>``.
        amp: mixed precision for the loss forward (autocast, plus a GradScaler for float16).
        amp_dtype: ``'float16'`` or ``'bfloat16'``; None → float16 on CUDA, bfloat16 on CPU.
            The attack runs under autocast only with bfloat16: its input gradient is not
            loss-scaled, and in float16 it can underflow, so with float16 it runs in float32.
        seed: seeds everything; the randomness of each step is a function of
            (seed, epoch, step, rank), so runs and resumed runs are reproducible.
        max_steps: stop after this many optimizer steps in total (smoke runs); a checkpoint is
            written there and ``resume`` continues from it.
        save_every_steps: also write ``last.pt`` every this many optimizer steps (None: only
            at the end of each epoch).
        save_every_minutes: also write ``last.pt`` when this many minutes have passed since
            the last one (checked after every step; None: off).
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
    device: str | None = None
    amp: bool = False
    amp_dtype: str | None = None
    seed: int = 0
    max_steps: int | None = None
    save_every_steps: int | None = None
    save_every_minutes: float | None = None
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
        if isinstance(self.device, torch.device):
            self.device = str(self.device)
        for ok, message in self._checks():
            if not ok:
                raise ValueError(message)
        _device_from_spec(self.device)  # raises for anything but cpu / cuda[:index]
        if self.lambdas is not None:
            # Validates the set (range, share) with the sampler's own checks.
            DiscreteLambdaSampler(self.lambdas, self.clean_fraction)
            if not any(v > 0 for v in self.lambdas):
                raise ValueError(f"lambdas needs at least one λ > 0 (λ = 0 alone is plain "
                                 f"training), got {self.lambdas}")
        for lam in self.eval_lambdas:
            if not 0.0 <= lam <= 1.0:
                raise ValueError(f"eval_lambdas must be in [0, 1], got {self.eval_lambdas}")

    def _checks(self) -> list[tuple[bool, str]]:
        return [
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
            (self.save_every_steps is None or self.save_every_steps >= 1,
             f"save_every_steps must be >= 1 (or None: off), got {self.save_every_steps}"),
            (self.save_every_minutes is None or self.save_every_minutes > 0,
             f"save_every_minutes must be > 0 (or None: off), got {self.save_every_minutes}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.device is None or isinstance(self.device, str),
             f"device must be a string such as 'cpu', 'cuda' or 'cuda:1', got {self.device!r}"),
            (self.amp_dtype is None or self.amp_dtype in AMP_DTYPES,
             f"amp_dtype must be one of {AMP_DTYPES} (or None: float16 on CUDA, bfloat16 on "
             f"CPU), got {self.amp_dtype!r}"),
            (self.amp_dtype is None or self.amp,
             f"amp_dtype={self.amp_dtype!r} needs amp=True (--amp)"),
        ]


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


# -- device and distributed helpers ------------------------------------------------------------
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


def _device_from_spec(spec: str | None) -> torch.device | None:
    """The device ``TrainConfig.device`` names (None: automatic), or a ``ValueError``."""
    if spec is None:
        return None
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (
            device.type == "cpu" and device.index not in (None, 0)):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {spec!r}")
    return device


def _resolve_device(spec: str | None, d: _Dist) -> torch.device:
    """The device this process trains on: ``spec`` (None: CUDA when available, else the CPU);
    a CUDA device without an index is ``cuda:<LOCAL_RANK>`` under torchrun."""
    device = _device_from_spec(spec) or torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} needs CUDA, which is not available here; use "
                         "device='cpu'")
    count = torch.cuda.device_count()
    if device.index is None:
        return torch.device("cuda", d.local_rank % count)
    if d.enabled:
        raise ValueError(f"under torchrun each process takes cuda:<LOCAL_RANK>; use "
                         f"device='cuda', not {spec!r}")
    if device.index >= count:
        raise ValueError(f"device {spec!r} does not exist: {count} CUDA device(s) are visible")
    return device


def _setup_distributed(device_spec: str | None) -> tuple[_Dist, torch.device]:
    """Join the process group when launched by torchrun (RANK / WORLD_SIZE in the
    environment; nccl on CUDA, gloo on CPU) and pick this process's device. A plain single
    process joins nothing."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        d = _Dist(dist.get_rank(), dist.get_world_size(), local_rank)
        return d, _resolve_device(device_spec, d)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        d = _Dist()
        return d, _resolve_device(device_spec, d)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available")
    d = _Dist(int(os.environ["RANK"]), world, local_rank, initialised_here=True)
    device = _resolve_device(device_spec, d)  # before joining: a bad device fails alone
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def _collective_device(device: torch.device) -> torch.device | None:
    """Where small tensors for collectives live: the GPU under nccl, the CPU under gloo."""
    return device if device.type == "cuda" else None


class _BufferSync:
    """Broadcasts from rank 0 the buffers that training changes: the running statistics of
    torch's norm layers (``_NormBase``: BatchNorm, InstanceNorm with running stats), i.e.
    ``running_mean``, ``running_var`` and ``num_batches_tracked``.

    Every other buffer (FLOAT's fixed noise, FLOATS' masks, λ codes) is set up before training
    and never changes, so DistributedDataParallel's initial broadcast keeps it equal on every
    rank; broadcasting it every step would cost about as much as the gradient all-reduce. The
    list is derived once; ``load_state_dict`` copies into the same tensors."""

    def __init__(self, model: nn.Module) -> None:
        self.buffers = [buffer for module in model.modules() if isinstance(module, _NormBase)
                        for buffer in module.buffers(recurse=False) if buffer is not None]
        groups: dict[tuple, list[torch.Tensor]] = {}
        for buffer in self.buffers:
            groups.setdefault((buffer.dtype, buffer.device), []).append(buffer)
        self.groups = list(groups.values())

    @torch.no_grad()
    def __call__(self) -> None:
        """Overwrite this rank's norm statistics with rank 0's (a collective: every rank
        calls it); one flat tensor per dtype and device."""
        for buffers in self.groups:
            flat = torch.cat([b.reshape(-1) for b in buffers])
            dist.broadcast(flat, 0)
            offset = 0
            for b in buffers:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()


# -- pre-emption -------------------------------------------------------------------------------
class _StopSignals:
    """SIGTERM / SIGINT (cluster pre-emption, Ctrl-C) ask the run to stop after the current
    step; a second one interrupts at once (``KeyboardInterrupt``; ``last.pt`` is then the last
    checkpoint written). Handlers are installed only in the main thread (Python allows them
    nowhere else; elsewhere signals keep their behaviour) and the previous ones are restored
    on exit."""

    def __init__(self) -> None:
        self.received = 0  # signal number, 0: none
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                signum = getattr(signal, name)
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.received:
            raise KeyboardInterrupt(f"second stop signal ({name}): stopping now")
        self.received = signum
        logger.warning("%s received: finishing this step, writing the checkpoint and stopping "
                       "(send it again to stop at once)", name)


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


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    name = config.amp_dtype or ("float16" if device.type == "cuda" else "bfloat16")
    return getattr(torch, name)


# -- the loss --------------------------------------------------------------------------------
def adversarial_examples(model: ConditionalModel, attack: torchattacks.attack.Attack,
                         x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Adversarial examples with each sample attacked at its λ.

    In one call at the scalar λ when the batch has one; at the per-sample λ when the method
    serves it in one batched forward and the attack only queries its whole batch (PGD,
    FGSM-RS, ...); otherwise one λ group at a time,
    each at a scalar λ, so that attacks that query the model on a subset of their batch
    (APGD, APGDT, FAB, Square, AutoAttack) see a consistent model."""
    # frozen: the conditioned pieces (each group's folded weights, FiLM's per-sample γ, β)
    # are computed once per attack, not once per attack step
    groups = lambda_groups(lam)
    if len(groups) == 1 or (not model.method.lambda_groups and queries_whole_batch(attack)):
        # one λ for the batch: attacked at that scalar λ, where the model folds the most
        with model.at(groups[0][0] if len(groups) == 1 else lam), model.frozen():
            return attack(x, y).detach()
    x_adv = torch.empty_like(x)
    for value, idx in groups:
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
    autocast: AutocastFactory | None = None,
    attack_autocast: AutocastFactory | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch: ``attack`` is run on the λ > 0 samples only, one λ
    group at a time at that λ (torchattacks puts the model in eval mode for it), then the
    method's ``training_loss`` (OAT's ``Σ_i [(1 − λ_i)·CE(f_λi(x_i)) + λ_i·CE(f_λi(x_adv_i))]
    / N`` by default) sees a :class:`~oat_plugins.losses.LossContext`.

    ``forward`` is the :class:`LossForward` of ``model``, or a wrapper of it such as
    DistributedDataParallel (default: a new ``LossForward(model)``). ``autocast`` returns the
    mixed-precision context of the loss forward, ``attack_autocast`` the attack's (default:
    none; see ``TrainConfig.amp_dtype``). λ is the same before and after. Returns the loss and
    the batch's statistics.
    """
    autocast = contextlib.nullcontext if autocast is None else autocast
    attack_autocast = contextlib.nullcontext if attack_autocast is None else attack_autocast
    was_training = model.training
    adv = lam > 0
    x_adv = x[:0]
    if bool(adv.any()):
        with attack_autocast():
            x_adv = adversarial_examples(model, attack, x[adv], y[adv], lam[adv])
        if model.training != was_training:
            raise RuntimeError("the attack changed the model's train/eval mode")
    ctx = LossContext(model, x, y, lam, x_adv,
                      LossForward(model) if forward is None else forward, autocast)
    return model.training_loss(ctx)


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


def _pin_memory(dataset: Dataset, device: torch.device) -> bool:
    """Pin batches in host memory for a CUDA run, unless the dataset (or the one under its
    Subsets) declares a non-CPU ``device`` whose tensors it yields, e.g.
    :class:`~oat_plugins.data.DeviceImageDataset` on the GPU: pinning those is an error."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    home = torch.device(getattr(dataset, "device", None) or "cpu")
    return device.type == "cuda" and home.type == "cpu"


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


def _reduce_sums(sums: dict[str, float], d: _Dist, device: torch.device) -> dict[str, float]:
    """Sum the per-rank epoch sums over all ranks (a collective: every rank calls it)."""
    if not d.enabled:
        return dict(sums)
    gathered: list[list[str] | None] = [None] * d.world_size
    dist.all_gather_object(gathered, sorted(sums))
    keys = sorted(set().union(*gathered))
    totals = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64,
                          device=_collective_device(device))
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

    Writes ``out_dir/last.pt`` (atomically, after every epoch, every
    ``config.save_every_steps`` steps / ``save_every_minutes`` minutes, at ``max_steps`` and
    on SIGTERM / SIGINT) holding the model (``oat_plugins.load`` reads it), optimizer,
    scheduler, GradScaler, RNG states, epoch and step, and ``metrics.jsonl`` /
    ``metrics.csv`` with one line per epoch.

    Args:
        model: a :class:`~oat_plugins.ConditionalModel`; moved to ``config.device``.
        train_data: training dataset (augmentation is the dataset's transform).
        config: :class:`TrainConfig`.
        out_dir: directory for the checkpoint and metrics (rank 0 writes).
        resume: continue from ``out_dir/last.pt`` if it exists (else start fresh). The
            finished run has the same weights as an uninterrupted one (bit-identical on CPU
            and with ``num_workers=0``; GPU kernels may be non-deterministic).
        eval_data: evaluated after each epoch with :func:`oat_plugins.evaluate.evaluate` at
            ``config.eval_lambdas`` (clean, and under the training attack when
            ``config.eval_adversarial``), on rank 0.
        sampler: λ sampler; default ``config.lambdas`` if set, else the method's own.
        attack: ``factory(model) -> torchattacks.Attack`` replacing ``config.attack``.
        optimizer: ``factory(params) -> Optimizer`` replacing SGD.
        scheduler: ``factory(optimizer, total_steps) -> LRScheduler`` stepped every optimizer
            step, replacing ``config.schedule``.

    Returns:
        ``{'history': [per-epoch metrics], 'epoch': epochs done, 'global_step': steps done,
        'checkpoint': path of last.pt, 'finished': whether all epochs ran, 'stopped_by': None,
        'max_steps', 'SIGTERM' or 'SIGINT'}``. A stop signal finishes the current step, writes
        ``last.pt`` and returns (``finished`` False); ``resume=True`` continues from there.
        The model is left in eval mode at the λ it had before.
    """
    if not isinstance(model, ConditionalModel):
        raise ValueError(f"fit trains a ConditionalModel (oat_plugins.wrap), got "
                         f"{type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    d, device = _setup_distributed(config.device)
    try:
        run = _Run(model, train_data, config, Path(out_dir), d, device, eval_data=eval_data,
                   sampler=sampler, attack=attack, optimizer=optimizer, scheduler=scheduler)
        checkpoint = run.setup(resume)
        if checkpoint is not None:
            run.resume(checkpoint)
        return run.train()
    finally:
        if d.initialised_here:
            dist.destroy_process_group()


class _Run:
    """One training run: its state (model, optimizer, scheduler, scaler, sampler, attack,
    processes, position) and the named steps :func:`fit` runs: :meth:`setup`, :meth:`resume`,
    then :meth:`train` (:meth:`run_epoch` / :meth:`end_epoch` per epoch, :meth:`train_step`
    per batch, :meth:`save_checkpoint` when due)."""

    def __init__(self, model: ConditionalModel, train_data: Dataset, config: TrainConfig,
                 out: Path, d: _Dist, device: torch.device, *, eval_data: Dataset | None,
                 sampler: LambdaSampler | None, attack: AttackFactory | None,
                 optimizer: OptimizerFactory | None,
                 scheduler: SchedulerFactory | None) -> None:
        self.model, self.train_data, self.config, self.out = model, train_data, config, out
        self.d, self.device, self.eval_data, self.sampler = d, device, eval_data, sampler
        self.factories = (optimizer, scheduler)

        def training_attack(m: nn.Module) -> torchattacks.attack.Attack:
            return make_attack(m, config)

        self.attack_factory = attack if attack is not None else training_attack
        self.amp_dtype = _amp_dtype(config, device)
        self.ckpt_path = out / CHECKPOINT_NAME
        self.local_batch = config.batch_size // d.world_size
        self.steps_per_epoch = 0
        self.lam_generator = torch.Generator()
        # Position: epochs done, steps done in the current epoch, optimizer steps in total.
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.sums: dict[str, float] = {}  # this rank's statistics of the current epoch
        self.epoch_seconds = 0.0  # seconds spent in the current epoch before this process
        self.last_lr = 0.0  # learning rate of the last step taken
        self.last_save = time.monotonic()
        self.stopped_by: str | None = None
        self.signals = _StopSignals()

    # -- set-up ----------------------------------------------------------------------------
    def setup(self, resume: bool) -> dict[str, Any] | None:
        """Check data and sampler, move the model to its device, load the model weights of
        ``last.pt`` when resuming (before the method's ``prepare``, which then finds nothing
        pending), let the method finish its data-driven set-up, and build the optimizer,
        scheduler, GradScaler, training forward (DDP) and attack. Returns the checkpoint to
        resume from (None: a fresh start)."""
        self._check_data()
        self.sampler = self._choose_sampler()
        if self.device.type == "cpu":
            tune_cpu_allocator()  # each step reuses the last one's freed memory (see _malloc)
        self.model.to(self.device)
        if self.d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.d.barrier()  # rank 0 may have just created out/
        checkpoint = self._read_checkpoint(resume)
        self.d.barrier()  # nobody writes last.pt before every rank has read it
        if checkpoint is not None:
            self._load_model(checkpoint)
        self._prepare_method()
        self._build_optimisation()
        self._build_forward()
        return checkpoint

    def _check_data(self) -> None:
        c, d = self.config, self.d
        if c.batch_size % d.world_size:
            raise ValueError(f"batch_size {c.batch_size} is not divisible by the "
                             f"{d.world_size} processes")
        self.steps_per_epoch = len(self.train_data) // d.world_size // self.local_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set ({len(self.train_data)} samples) is smaller "
                             f"than one batch ({c.batch_size})")

    def _choose_sampler(self) -> LambdaSampler:
        sampler = self.sampler
        if sampler is None and self.config.lambdas is not None:
            sampler = DiscreteLambdaSampler(self.config.lambdas, self.config.clean_fraction)
        elif sampler is None:
            try:
                sampler = self.model.method.default_sampler()
            except NotImplementedError:
                raise ValueError(
                    f"method {self.model.method_name!r} declares no default λ sampler; pass "
                    "TrainConfig(lambdas=...) or fit(..., sampler=...)"
                ) from None
        self.model.method.check_sampler(sampler)
        n_clean = round(getattr(sampler, "clean_fraction", 0.5) * self.local_batch)
        if 0 < n_clean < 2 or self.local_batch - n_clean < 2:
            logger.warning("only %d of the %d samples per process are at λ = 0: batch norms "
                           "see tiny routed sub-batches; use a larger batch", n_clean,
                           self.local_batch)
        return sampler

    def _prepare_method(self) -> None:
        """The method's data-driven set-up (e.g. FLOATS' SNIP masks) on the first
        ``local_batch`` training samples in order, augmented under the run's seed: the same
        batch on every rank and in every run."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            x, y = next(iter(DataLoader(self.train_data, batch_size=self.local_batch)))
        self.model.method.prepare(self.model, x.to(self.device), y.to(self.device))

    def _build_optimisation(self) -> None:
        optimizer_factory, scheduler_factory = self.factories
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = (optimizer_factory(self.params) if optimizer_factory is not None
                          else _default_optimizer(self.params, self.config))
        total_steps = self.config.epochs * self.steps_per_epoch
        self.scheduler = (
            scheduler_factory(self.optimizer, total_steps) if scheduler_factory is not None
            else _default_scheduler(self.optimizer, total_steps, self.config.schedule))
        # float16 gradients need loss scaling; bfloat16 has float32's exponent range.
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.config.amp and self.amp_dtype == torch.float16)
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])

    def _build_forward(self) -> None:
        self.net: nn.Module = LossForward(self.model)
        if self.d.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.config.find_unused_parameters,
                broadcast_buffers=False)  # self.sync_buffers runs before the attack instead
        self.sync_buffers = _BufferSync(self.model)
        self.attack = self.attack_factory(self.model)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision of the loss forward (a no-op without ``config.amp``)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.config.amp)

    def attack_autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision of the attack: bfloat16 only. The attack's input gradient is not
        loss-scaled, so under float16 it can underflow to zero; it then runs in float32."""
        if self.amp_dtype == torch.bfloat16:
            return self.autocast()
        return contextlib.nullcontext()

    # -- resume ----------------------------------------------------------------------------
    def _read_checkpoint(self, resume: bool) -> dict[str, Any] | None:
        path = self.ckpt_path
        if not resume:
            if path.is_file() and self.d.is_main:
                logger.warning("%s exists and will be overwritten (resume=True / --resume "
                               "continues from it)", path)
            return None
        if not path.is_file():
            logger.info("no checkpoint at %s; starting from scratch", path)
            return None
        state = read_checkpoint(path, map_location="cpu")
        required = ("model", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step",
                    "rng")
        missing = [k for k in required if not isinstance(state, dict) or k not in state]
        if missing:
            raise ValueError(f"{os.fspath(path)!r} is not a training checkpoint of "
                             f"oat_plugins.train.fit (missing {missing})")
        if state["model"].get("method") != self.model.method_name:
            raise ValueError(f"{os.fspath(path)!r} trained method "
                             f"{state['model'].get('method')!r}, not "
                             f"{self.model.method_name!r}")
        return state

    def _load_model(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"]["state_dict"])
        except RuntimeError as err:
            raise ValueError(f"{os.fspath(self.ckpt_path)!r} does not match this model (other "
                             f"backbone or method options?): {str(err)[:300]}") from None

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (``last.pt``, model weights already loaded): optimizer,
        scheduler, GradScaler, position, RNG states, the interrupted epoch's statistics and
        the metrics of the finished epochs."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        partial = state.get("epoch_partial") or {}
        if self.step_in_epoch and partial:
            if self.d.is_main:  # the saved sums are already summed over ranks
                self.sums = dict(partial["sums"])
            self.epoch_seconds = partial["seconds"]
            self.last_lr = partial.get("lr", self.last_lr)
        _set_rng_state(state["rng"], self.lam_generator)
        self._warn_about_changes(state)
        self.history = _read_metrics(self.out, self.epoch)
        logger.info("resumed from %s at epoch %d, step %d", self.ckpt_path, self.epoch,
                    self.global_step)

    def _warn_about_changes(self, state: dict[str, Any]) -> None:
        old = state.get("config", {})
        changed = {k: (old[k], v) for k, v in asdict(self.config).items()
                   if k in old and old[k] != v and k not in _RUNTIME_FIELDS}
        if changed:
            logger.warning("resuming with a changed config (old, new): %s", changed)
        if state.get("world_size", 1) != self.d.world_size and self.step_in_epoch:
            logger.warning("resuming mid-epoch with %d processes instead of %d: the rest of "
                           "that epoch's data order differs", self.d.world_size,
                           state.get("world_size", 1))

    # -- training --------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Epochs until ``config.epochs``, ``max_steps`` or a stop signal; the result of
        :func:`fit`."""
        self._log_start()
        with self.signals:
            while self.epoch < self.config.epochs:
                if self._max_steps_reached():
                    self.stopped_by = "max_steps"
                    break
                self.run_epoch()
                if self.stopped_by is not None:
                    break
                self.end_epoch()
                if self._stop_between_epochs():
                    break
        self.model.eval()
        self.d.barrier()
        return {"history": self.history, "epoch": self.epoch, "global_step": self.global_step,
                "checkpoint": os.fspath(self.ckpt_path),
                "finished": self.epoch >= self.config.epochs, "stopped_by": self.stopped_by}

    def _log_start(self) -> None:
        if self.d.is_main:
            logger.info("training %s (%s) for %d epochs x %d steps, batch %d on %d "
                        "process(es), device %s, λ sampler %s",
                        type(self.model.backbone).__name__, self.model.method_name,
                        self.config.epochs, self.steps_per_epoch, self.config.batch_size,
                        self.d.world_size, self.device, self.sampler.describe())

    def run_epoch(self) -> None:
        """Train the rest of the current epoch, from ``step_in_epoch``; a stop (``max_steps``
        mid-epoch, a signal) ends it early, after a checkpoint."""
        loader = _epoch_loader(self.train_data, self.config, self.d, self.epoch,
                               self.step_in_epoch, self.local_batch,
                               pin=_pin_memory(self.train_data, self.device))
        self.model.train()
        started = time.perf_counter() - self.epoch_seconds
        bar = _progress(self.steps_per_epoch, self.step_in_epoch,
                        self.config.progress and self.d.is_main,
                        f"epoch {self.epoch + 1}/{self.config.epochs}")
        batches = iter(loader)
        try:
            while self.step_in_epoch < self.steps_per_epoch:
                self._seed_step()  # before the batch: seeds its augmentation (num_workers=0)
                x, y = next(batches)
                loss = self.train_step(x, y)
                self.epoch_seconds = time.perf_counter() - started
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                if self._after_step():
                    break
        finally:
            bar.close()

    def _seed_step(self) -> None:
        seed = _step_seed(self.config.seed, self.epoch, self.step_in_epoch, self.d.rank)
        torch.manual_seed(seed)  # augmentation, attack random starts
        self.lam_generator.manual_seed(seed)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on a batch; returns its loss."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        lam = self.sampler(x.shape[0], self.lam_generator).to(self.device)
        if self.d.enabled:
            # Every rank attacks (eval mode) and trains with rank 0's running statistics, so
            # a resumed run, restarted from rank 0's checkpoint, matches exactly.
            self.sync_buffers()
        loss, stats = oat_loss(self.model, x, y, lam, self.attack, forward=self.net,
                               autocast=self.autocast, attack_autocast=self.attack_autocast)
        self._optimizer_step(loss)
        self.step_in_epoch += 1
        self.global_step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at epoch {self.epoch + 1}, "
                                     f"step {self.global_step}")
        stats["loss_sum"] = value * stats["n"]
        for key, number in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + number
        every = self.config.log_every
        if self.d.is_main and every and self.global_step % every == 0:
            logger.info("epoch %d step %d/%d loss %.4f lr %.4g", self.epoch + 1,
                        self.step_in_epoch, self.steps_per_epoch, value, self.last_lr)
        return value

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])
        self.scheduler.step()

    # -- stopping and checkpoints ----------------------------------------------------------
    def _max_steps_reached(self) -> bool:
        return self.config.max_steps is not None and self.global_step >= self.config.max_steps

    def _save_due(self) -> bool:
        c = self.config
        if c.save_every_steps is not None and self.global_step % c.save_every_steps == 0:
            return True
        return (c.save_every_minutes is not None
                and time.monotonic() - self.last_save >= 60.0 * c.save_every_minutes)

    def _agree(self, signum: int, save_due: bool) -> tuple[int, bool]:
        """(stop signal, checkpoint due) as every rank sees them together: a signal or a
        clock reaches ranks at different steps, but all must stop or save at the same one."""
        if not self.d.enabled:
            return signum, save_due
        flags = torch.tensor([signum, int(save_due)], dtype=torch.int64,
                             device=_collective_device(self.device))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return int(flags[0]), bool(flags[1])

    def _after_step(self) -> bool:
        """Write a checkpoint when one is due or the run must stop; True to stop now. A run
        that reaches ``max_steps`` at the end of an epoch finishes that epoch first; a signal
        stops even there (the checkpoint then holds the finished epoch, recorded on resume)."""
        signum, save_due = self._agree(self.signals.received, self._save_due())
        mid_epoch = self.step_in_epoch < self.steps_per_epoch
        if signum:
            self.stopped_by = signal.Signals(signum).name
        elif mid_epoch and self._max_steps_reached():
            self.stopped_by = "max_steps"
        if self.stopped_by is not None or (save_due and mid_epoch):
            self.save_checkpoint()
        if self.stopped_by is not None and self.d.is_main:
            logger.info("stopped by %s at epoch %d, step %d of %d; wrote %s", self.stopped_by,
                        self.epoch + 1, self.step_in_epoch, self.steps_per_epoch,
                        self.ckpt_path)
        return self.stopped_by is not None

    def _stop_between_epochs(self) -> bool:
        """A signal that arrived during the end of an epoch stops before the next (the
        epoch's checkpoint is already written)."""
        signum, _ = self._agree(self.signals.received, False)
        if signum:
            self.stopped_by = signal.Signals(signum).name
        return bool(signum)

    def save_checkpoint(self) -> None:
        """Write ``last.pt`` at the current position (rank 0 writes; every rank calls it:
        a mid-epoch checkpoint sums the epoch's statistics over the ranks)."""
        partial: dict[str, Any] = {}
        if self.step_in_epoch:
            partial = {"sums": _reduce_sums(self.sums, self.d, self.device),
                       "seconds": self.epoch_seconds, "lr": self.last_lr}
        self.last_save = time.monotonic()
        if not self.d.is_main:
            return
        atomic_torch_save({
            "model": to_checkpoint(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "epoch_partial": partial,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "rng": _rng_state(self.lam_generator),
            "config": asdict(self.config),
            "sampler": self.sampler.describe(),
            "world_size": self.d.world_size,
        }, self.ckpt_path)

    # -- end of an epoch -------------------------------------------------------------------
    def end_epoch(self) -> None:
        """Record the finished epoch: its metrics (summed over ranks), the evaluation on
        ``eval_data`` (rank 0), ``metrics.jsonl`` / ``.csv``, then ``last.pt``."""
        if self.d.enabled:
            # DDP keeps parameters in sync; norm statistics are broadcast from rank 0 only
            # before each step. Sync them now, so every rank holds the model that rank 0
            # evaluates and checkpoints.
            self.sync_buffers()
        record = _epoch_record(self.epoch, self.sums, self.last_lr, self.epoch_seconds,
                               self.d, self.device)
        if self.eval_data is not None and self.d.is_main:
            record.update(self._evaluate())
        self.history.append(record)  # the same training metrics on every rank (all-reduced)
        self.epoch, self.step_in_epoch, self.sums, self.epoch_seconds = self.epoch + 1, 0, {}, 0.0
        if self.d.is_main:
            # Metrics first: a crash before last.pt is written resumes the previous epoch,
            # whose resume drops this line again.
            _write_metrics(self.out, self.history)
            logger.info("epoch %d: %s", self.epoch, ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in record.items() if k != "epoch"))
        self.save_checkpoint()
        self.d.barrier()

    def _evaluate(self) -> dict[str, float]:
        """Clean accuracy, and with ``eval_adversarial`` accuracy under (a fresh instance
        of) the training attack, on ``eval_data`` at ``config.eval_lambdas``."""
        c = self.config
        # Without eval_adversarial, torchattacks' VANILA (the identity) stands in for the
        # attack; its robust column equals the clean one and is not recorded.
        attack = self.attack_factory if c.eval_adversarial else torchattacks.VANILA
        result = evaluate(self.model, self.eval_data, c.eval_lambdas, attack=attack,
                          n_examples=c.eval_max_samples, batch_size=self.local_batch,
                          seed=c.seed, progress=False, log_rows=False)
        record: dict[str, float] = {}
        for row in result:
            record[f"eval_clean_acc@{row.lam:g}"] = row.clean_acc
            if c.eval_adversarial:
                record[f"eval_adv_acc@{row.lam:g}"] = row.robust_acc
        return record


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from a dict (e.g. a checkpoint's ``'config'``); unknown keys
    raise a ``ValueError`` listing the known ones."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(known)}")
    return TrainConfig(**values)
