"""``oat-plugins benchmark``: RobustBench's protocol on a checkpoint, one run per λ."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import parse_lambdas


def _eps(text: str) -> float:
    from oat_plugins.robustbench.entries import parse_eps

    try:
        return parse_eps(text)
    except (ValueError, ZeroDivisionError) as err:
        raise argparse.ArgumentTypeError(f"--eps: cannot read {text!r}") from err


def _budget(text: str) -> dict[str, int]:
    budget = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--attack-budget: expected key=value, got {item!r}")
        try:
            budget[key.strip()] = int(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"--attack-budget: {err}") from err
    return budget


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        help="RobustBench evaluation (standard AutoAttack) of a checkpoint at each λ",
        description="Evaluate a checkpoint with RobustBench's protocol (first n test images, "
        "ToTensor only, standard AutoAttack with a fixed seed) at each λ, print clean and "
        "robust accuracy, and with --results write one RobustBench JSON entry per λ.",
    )
    parser.add_argument("--checkpoint", required=True, help="a file written by oat_plugins.save")
    parser.add_argument("--lambdas", type=parse_lambdas, required=True, metavar="LIST",
                        help="comma-separated λ values in [0, 1], e.g. 0,0.5,1")
    parser.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"])
    parser.add_argument("--threat-model", default="Linf", choices=["Linf", "L2"])
    parser.add_argument("--n-examples", type=int, default=10000,
                        help="the first N test images (default 10000)")
    parser.add_argument("--data", default=None,
                        help="test data: torchvision CIFAR folder, image folder or .tar.gz "
                        "(default: ./data, never downloaded)")
    parser.add_argument("--data-label", default=None,
                        help="how to name the data in the entries (default: derived)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--eps", type=_eps, default=None,
                        help="perturbation budget, e.g. 8/255 (default: 8/255 Linf, 0.5 L2)")
    parser.add_argument("--name", default=None,
                        help="model id for the entries (default: the checkpoint's file stem)")
    parser.add_argument("--results", metavar="DIR", default=None,
                        help="write entries to DIR/<dataset>/<threat-model>/<name>_lam<λ>.json")
    parser.add_argument("--device", default=None, help="e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="AutoAttack seed (default 0)")
    parser.add_argument("--attack-budget", type=_budget, default=None,
                        metavar="n_iter=I,n_target_classes=T,n_queries=Q",
                        help="reduced AutoAttack for smoke tests only (not comparable)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import oat_plugins
    from oat_plugins.robustbench import benchmark, load_data
    from oat_plugins.robustbench.protocol import check_lambda, written_path

    path = Path(args.checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    for lam in args.lambdas:  # all of them before the first (long) run
        check_lambda(lam)
    name = args.name or path.stem.replace(".", "_")
    model = oat_plugins.load(path, map_location="cpu")
    x, y, label = load_data(args.dataset, args.n_examples, args.data, args.data_label)
    print(f"{'λ':>6}  {'clean (%)':>9}  {'robust (%)':>10}")
    for lam in args.lambdas:
        result = benchmark(
            model, lam, dataset=args.dataset, threat_model=args.threat_model,
            n_examples=args.n_examples, data=(x, y), batch_size=args.batch_size,
            eps=args.eps, to_disk=args.results is not None, model_name=name,
            results_dir=args.results or "model_info", data_label=label,
            device=args.device, seed=args.seed, attack_budget=args.attack_budget,
            progress=not args.no_progress,
        )
        line = f"{lam:>6g}  {100 * result.clean_acc:>9.2f}  {100 * result.robust_acc:>10.2f}"
        if args.results is not None:
            line += f"  -> {written_path(args.results, args.dataset, args.threat_model, name, lam)}"
        print(line, flush=True)
    return 0
