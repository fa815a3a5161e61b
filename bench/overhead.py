"""Overhead of conditional methods vs the plain backbone, measured side by side in one run.

For every configuration (timm model, image size, batch) and method, three tables, each row a
ratio to its plain counterpart measured in the same run (rows interleaved round by round, so
drifting load hits all rows alike; medians):

1. Training step (PGD-``--attack-steps``, ε = 8/255, the same batch on the device):
     plain PGD-AT      hand-written: torchattacks PGD on the whole batch, one forward/backward
                       on the adversarial batch, SGD step.
     <method> λ=1      ``oat_plugins.train.oat_loss`` with every sample at λ = 1: the same
                       attack and training work as plain PGD-AT (the equal-work ratio). FLOAT
                       and FLOATS use ``recipe='extremes'`` (OAT's loss) here: their default
                       recipe also trains on every clean image (a second forward/backward).
     <method> sampler  the method's default λ sampler (film: 5/6 of the batch attacked and
                       a clean forward too; float: 1/2 attacked, every clean image in its
                       default loss).
2. Inference latency (``torch.inference_mode``, batch of the configuration): the plain model,
   ``export(λ)`` and the conditional model at the scalar λ ``--lam`` (which runs its served
   export), and the same model with ``serve_exports`` off (its conditioned layers, served
   from their fold caches), interleaved.
3. End to end: images/s of ``oat_plugins.train.fit`` (``oat-plugins train``'s loop: its
   DataLoader with ``TrainConfig``'s default workers, sampler, attack, loss, optimizer,
   scheduler, checks) against a plain hand-written PGD-AT loop on the same dataset with the
   same DataLoader settings; ``fit`` at equal work (every sample at λ = 1) and with the
   method's sampler. Steps are timed inside the loops (setup, the first ``--e2e-warmup``
   steps and the final checkpoint are left out). A "data loader alone" row gives the rate of
   the input pipeline by itself.

Data for the end-to-end rows: ``--data`` (the CIFAR-10 JPEG tarball, which is unpacked to a
temporary directory, or an ImageFolder directory; resized for other image sizes), else the
bundled CIFAR-10 sample at 32² and random uint8 images at other sizes.

CPU (set the thread count: OMP_NUM_THREADS and --threads agree):

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/overhead.py --device cpu --threads 1 \\
        --configs resnet18:32:32 --out bench/out/overhead

GPU (the three default configurations; --quick: about 2 minutes on an H200):

    PYTHONPATH=$PWD python bench/overhead.py --device cuda --quick --out bench/out/overhead-gpu

Writes ``overhead.md`` (the tables) and ``overhead.json`` (every row) to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os
import platform
import statistics
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchattacks
from torch.utils.data import DataLoader, Dataset

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=FutureWarning)
    import timm

import oat_plugins
from oat_plugins._malloc import tune_cpu_allocator
from oat_plugins.data import TensorImageDataset, load_dataset, train_transform
from oat_plugins.samplers import LambdaSampler
from oat_plugins.train import TrainConfig, default_alpha, fit, make_attack, oat_loss

DEFAULT_CONFIGS = "resnet18:32:32,resnet18:32:128,resnet50:224:8"


@dataclass
class Row:
    """One measured row: ``value`` in ``unit``, ``ratio`` to the section's plain row."""

    config: str
    section: str
    label: str
    value: float
    unit: str
    ratio: float | None = None


@dataclass(frozen=True)
class Setting:
    """One configuration to measure."""

    model: str
    image_size: int
    batch: int

    @property
    def name(self) -> str:
        return f"{self.model} {self.image_size}² batch {self.batch}"


# -- timing ----------------------------------------------------------------------------------
def synchronizer(device: torch.device) -> Callable[[], None]:
    """Wait for queued device work (a no-op on the CPU), so wall clocks measure it."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                   sync: Callable[[], None]) -> dict[str, float]:
    """Median wall time of each function; the functions run interleaved, round by round, so
    that drifting machine load affects every row alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def ratio_rows(config: str, section: str, values: dict[str, float], unit: str,
               plain: str) -> list[Row]:
    """Rows with each value's ratio to the ``plain`` row (times: > 1 is slower; images/s:
    < 1 is slower)."""
    base = values[plain]
    return [Row(config, section, label, v, unit, v / base if base else None)
            for label, v in values.items()]


