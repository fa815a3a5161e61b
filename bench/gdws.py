"""GDWS benchmark: MACs, CPU latency, clean and PGD accuracy of a model before/after GDWS.

Usage (a checkpoint written by ``oat_plugins.save``, exported at --lambda)::

    python bench/gdws.py --checkpoint model.pt --lambda 1.0 --betas 0.001,0.01,0.1

or a plain timm model (random init unless --state-dict is given; latency/MACs still meaningful,
accuracies are not)::

    python bench/gdws.py --timm-model resnet18 --betas 0.3,1,3 --n-test 200

Data: CIFAR-10 (JPEG q75) from ``../shared/data/cifar10-jpeg.tar.gz`` (or ``--data`` any
``oat_plugins.data.load_dataset`` spec, e.g. ``bundled``); alphas are computed
on the first ``--alpha-samples`` *train* images (PGD), accuracies on the first ``--n-test``
*test* images (classes interleaved). Latency: median over ``--repeats`` of one forward of the
same batch under ``torch.inference_mode`` with ``--threads`` threads, original and converted
timed alternately so that background load hits both alike.
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import sys
import tarfile
import time
from pathlib import Path

import torch
from torch import nn

from oat_plugins.gdws import GDWSConv2d, compute_alphas, convert, count_macs

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]
DEFAULT_TAR = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz")


def load_cifar_tar(path: str, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``n`` images of ``split`` (``<split>/<class>/NNNN.jpg``), classes interleaved
    (image 0 of every class, then image 1, ...), as ``[0, 1]`` float tensors."""
    import numpy as np
    from PIL import Image

    per_class = -(-n // len(CLASSES))
    wanted: dict[str, tuple[int, int]] = {}
    for ci, c in enumerate(CLASSES):
        for k in range(per_class):
            wanted[f"{split}/{c}/{k:04d}.jpg"] = (k, ci)
    found: dict[tuple[int, int], bytes] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            key = member.name.removeprefix("./")
            if key in wanted:
                f = tar.extractfile(member)
                if f is not None:
                    found[wanted[key]] = f.read()
                if len(found) == len(wanted):
                    break
    order = sorted(found)[:n]
    imgs = [np.asarray(Image.open(io.BytesIO(found[o])).convert("RGB")) for o in order]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
    y = torch.tensor([o[1] for o in order])
    return x, y


def load_images(args: argparse.Namespace, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``n`` images of ``split``: from the CIFAR-10 JPEG tarball (read directly), or any
    ``oat_plugins.data.load_dataset`` spec (``bundled``, ``cifar10``, an ImageFolder directory),
    without augmentation, in a fixed class-interleaved order."""
    if n <= 0:
        return torch.empty(0, 3, 32, 32), torch.empty(0, dtype=torch.long)
    if str(args.data).endswith((".tar.gz", ".tgz", ".tar")):
        return load_cifar_tar(args.data, split, n)
    from oat_plugins.data import load_dataset

    ds = load_dataset(args.data, split, augment=False, download=False)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(ds), generator=g)[:n].tolist()  # fixed subset across classes
    pairs = [ds[i] for i in idx]
    return torch.stack([p[0] for p in pairs]), torch.tensor([int(p[1]) for p in pairs])


def load_model(args: argparse.Namespace) -> nn.Module:
    if args.checkpoint:
        import oat_plugins

        cond = oat_plugins.load(args.checkpoint)
        model = cond.export() if args.lam is None else cond.export(args.lam)
    else:
        import timm

        model = timm.create_model(args.timm_model, pretrained=False,
                                  num_classes=args.num_classes)
        if args.state_dict:
            model.load_state_dict(torch.load(args.state_dict, map_location="cpu",
                                             weights_only=True))
    return model.eval()


def _time_once(model: nn.Module, x: torch.Tensor) -> float:
    t = time.perf_counter()
    model(x)
    return time.perf_counter() - t


@torch.inference_mode()
def paired_latency(a: nn.Module, b: nn.Module, x: torch.Tensor, repeats: int,
                   warmup: int = 3) -> tuple[float, float, float]:
    """Median seconds per forward of ``a`` and ``b`` on the same batch, timed alternately, and
    the ratio of their minima (``min a / min b``, the estimate least hurt by background load)."""
    for _ in range(warmup):
        a(x)
        b(x)
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_time_once(a, x))
        tb.append(_time_once(b, x))
    return statistics.median(ta), statistics.median(tb), min(ta) / min(tb)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    if x.numel() == 0:
        return float("nan")
    correct = 0
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            correct += (model(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum().item()
    return 100.0 * correct / len(x)


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int,
                 steps: int) -> float:
    if x.numel() == 0 or steps <= 0:
        return float("nan")
    import torchattacks

    atk = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=steps, random_start=True)
    correct = 0
    for s in range(0, len(x), batch):
        xa = atk(x[s:s + batch], y[s:s + batch])
        with torch.inference_mode():
            correct += (model(xa).argmax(1) == y[s:s + batch]).sum().item()
    return 100.0 * correct / len(x)


def layer_table(orig: nn.Module, conv_model: nn.Module, x: torch.Tensor, repeats: int) -> str:
    """Per replaced layer: original conv vs GDWSConv2d latency, NCHW and channels_last."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, inp, name=n: inputs.__setitem__(name, inp[0].detach()))
        for n, m in orig.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.inference_mode():
        orig(x)
    for h in hooks:
        h.remove()
    rows = ["| layer | C→M | G | layout | MAC red. | NCHW orig ms | NCHW gdws ms | speed-up "
            "| (min) | NHWC orig ms | NHWC gdws ms | speed-up | (min) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in conv_model.named_modules():
        if not isinstance(m, GDWSConv2d) or name not in inputs:
            continue
        ref = orig.get_submodule(name)
        xi = inputs[name]
        to, tg, rmin = paired_latency(ref, m, xi, repeats)
        cl = xi.contiguous(memory_format=torch.channels_last)
        ref_cl = ref.to(memory_format=torch.channels_last)
        m_cl = m.to(memory_format=torch.channels_last)
        to2, tg2, rmin2 = paired_latency(ref_cl, m_cl, cl, repeats)
        ref.to(memory_format=torch.contiguous_format)
        m.to(memory_format=torch.contiguous_format)
        rows.append(
            f"| {name} | {m.in_channels}→{m.out_channels} | {m.num_components} "
            f"| {m.layout} "
            f"| {m.original_macs_per_pixel / m.macs_per_pixel:.2f}x | {to * 1e3:.3f} "
            f"| {tg * 1e3:.3f} | {to / tg:.2f}x | {rmin:.2f}x | {to2 * 1e3:.3f} "
            f"| {tg2 * 1e3:.3f} | {to2 / tg2:.2f}x | {rmin2:.2f}x |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="oat_plugins.save file")
    src.add_argument("--timm-model", default="resnet18", help="plain timm model (default)")
    p.add_argument("--state-dict", help="state dict for --timm-model")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--lambda", dest="lam", type=float, default=None)
    p.add_argument("--betas", default="0.001,0.01,0.1",
                   help="comma-separated network-level betas (LEGO)")
    p.add_argument("--budgets", default="",
                   help="comma-separated budget fractions of full rank (MEGO); replaces --betas")
    p.add_argument("--alpha-samples", type=int, default=32,
                   help="train images for PGD alphas (0: alpha = 1)")
    p.add_argument("--data", default=DEFAULT_TAR,
                   help="CIFAR-10 JPEG tarball, or an oat_plugins.data spec / ImageFolder dir")
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=64, help="latency batch size")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels-last", action="store_true",
                   help="time whole models in channels_last too")
    p.add_argument("--layers", action="store_true",
                   help="per-layer latency table (NCHW vs channels_last) at the largest beta")
    p.add_argument("--layout", default="auto", choices=["auto", "gather", "replicate"],
                   help="GDWSConv2d layout (convert(layout=...); replicate pads to uniform)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    model = load_model(args)
    have_data = Path(args.data).exists() or args.data in ("bundled", "cifar10", "cifar100",
                                                          "svhn")
    if not have_data:
        print(f"no data at {args.data}: accuracies and alphas skipped", file=sys.stderr)
    xt, yt = load_images(args, "test", args.n_test if have_data else 0)
    alphas = None
    if have_data and args.alpha_samples > 0:
        xa, ya = load_images(args, "train", args.alpha_samples)
        alphas = compute_alphas(model, (xa, ya), n_samples=args.alpha_samples, progress=False)
    xb = torch.rand(args.batch, 3, args.image_size, args.image_size)
    macs0 = count_macs(model, xb[:1])
    acc0 = accuracy(model, xt, yt, 100)
    rob0 = pgd_accuracy(model, xt, yt, 100, args.pgd_steps)

    if args.budgets:
        settings = [("budget", float(b)) for b in args.budgets.split(",") if b.strip()]
    else:
        settings = [("beta", float(b)) for b in args.betas.split(",") if b.strip()]
    layouts = ["NCHW"] + (["NHWC"] if args.channels_last else [])
    head = ("| setting | replaced | MACs (M) | MAC red. | layout | orig ms | gdws ms | speed-up "
            "| speed-up (min) | clean % | PGD % |")
    rows = [head, "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| original | 0 | {macs0 / 1e6:.1f} | 1.00x | – | – | – | – | – | {acc0:.1f} "
            f"| {rob0:.1f} |"]
    last = None
    for key, val in settings:
        new, report = convert(model, alphas=alphas, layout=args.layout, **{key: val})
        new.eval()
        n_rep = sum(r.replaced for r in report)
        macs = count_macs(new, xb[:1])
        acc = accuracy(new, xt, yt, 100)
        rob = pgd_accuracy(new, xt, yt, 100, args.pgd_steps)
        for lay in layouts:
            if lay == "NHWC":
                m0 = model.to(memory_format=torch.channels_last)
                m1 = new.to(memory_format=torch.channels_last)
                x = xb.contiguous(memory_format=torch.channels_last)
            else:
                m0, m1, x = model, new, xb
            t0, t1, rmin = paired_latency(m0, m1, x, args.repeats)
            rows.append(
                f"| {'β' if key == 'beta' else 'budget'} {val:g} | {n_rep} | {macs / 1e6:.1f} "
                f"| {macs0 / macs:.2f}x | {lay} "
                f"| {t0 * 1e3:.1f} | {t1 * 1e3:.1f} | {t0 / t1:.2f}x | {rmin:.2f}x "
                f"| {acc:.1f} | {rob:.1f} |"
            )
            model.to(memory_format=torch.contiguous_format)
            new.to(memory_format=torch.contiguous_format)
        last = new
    init = "state dict" if args.state_dict else "random init"
    desc = args.checkpoint or f"{args.timm_model} ({init})"
    print(f"GDWS bench: {desc}, batch {args.batch}x3x{args.image_size}x{args.image_size}, "
          f"{args.threads} threads, median of {args.repeats}, alphas: "
          f"{f'PGD on {args.alpha_samples} train images' if alphas else 'α = 1'}, "
          f"accuracy on {len(xt)} CIFAR-10 (JPEG q75) test images, PGD-{args.pgd_steps} "
          "L∞ 8/255\n")
    print("\n".join(rows))
    if not args.checkpoint and not args.state_dict:
        print("\nrandom-init weights: accuracies are chance level and say nothing about GDWS; "
              "MACs and latency are meaningful.")
    if args.layers and last is not None:
        key, val = settings[-1]
        print(f"\nPer layer at {key} = {val:g} (same input as inside the model):\n")
        print(layer_table(model, last, xb, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
