"""Overhead of conditional methods vs the plain backbone, measured side by side in one run.

For each method: parameters, the time of one adversarial training step (PGD-7, ε = 8/255, the
same batch and attack budget for every row) and the inference latency of ``export(λ)`` and of
the conditional model itself, each as a ratio to the plain backbone (medians over repeats).

    python bench/overhead.py --model resnet18 --methods film,float --batch-size 32

Training-step rows:
  plain PGD-AT      PGD-7 on the whole batch, one forward/backward on the adversarial batch.
  <method> OAT      the library's recipe (``oat_plugins.train.oat_loss``) with the method's
                    default λ sampler: PGD-7 on the λ > 0 samples only, one forward on the
                    clean (λ < 1) and adversarial samples.
  <method> λ=1      every sample at λ = 1: the same work as plain PGD-AT, so the ratio isolates
                    the cost of the conditioned layers.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchattacks

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=FutureWarning)
    import timm

import oat_plugins
from oat_plugins.train import TrainConfig, default_alpha, make_attack, oat_loss


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function; the functions run interleaved, round by round, so
    that drifting machine load affects every row alike."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="timm model name")
    parser.add_argument("--methods", default="film", help="comma-separated method names")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--lam", type=float, default=0.5, help="λ for the latency rows")
    parser.add_argument("--rows", choices=("all", "inference"), default="all",
                        help="'inference': only the parameter and latency tables (fast)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    backbone = timm.create_model(args.model, num_classes=args.num_classes)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, args.num_classes, (args.batch_size,))
    config = TrainConfig(epochs=1, steps=7)

    plain = oat_plugins.wrap(copy.deepcopy(backbone), "film").export(0.0)  # Normalize + backbone
    models = {m: oat_plugins.wrap(copy.deepcopy(backbone), m) for m in args.methods.split(",")}

    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)
    plain_attack = torchattacks.PGD(
        plain, eps=config.eps, alpha=default_alpha("pgd", config.eps, 7), steps=7
    )

    def plain_step() -> None:
        plain.train()
        x_adv = plain_attack(x, y)
        loss = F.cross_entropy(plain(x_adv), y)
        plain_optimizer.zero_grad()
        loss.backward()
        plain_optimizer.step()

    def method_step(model, lam: torch.Tensor):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        attack = make_attack(model, config)

        def step() -> None:
            model.train()
            loss, _ = oat_loss(model, x, y, lam, attack)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return step

    steps = {"plain PGD-AT": plain_step}
    for name, model in models.items():
        sampled = model.method.default_sampler()(args.batch_size, torch.Generator().manual_seed(0))
        steps[f"{name} OAT (sampler)"] = method_step(model, sampled)
        steps[f"{name} λ=1"] = method_step(model, torch.ones(args.batch_size))
    rows_train = median_seconds(steps, args.repeats) if args.rows == "all" else {}

    plain.eval()
    forwards = {"plain backbone": plain}
    for name, model in models.items():
        model.eval().set_lambda(args.lam)
        forwards[f"{name} export(λ={args.lam})"] = model.export(args.lam).eval()
        forwards[f"{name} conditional (λ={args.lam})"] = model
    with torch.inference_mode():
        rows_inf = median_seconds(
            {label: (lambda m=m: m(x)) for label, m in forwards.items()}, args.repeats * 2
        )

    p_plain = n_params(plain)
    print(f"\n{args.model}, {args.num_classes} classes, batch {args.batch_size} × "
          f"{args.image_size}², {args.threads} threads, medians of {args.repeats} repeats\n")
    print("| model | parameters | × plain |\n|---|---:|---:|")
    print(f"| plain backbone | {p_plain:,} | 1.00 |")
    for name, model in models.items():
        p = n_params(model)
        print(f"| {name} | {p:,} | {p / p_plain:.2f} |")
        e = n_params(model.export(args.lam))
        print(f"| {name} export | {e:,} | {e / p_plain:.2f} |")
    if rows_train:
        print("\n| training step (PGD-7) | seconds | × plain |\n|---|---:|---:|")
    for label, t in rows_train.items():
        print(f"| {label} | {t:.3f} | {t / rows_train['plain PGD-AT']:.2f} |")
    print("\n| inference | ms / batch | × plain |\n|---|---:|---:|")
    for label, t in rows_inf.items():
        print(f"| {label} | {1000 * t:.1f} | {t / rows_inf['plain backbone']:.2f} |")


if __name__ == "__main__":
    main()