# -- models ----------------------------------------------------------------------------------
@dataclass
class Models:
    """The models of one configuration, all from the same initial backbone: the plain model
    (Normalize + backbone, as an export is), one conditional model per method with its
    default options, and the one its equal-work rows train (see :func:`equal_work_options`)."""

    plain: torch.nn.Module
    default: dict[str, oat_plugins.ConditionalModel]
    equal_work: dict[str, oat_plugins.ConditionalModel]


def equal_work_options(model: oat_plugins.ConditionalModel) -> dict[str, str]:
    """Options that make a method's training loss OAT's (one forward on the adversarial batch
    at λ = 1). FLOAT's default recipe, the authors' loss, also trains on every clean image:
    a second forward and backward a plain PGD-AT step does not do."""
    return {"recipe": "extremes"} if "recipe" in model.method.options_dict() else {}


def build_models(setting: Setting, methods: list[str], device: torch.device) -> Models:
    torch.manual_seed(0)
    backbone = timm.create_model(setting.model, num_classes=10)
    plain = oat_plugins.wrap(copy.deepcopy(backbone), "film").export(0.0).to(device)
    default = {m: oat_plugins.wrap(copy.deepcopy(backbone), m).to(device) for m in methods}
    equal_work = {}
    for name, model in default.items():
        options = equal_work_options(model)
        equal_work[name] = (oat_plugins.wrap(copy.deepcopy(backbone), name, **options).to(device)
                            if options else model)
    return Models(plain, default, equal_work)


def plain_pgd(model: torch.nn.Module, config: TrainConfig) -> torchattacks.attack.Attack:
    return torchattacks.PGD(model, eps=config.eps, random_start=config.random_start,
                            alpha=default_alpha("pgd", config.eps, config.steps),
                            steps=config.steps)


def plain_step_fn(model: torch.nn.Module, config: TrainConfig
                  ) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """One hand-written PGD-AT step (what a user writes without this library)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    attack = plain_pgd(model, config)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        x_adv = attack(x, y)
        model.train()
        loss = F.cross_entropy(model(x_adv), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def method_step_fn(model: oat_plugins.ConditionalModel, config: TrainConfig,
                   lam: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """One library training step (``oat_loss``) at the per-sample λ ``lam``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    attack = make_attack(model, config)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        model.train()
        loss, _ = oat_loss(model, x, y, lam, attack)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


# -- sections ----------------------------------------------------------------------------------
def training_steps(setting: Setting, models: Models, args, device, sync) -> list[Row]:
    config = TrainConfig(epochs=1, steps=args.attack_steps)
    x = torch.rand(setting.batch, 3, setting.image_size, setting.image_size, device=device)
    y = torch.randint(0, 10, (setting.batch,), device=device)
    steps: dict[str, Callable[[], object]] = {
        "plain PGD-AT": functools.partial(plain_step_fn(models.plain, config), x, y)}
    ones = torch.ones(setting.batch, device=device)
    for name, model in models.default.items():
        sampled = model.method.default_sampler()(setting.batch,
                                                 torch.Generator().manual_seed(0)).to(device)
        steps[f"{name} λ=1 (equal work)"] = functools.partial(
            method_step_fn(models.equal_work[name], config, ones), x, y)
        steps[f"{name} sampler"] = functools.partial(method_step_fn(model, config, sampled), x, y)
    seconds = median_seconds(steps, args.repeats, args.warmup, sync)
    return ratio_rows(setting.name, f"training step (PGD-{args.attack_steps})", seconds, "s",
                      "plain PGD-AT")


