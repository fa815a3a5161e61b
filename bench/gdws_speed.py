"""GDWS wall-clock speed on CPU: rank-2 CIFAR VGG-11, dense vs GDWS, interleaved timing.

Usage::

    python bench/gdws_speed.py                      # batch 1 and 32, NCHW and channels_last
    python bench/gdws_speed.py --batches 32 --rounds 15 --threads 2

Model: CIFAR VGG-11 (3x3 conv + BN + ReLU, max-pool, 512 -> 10 linear, 32x32 input) with
random weights in which every 3x3 conv's weight has rank exactly 2 per input channel
(``W[:, c] = u1 v1^T + u2 v2^T``) and random BN statistics. GDWS (``convert(beta=...)``, LEGO,
alpha = 1, first conv kept) then keeps exactly ``G = 2C`` components per layer and is exact
(checked). Conv MACs drop about 4.4x.

Timed, per batch size and memory format, on the same input, under ``torch.inference_mode``:

* ``dense``: the model itself;
* ``gdws``: ``convert(model, beta, memory_format=...)`` (``GDWSConv2d``, layout ``replicate``);
* ``pair``: the minimal reference pair with a channel multiplier, each conv replaced by
  ``nn.Conv2d(C, 2C, 3, groups=C)`` + ``nn.Conv2d(2C, M, 1)`` (what ``GDWSConv2d`` did before
  the ``replicate`` layout).

With ``--varying-ranks`` input channel c has rank ``1 + c % 3`` instead (G = 2C on average, g_c
varies) and the variants are the two ways to lay that out: ``gather`` (``index_select`` of the
G channels) and ``replicate`` (zero-padded to 3 components per channel, 1.5x the GDWS MACs).

The variants run interleaved in rounds (A, B, C, A, B, C, ..., order rotated every round); each
sample is the mean of ``--inner`` forwards. Reported: the median ms per forward with the
10th-90th percentile spread, and the speed-up as the median (10th-90th percentile) of the
per-round ratios ``dense / variant``, which cancels load drift shared within a round. Writes
``bench/results/gdws_speed.json`` (or ``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from oat_plugins._io import atomic_write_text
from oat_plugins.gdws import GDWSConv2d, convert, count_macs

VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
RANK = 2


def rank2_vgg11(seed: int = 0, num_classes: int = 10, varying: bool = False) -> nn.Sequential:
    """CIFAR VGG-11 in eval mode, each 3x3 weight of rank exactly ``RANK`` per input channel
    (``varying``: rank ``1 + c % 3`` for input channel c, the same G = 2C on average)."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    c = 3
    for v in VGG11:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        conv = nn.Conv2d(c, int(v), 3, padding=1)
        bn = nn.BatchNorm2d(int(v))
        with torch.no_grad():
            r_max = 3 if varying else RANK
            u = torch.randn(int(v), c, r_max, generator=g)
            k = torch.randn(c, r_max, 9, generator=g)
            if varying:  # zero the components >= 1 + c % 3
                keep = torch.arange(3) < (torch.arange(c) % 3 + 1).unsqueeze(1)
                k = k * keep.unsqueeze(2)
            w = torch.einsum("mcr,crk->mck", u, k).reshape(int(v), c, 3, 3)
            conv.weight.copy_(w / (c * 9) ** 0.5)
            conv.bias.copy_(torch.randn(int(v), generator=g) * 0.1)
            bn.weight.copy_(torch.rand(int(v), generator=g) + 0.5)
            bn.bias.copy_(torch.randn(int(v), generator=g) * 0.1)
            bn.running_mean.copy_(torch.randn(int(v), generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(int(v), generator=g) + 0.5)
        layers += [conv, bn, nn.ReLU(inplace=True)]
        c = int(v)
    fc = nn.Linear(c, num_classes)
    with torch.no_grad():  # from the seeded generator too, so the whole model is reproducible
        fc.weight.copy_(torch.randn(num_classes, c, generator=g) / c**0.5)
        fc.bias.zero_()
    layers += [nn.Flatten(), fc]
    return nn.Sequential(*layers).eval()


def gdws_exact(
    model: nn.Module, memory_format: torch.memory_format, layout: str = "auto"
) -> nn.Module:
    """GDWS with a beta far below every kept score and above the float32 rounding residue, so
    that G = 2C in every converted layer (checked; with varying ranks G = sum of the ranks, 2C
    up to rounding, and ``layout='replicate'`` pads to 3C) and the model is exact (checked in
    :func:`run_case`)."""
    new, report = convert(model, beta=1e-6, memory_format=memory_format, layout=layout)
    for r in report:
        c = r.in_channels
        if r.replaced and abs(r.num_components - RANK * c) > 1 and r.num_components != 3 * c:
            raise RuntimeError(f"{r.name}: G = {r.num_components}, expected {RANK * c}")
    if not any(r.replaced for r in report):
        raise RuntimeError("no conv was replaced")
    return new.eval()


def multiplier_pair(gdws: nn.Sequential) -> nn.Sequential:
    """The minimal grouped(multiplier)+1x1 reference: every ``GDWSConv2d`` of ``gdws`` as
    ``nn.Sequential(Conv2d(C, qC, K, groups=C), Conv2d(qC, M, 1))`` with the same weights."""
    return nn.Sequential(*[_to_pair(m) if isinstance(m, GDWSConv2d) else m for m in gdws]).eval()


def _to_pair(layer: GDWSConv2d) -> nn.Sequential:
    c, m, q = layer.in_channels, layer.out_channels, layer.replicas
    kh, kw = layer.kernel_size
    dw = nn.Conv2d(c, c * q, (kh, kw), layer.stride, layer.padding, layer.dilation, groups=c,
                   bias=False)
    pw = nn.Conv2d(c * q, m, 1, bias=layer.bias is not None)
    # replicate layout is slot-major (k*C + c); the multiplier conv is channel-major (c*q + k)
    perm = torch.arange(c * q).reshape(q, c).t().reshape(-1)
    with torch.no_grad():
        dw.weight.copy_(layer.dw_weight[perm])
        pw.weight.copy_(layer.pw_weight[:, perm])
        if layer.bias is not None:
            pw.bias.copy_(layer.bias)
    return nn.Sequential(dw, pw).to(memory_format=_format_of(layer.dw_weight))


def _format_of(t: torch.Tensor) -> torch.memory_format:
    if t.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last


def _pct(v: list[float], p: float) -> float:
    s = sorted(v)
    i = min(len(s) - 1, max(0, round(p * (len(s) - 1))))
    return s[i]


@torch.inference_mode()
def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, inner: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each function, sampled in rotated round-robin order."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t = time.perf_counter()
            for _ in range(inner):
                fns[n]()
            out[n].append((time.perf_counter() - t) / inner)
    return out


def summarize(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median and p10/p90 ms per variant, and the per-round speed-up ``dense / variant``."""
    res: dict[str, dict[str, float]] = {}
    for n, ts in times.items():
        ratios = [d / t for d, t in zip(times["dense"], ts, strict=True)]
        res[n] = {
            "ms_median": 1e3 * statistics.median(ts),
            "ms_p10": 1e3 * _pct(ts, 0.1),
            "ms_p90": 1e3 * _pct(ts, 0.9),
            "speedup_median": statistics.median(ratios),
            "speedup_p10": _pct(ratios, 0.1),
            "speedup_p90": _pct(ratios, 0.9),
        }
    return res


def run_case(
    dense: nn.Module, batch: int, fmt: torch.memory_format, rounds: int, inner: int,
    varying: bool = False,
) -> dict[str, dict[str, float]]:
    """Time dense / gdws / pair (or, with ``varying`` ranks, dense / gather / padded replicate)
    at one batch size and memory format, after checking every variant against the dense model."""
    model = dense.to(memory_format=fmt)
    if varying:
        variants = {"gather": gdws_exact(dense, fmt, "gather"),
                    "replicate": gdws_exact(dense, fmt, "replicate")}
    else:
        gdws = gdws_exact(dense, fmt)
        variants = {"gdws": gdws, "pair": multiplier_pair(gdws)}
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=fmt)
    with torch.inference_mode():
        ref = model(x)
        for name, m in variants.items():
            err = ((m(x) - ref).abs().max() / ref.abs().max()).item()
            if err > 1e-4:
                raise RuntimeError(f"{name} differs from dense by {err:.2e} (relative)")
    fns = {"dense": lambda: model(x)}
    fns.update({n: (lambda m=m: m(x)) for n, m in variants.items()})
    return summarize(interleaved(fns, rounds, inner))


def conv_macs(model: nn.Module, gdws: nn.Module) -> tuple[int, int, int, int]:
    """Whole-model MACs (dense, gdws) and the MACs of the converted convs only."""
    x = torch.zeros(1, 3, 32, 32)
    total_d, total_g = count_macs(model, x), count_macs(gdws, x)
    sub_d = sub_g = 0
    hw = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: hw.__setitem__(n, o.shape[-2:]))
             for n, m in gdws.named_modules() if isinstance(m, GDWSConv2d)]
    with torch.inference_mode():
        gdws(x)
    for h in hooks:
        h.remove()
    for n, (h, w) in hw.items():
        layer = gdws.get_submodule(n)
        sub_d += h * w * layer.original_macs_per_pixel
        sub_g += h * w * layer.macs_per_pixel
    return total_d, total_g, sub_d, sub_g


def markdown(results: list[dict], macs: tuple[int, int, int, int]) -> str:
    total_d, total_g, sub_d, sub_g = macs
    names = [n for n in results[0]["variants"] if n != "dense"]
    lines = [
        f"MACs per image: dense {total_d / 1e6:.1f} M, GDWS {total_g / 1e6:.1f} M "
        f"({total_d / total_g:.2f}x fewer; replaced convs alone {sub_d / sub_g:.2f}x).",
        "",
        "| batch | layout | dense ms | " + " | ".join(f"{n} ms" for n in names) + " | "
        + " | ".join(f"{n} speed-up" for n in names) + " |",
        "|---:|---|---|" + "---|" * (2 * len(names)),
    ]

    def ms(v: dict) -> str:
        return f"{v['ms_median']:.2f} ({v['ms_p10']:.2f}–{v['ms_p90']:.2f})"

    def sp(v: dict) -> str:
        return f"**{v['speedup_median']:.2f}×** ({v['speedup_p10']:.2f}–{v['speedup_p90']:.2f})"

    for r in results:
        v = r["variants"]
        lines.append(f"| {r['batch']} | {r['layout']} | {ms(v['dense'])} | "
                     + " | ".join(ms(v[n]) for n in names) + " | "
                     + " | ".join(sp(v[n]) for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--layouts", default="nchw,channels_last")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per case")
    p.add_argument("--inner", type=int, default=0,
                   help="forwards per sample (0: 5 at batch 1, 1 otherwise)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--varying-ranks", action="store_true",
                   help="ranks 1 + c %% 3 per input channel; time layout gather vs replicate "
                        "(zero-padded to 3 components per channel) instead of gdws vs pair")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gdws_speed.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    fmts = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    if any(s not in fmts for s in layouts):
        p.error(f"--layouts takes {', '.join(fmts)}")
    dense = rank2_vgg11(args.seed, varying=args.varying_ranks)
    macs = conv_macs(dense, gdws_exact(dense, torch.contiguous_format))
    load0 = os.getloadavg()
    results = []
    for b in (int(s) for s in args.batches.split(",") if s.strip()):
        inner = args.inner or (5 if b == 1 else 1)
        for lay in layouts:
            t0 = time.time()
            var = run_case(dense, b, fmts[lay], args.rounds, inner, args.varying_ranks)
            results.append({"batch": b, "layout": lay, "inner": inner, "variants": var,
                            "loadavg_1min_after": os.getloadavg()[0],
                            "seconds": round(time.time() - t0, 1)})
            print(f"done batch {b} {lay} ({time.time() - t0:.0f} s, load "
                  f"{os.getloadavg()[0]:.1f})", flush=True)
    table = markdown(results, macs)
    meta = {
        "command": "python bench/gdws_speed.py " + " ".join(argv or []),
        "torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "macs": dict(zip(["dense", "gdws", "dense_replaced_convs", "gdws_replaced_convs"], macs,
                         strict=True)),
    }
    atomic_write_text(json.dumps({"meta": meta, "results": results, "table": table}, indent=1),
                      args.out)
    kind = "varying-rank (1 + c % 3)" if args.varying_ranks else "rank-2"
    print(f"\n{kind} CIFAR VGG-11, {args.threads} threads, {args.rounds} interleaved rounds, "
          f"load average {load0[0]:.1f} → {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
