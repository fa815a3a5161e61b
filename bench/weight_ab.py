#!/usr/bin/env python
"""Where the conditioned training forward + backward spends its time beyond the plain model's:
an A/B in one process, rows interleaved round by round (so a drifting load hits them alike).

Rows, each one cross-entropy forward + backward of a batch (training mode):

- ``plain``: the timm backbone;
- ``float fused``: ``wrap(..., 'float')`` at λ = 1 (W + λ·α·η as one ``addcmul`` with a
  dot-product backward, the library's code);
- ``float unfused``: the same model with the weight computed by autograd's own
  ``W + (α·λ)·η`` (the code before the fused op);
- ``clone only``: the plain backbone with each conv's weight cloned before use (a fresh
  weight-sized tensor per conv and forward, no arithmetic): the cost of convolving a new
  tensor instead of a resident parameter;
- ``floats``, ``film``: ``wrap(..., 'floats')`` (density 0.5: (W + λ·α·η) ⊙ M) and
  ``wrap(..., 'film')`` at λ = 1, the training pass of a step at equal work.

    OMP_NUM_THREADS=1 python bench/weight_ab.py --model resnet18 --size 32 --batch 32
    OMP_NUM_THREADS=1 python bench/weight_ab.py --tune-malloc   # as oat_plugins.train.fit runs

``--tune-malloc`` first applies ``oat_plugins._malloc.tune_cpu_allocator`` (glibc keeps freed
memory for the next step; what ``fit`` does on a CPU) to the whole process, every row alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import oat_plugins  # noqa: E402
from oat_plugins._malloc import tune_cpu_allocator  # noqa: E402
from oat_plugins.layers import weight_noise  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=32, help="image size")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tune-malloc", action="store_true",
                   help="raise glibc's trim/mmap thresholds first, as fit does on a CPU")
    return p.parse_args(argv)


class _ClonedWeights:
    """While active, every ``nn.Conv2d`` convolves a clone of its weight."""

    def __enter__(self) -> None:
        self.forward = nn.Conv2d.forward
        nn.Conv2d.forward = lambda conv, x: conv._conv_forward(x, conv.weight.clone(), conv.bias)

    def __exit__(self, *exc: object) -> None:
        nn.Conv2d.forward = self.forward


class _UnfusedNoise:
    """While active, FLOAT's weight is autograd's ``W + (α·λ)·η`` (the code before)."""

    def __enter__(self) -> None:
        self.fused = weight_noise.add_scaled_noise
        weight_noise.add_scaled_noise = lambda w, noise, alpha, lam: w + (alpha * lam) * noise

    def __exit__(self, *exc: object) -> None:
        weight_noise.add_scaled_noise = self.fused


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tuned = args.tune_malloc and tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plain = timm.create_model(args.model, num_classes=10).train()
    model, floats, film = (oat_plugins.wrap(timm.create_model(args.model, num_classes=10),
                                            method).train().set_lambda(1.0)
                           for method in ("float", "floats", "film"))
    x = torch.rand(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))

    def step(net: nn.Module) -> None:
        F.cross_entropy(net(x), y).backward()

    def unfused() -> None:
        with _UnfusedNoise():
            step(model)

    def cloned() -> None:
        with _ClonedWeights():
            step(plain)

    rows: dict[str, Callable[[], None]] = {
        "plain": lambda: step(plain), "float fused": lambda: step(model),
        "float unfused": unfused, "clone only": cloned,
        "floats": lambda: step(floats), "film": lambda: step(film)}
    times: dict[str, list[float]] = {name: [] for name in rows}
    for r in range(args.warmup + args.repeats):
        for name, run in rows.items():
            start = time.perf_counter()
            run()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain"])
    print(f"{args.model} {args.size}² batch {args.batch}, {args.threads} thread(s), "
          f"torch {torch.__version__}, glibc malloc {'tuned' if tuned else 'default'}: "
          f"training forward + backward, medians of {args.repeats}")
    print("| row | ms | × plain |\n|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1000 * median:.1f} | {median / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