def inference_latency(setting: Setting, models: Models, args, device, sync) -> list[Row]:
    x = torch.rand(setting.batch, 3, setting.image_size, setting.image_size, device=device)
    forwards: dict[str, Callable[[], object]] = {
        "plain": functools.partial(models.plain.eval(), x)}
    for name, model in models.default.items():
        model.eval().set_lambda(args.lam)
        forwards[f"{name} export(λ={args.lam})"] = functools.partial(
            model.export(args.lam).eval(), x)
        forwards[f"{name} conditional (λ={args.lam})"] = functools.partial(model, x)
        # the same model with its conditioned layers run (serve_exports off): what it costs
        # without the served export, measured interleaved with it
        forwards[f"{name} conditional, not served"] = functools.partial(unserved, model, x)
    with torch.inference_mode():
        for model in models.default.values():  # build the served export before timing
            for _ in range(model.serve_after):
                model(x)
        seconds = median_seconds(forwards, args.repeats * 4, args.warmup, sync)
    rows = ratio_rows(setting.name, "inference latency", seconds, "s", "plain")
    by_label = {r.label: r for r in rows}
    for name in models.default:  # the goal: conditional at a scalar λ against its own export
        conditional = by_label[f"{name} conditional (λ={args.lam})"].value
        export = by_label[f"{name} export(λ={args.lam})"].value
        rows.append(Row(setting.name, "inference latency", f"{name} conditional / export",
                        conditional / export, "×"))
        unserved_time = by_label[f"{name} conditional, not served"].value
        rows.append(Row(setting.name, "inference latency",
                        f"{name} conditional not served / export", unserved_time / export, "×"))
    return rows


def unserved(model: oat_plugins.ConditionalModel, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` through its conditioned layers, not its served export."""
    model.serve_exports = False
    try:
        return model(x)
    finally:
        model.serve_exports = True


# -- end to end --------------------------------------------------------------------------------
class EveryoneAtOne(LambdaSampler):
    """Every sample at λ = 1: each one attacked, one forward on the adversarial batch, the
    work of a plain PGD-AT step. (No ``lambdas`` attribute: film's check that every code of
    its λ set is trained does not apply to a throughput measurement.)"""

    def __call__(self, batch_size: int, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        return torch.ones(batch_size)


class StepClock(torch.optim.lr_scheduler.LambdaLR):
    """A constant learning rate that records the time of every optimizer step (``fit`` steps
    its scheduler once per optimizer step), after waiting for the device."""

    def __init__(self, optimizer: torch.optim.Optimizer, sync: Callable[[], None]) -> None:
        super().__init__(optimizer, lambda _: 1.0)  # its initial step() is not a training step
        self.times: list[float] = []
        self.sync = sync

    def step(self, epoch: int | None = None) -> None:  # type: ignore[override]
        super().step()
        if hasattr(self, "times"):
            self.sync()
            self.times.append(time.perf_counter())

    def state_dict(self) -> dict:  # fit's checkpoint: the clock is not training state
        return {k: v for k, v in super().state_dict().items() if k not in ("times", "sync")}


def images_per_second(times: list[float], warmup: int, batch: int) -> float:
    timed = times[warmup:]
    return (len(timed) - 1) * batch / (timed[-1] - timed[0])


def fit_rate(model, dataset: Dataset, setting: Setting, args, device, sync,
             sampler=None) -> float:
    """images/s of ``oat_plugins.train.fit`` over ``--e2e-steps`` steps after warm-up."""
    clocks: list[StepClock] = []

    def scheduler(optimizer, total_steps):
        clocks.append(StepClock(optimizer, sync))
        return clocks[-1]

    config = TrainConfig(epochs=1, batch_size=setting.batch, steps=args.attack_steps,
                         device=str(device), max_steps=args.e2e_warmup + args.e2e_steps,
                         eval_adversarial=False, progress=False, log_every=0)
    with tempfile.TemporaryDirectory() as out:
        fit(model, dataset, config, out, sampler=sampler, scheduler=scheduler)
    return images_per_second(clocks[-1].times, args.e2e_warmup, setting.batch)


def loader_for(dataset: Dataset, batch: int, device: torch.device) -> DataLoader:
    """The DataLoader a user's plain loop would build, with the settings ``fit`` uses."""
    return DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                      num_workers=TrainConfig.num_workers, pin_memory=device.type == "cuda")


def plain_rate(plain, dataset: Dataset, setting: Setting, args, device, sync) -> float:
    step = plain_step_fn(plain, TrainConfig(epochs=1, steps=args.attack_steps))
    times = []
    for x, y in _take(loader_for(dataset, setting.batch, device),
                      args.e2e_warmup + args.e2e_steps):
        step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        sync()
        times.append(time.perf_counter())
    return images_per_second(times, args.e2e_warmup, setting.batch)


def loader_rate(dataset: Dataset, setting: Setting, args, device, sync) -> float:
    times = []
    for x, _ in _take(loader_for(dataset, setting.batch, device),
                      args.e2e_warmup + args.e2e_steps):
        x.to(device, non_blocking=True)
        sync()
        times.append(time.perf_counter())
    return images_per_second(times, args.e2e_warmup, setting.batch)


def _take(loader: DataLoader, n: int) -> Iterator:
    for i, batch in enumerate(loader):
        if i == n:
            return
        yield batch


def end_to_end(setting: Setting, models: Models, args, device, sync, data: str | None
               ) -> list[Row]:
    dataset = e2e_dataset(setting, args, data)
    runs: dict[str, Callable[[], float]] = {
        "plain PGD-AT loop": lambda: plain_rate(models.plain, dataset, setting, args, device,
                                                sync),
        "data loader alone": lambda: loader_rate(dataset, setting, args, device, sync)}
    for name, model in models.default.items():
        runs[f"{name} fit, λ=1 (equal work)"] = functools.partial(
            fit_rate, models.equal_work[name], dataset, setting, args, device, sync,
            EveryoneAtOne())
        if not args.quick:
            runs[f"{name} fit, sampler"] = functools.partial(
                fit_rate, model, dataset, setting, args, device, sync)
    rates: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(args.e2e_rounds):
        for label, run in runs.items():
            rates[label].append(run())
    medians = {label: statistics.median(r) for label, r in rates.items()}
    return ratio_rows(setting.name, f"end to end ({describe(dataset)})", medians, "images/s",
                      "plain PGD-AT loop")


def describe(dataset: Dataset) -> str:
    return f"{type(dataset).__name__}, {len(dataset)} images, {TrainConfig.num_workers} workers"


def e2e_dataset(setting: Setting, args, data: str | None) -> Dataset:
    """The training data of the end-to-end rows (see the module docstring)."""
    needed = setting.batch * (args.e2e_warmup + args.e2e_steps)
    return _dataset(data, setting.image_size, needed if data is None else 0)


@functools.lru_cache(maxsize=2)  # configurations of one image size share their data
def _dataset(data: str | None, size: int, needed: int) -> Dataset:
    if data is not None:
        return load_dataset(data, "train", image_size=None if size == 32 else size)
    if size == 32:
        dataset = load_dataset("bundled", "train")
        if len(dataset) >= needed:
            return dataset
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (needed, 3, size, size), dtype=torch.uint8,
                           generator=generator)
    labels = torch.randint(0, 10, (needed,), generator=generator)
    return TensorImageDataset(images, labels, train_transform(size))


def unpacked(data: str | None, workdir: Path) -> str | None:
    """An ImageFolder path for ``--data`` (a .tar / .tar.gz / .tgz archive is unpacked)."""
    if data is None or not data.endswith((".tar", ".tar.gz", ".tgz")):
        return data
    with tarfile.open(data) as tar:
        tar.extractall(workdir, filter="data")
    return os.fspath(workdir)


# -- report ------------------------------------------------------------------------------------
def markdown(rows: list[Row], header: str) -> str:
    lines = [header]
    key = None
    for row in rows:
        if (row.config, row.section) != key:
            key = (row.config, row.section)
            lines += ["", f"### {row.config}: {row.section}", "",
                      f"| row | {row.unit if row.unit != '×' else 'value'} | × plain |",
                      "|---|---:|---:|"]
        value = (f"{1000 * row.value:.2f} ms" if row.unit == "s" else
                 f"{row.value:.1f}" if row.unit == "images/s" else f"{row.value:.3f}")
        ratio = "" if row.ratio is None else f"{row.ratio:.3f}"
        lines.append(f"| {row.label} | {value} | {ratio} |")
    return "\n".join(lines) + "\n"


def environment(args, device: torch.device) -> dict[str, object]:
    env: dict[str, object] = {
        "device": str(device), "torch": torch.__version__, "timm": timm.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "args": vars(args),
        "glibc_malloc_tuned": getattr(args, "malloc_tuned", False)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="comma-separated model:image_size:batch (timm model names)")
    parser.add_argument("--methods", default="film,float,floats",
                        help="comma-separated method names")
    parser.add_argument("--device", default="cpu", help="'cpu', 'cuda' or 'cuda:<index>'")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's; set OMP_NUM_THREADS alike)")
    parser.add_argument("--sections", default="latency,steps,e2e",
                        help="comma-separated subset of latency,steps,e2e")
    parser.add_argument("--attack-steps", type=int, default=7)
    parser.add_argument("--lam", type=float, default=0.5, help="λ for the latency rows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--e2e-steps", type=int, default=20, help="timed steps per loop run")
    parser.add_argument("--e2e-warmup", type=int, default=3)
    parser.add_argument("--e2e-rounds", type=int, default=3)
    parser.add_argument("--data", default=None,
                        help="ImageFolder directory or .tar.gz of one for the end-to-end rows")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and steps; no sampler rows end to end")
    parser.add_argument("--out", default="bench/out/overhead", help="output directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 3), 1
        args.e2e_steps, args.e2e_warmup, args.e2e_rounds = min(args.e2e_steps, 8), 2, 2
    return args


def parse_settings(spec: str) -> list[Setting]:
    settings = []
    for item in spec.split(","):
        parts = item.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise ValueError(f"--configs item {item!r}: expected model:image_size:batch, "
                             "e.g. resnet18:32:128")
        settings.append(Setting(parts[0], int(parts[1]), int(parts[2])))
    return settings


def resolve_device(spec: str) -> torch.device:
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:index], got {spec!r}")
    return device


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the same for the plain and conditional rows
    else:  # what fit does on a CPU, applied before any row so that every row runs with it
        args.malloc_tuned = tune_cpu_allocator()
    sync = synchronizer(device)
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"--sections: unknown {sorted(unknown)}; choose from {list(SECTIONS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        data = unpacked(args.data, Path(workdir)) if "e2e" in sections else None
        measure_all(parse_settings(args.configs), sections, args, device, sync, data, out)
    print((out / "overhead.md").read_text())


SECTIONS = ("latency", "steps", "e2e")
"""In the order they run: the quick ones for every configuration first, so that a run cut
short by a time limit still has them (results are written after every section)."""


def measure_all(settings: list[Setting], sections: list[str], args, device, sync,
                data: str | None, out: Path) -> None:
    built: dict[Setting, Models] = {}
    rows: list[Row] = []
    for section in (s for s in SECTIONS if s in sections):
        for setting in settings:
            started = time.perf_counter()
            if setting not in built:
                built[setting] = build_models(setting, args.methods.split(","), device)
            models = built[setting]
            if section == "latency":
                rows += inference_latency(setting, models, args, device, sync)
            elif section == "steps":
                rows += training_steps(setting, models, args, device, sync)
            else:
                rows += end_to_end(setting, models, args, device, sync, data)
            write(out, rows, args, device)
            logging.getLogger("overhead").warning("%s, %s: %.0f s", setting.name, section,
                                                  time.perf_counter() - started)


def write(out: Path, rows: list[Row], args, device: torch.device) -> None:
    env = environment(args, device)
    header = (f"# bench/overhead.py\n\n{env['device']} {env.get('gpu', '')}, torch "
              f"{env['torch']}, timm {env['timm']}, {env['threads']} threads; medians of "
              f"{args.repeats} interleaved repeats (latency: {4 * args.repeats}), end to end "
              f"{args.e2e_steps} timed steps × {args.e2e_rounds} rounds"
              + ("; glibc malloc tuned as fit does (oat_plugins._malloc)."
                 if env["glibc_malloc_tuned"] else "."))
    (out / "overhead.md").write_text(markdown(rows, header))
    (out / "overhead.json").write_text(json.dumps(
        {"environment": env, "rows": [asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
