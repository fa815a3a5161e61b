"""Margin-sensitivity channel weights alpha_c for GDWS (SPEC section 5).

For sample n with label t, competitor class j and a conv's per-input-channel weight slice W_c
(``M/groups x Kh*Kw``)::

    alpha_c = mean_n  sum_j ||d(z_t - z_j)/dW_c||_F^2 / (2 (z_t - z_j)^2 (M/groups) Kh Kw)

computed on adversarial samples (torchattacks PGD by default) with the model in eval mode.
``t`` is the class the model predicts on the (adversarial) sample by default, as in the
authors' code (so every margin is >= 0); ``target="label"`` uses the true label instead.

Vectorised: every (sample, competitor) pair is one row of a replicated batch, so one forward and
one backward give all per-pair output gradients of every conv at once; the per-pair weight
gradients are ``grad_out x unfold(input)`` (einsum), never a loop over samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.padding import pad_same
from torch import nn
from tqdm.auto import tqdm

from .._device import model_device
from ..attacks import build_attack
from .convert import ConvSpec, conv_spec, eligible_convs

__all__ = ["compute_alphas", "default_attack"]

logger = logging.getLogger(__name__)

AttackLike = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_attack(model: nn.Module, name: str = "pgd") -> Any:
    """The attack ``name`` of :mod:`oat_plugins.attacks` with 10 steps and the registry's
    defaults: for ``'pgd'``, L-inf PGD, eps 8/255, step 2/255 (2.5 eps / steps), random start."""
    return build_attack(name, model, steps=10)


def _explicit_pad(x: torch.Tensor, spec: ConvSpec, kernel_size: tuple[int, int]) -> torch.Tensor:
    """Pad ``x`` so that a conv with padding 0 computes what the original conv computes."""
    if spec.same_pad:
        return pad_same(x, kernel_size, spec.stride, spec.dilation)
    if isinstance(spec.padding, str):
        if spec.padding == "valid":
            return x
        # torch 'same': total d*(k-1), left = total // 2
        tot = [d * (k - 1) for d, k in zip(spec.dilation, kernel_size, strict=True)]
        return F.pad(x, [tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2])
    ph, pw = spec.padding
    if ph == 0 and pw == 0:
        return x
    mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
    return F.pad(x, [pw, pw, ph, ph], mode=mode)


def _per_pair_channel_sqnorms(
    xin: torch.Tensor, gout: torch.Tensor, conv: nn.Conv2d, spec: ConvSpec, max_elems: int
) -> torch.Tensor:
    """``||dL_b/dW_c||^2`` for every row b and input channel c: ``(B, C)``, float64."""
    kh, kw = conv.kernel_size
    g = conv.groups
    c, m = conv.in_channels, conv.out_channels
    cg, mg, kk = c // g, m // g, kh * kw
    xp = _explicit_pad(xin, spec, (kh, kw))
    b = xp.shape[0]
    out = torch.empty(b, c, dtype=torch.float64, device=xp.device)
    per_row = mg * cg * kk * g
    step = max(1, max_elems // max(per_row, 1))
    for s in range(0, b, step):
        u = F.unfold(xp[s:s + step], (kh, kw), dilation=spec.dilation, stride=spec.stride)
        nb, _, length = u.shape
        go = gout[s:s + step].reshape(nb, g, mg, -1)
        if go.shape[-1] != length:
            raise RuntimeError(
                f"unfold length {length} != output pixels {go.shape[-1]} (padding mismatch)"
            )
        u = u.reshape(nb, g, cg * kk, length)
        gw = torch.einsum("bgml,bgkl->bgmk", go, u)  # (nb, g, Mg, Cg*K)
        sq = gw.reshape(nb, g, mg, cg, kk).square().sum(dim=(2, 4))  # (nb, g, Cg)
        out[s:s + step] = sq.reshape(nb, c).to(torch.float64)
    return out


def _batches(
    data: Any, batch_size: int
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
    ):
        x, y = data
        for s in range(0, x.shape[0], batch_size):
            yield x[s:s + batch_size], y[s:s + batch_size]
        return
    for item in data:
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError("data must yield (images, labels) batches")
        yield item[0], item[1]


def _attack_fn(model: nn.Module, attack: AttackLike | str | None) -> AttackLike | None:
    """None for clean samples, else the attack to run (a name is built on ``model``)."""
    if isinstance(attack, str) and attack.strip().lower() != "none":
        return default_attack(model, attack)
    if attack is None or isinstance(attack, str):
        return None
    if callable(attack):
        return attack
    raise ValueError(f"attack must be an attack name, 'none', None or a callable; got {attack!r}")


def compute_alphas(
    model: nn.Module,
    data: Any,
    attack: AttackLike | str | None = "pgd",
    n_samples: int = 256,
    *,
    batch_size: int = 32,
    pair_chunk: int = 64,
    max_classes: int | None = 10,
    skip_first: bool = True,
    min_kernel: int = 2,
    target: str = "predicted",
    margin_eps: float = 1e-12,
    max_elems: int = 1 << 24,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-layer, per-input-channel GDWS weights alpha (SPEC section 5).

    Args:
        model: a classifier ``model(x) -> (N, classes)`` (inputs as the model expects them).
            Put in eval mode during the computation; its mode is restored afterwards.
        data: an iterable of ``(images, labels, ...)`` batches (e.g. a DataLoader), or a pair of
            tensors ``(images, labels)``.
        attack: an attack name of :mod:`oat_plugins.attacks` built by :func:`default_attack`
            (default ``"pgd"``: torchattacks PGD, eps 8/255, 10 steps), ``None`` or ``"none"``
            for clean samples, or any callable ``attack(x, y) -> x_adv`` (e.g. a torchattacks
            attack).
        n_samples: how many samples to average over (fewer if ``data`` runs out).
        batch_size: batch size when ``data`` is a tensor pair.
        pair_chunk: (sample, competitor) rows per forward/backward.
        max_classes: with more classes than this, only the ``max_classes - 1`` competitors with
            the highest logits are used per sample (the terms with the smallest margins, which
            dominate the sum); ``None`` uses all classes.
        skip_first, min_kernel: which convs get alphas (same rule as :func:`convert`).
        target: ``"predicted"`` (t = the model's top class on the sample, as in the authors'
            code; margins are >= 0) or ``"label"`` (t = the true label).
        margin_eps: floor on ``(z_t - z_j)^2`` against division by zero.
        max_elems: memory cap (elements) for the per-pair weight-gradient einsum.
        progress: show a tqdm progress bar.

    Returns:
        ``{conv name: (C,) float32 CPU tensor}`` for every eligible conv.
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1; got {n_samples!r}")
    if max_classes is not None and max_classes < 2:
        raise ValueError("max_classes must be >= 2 or None")
    if target not in ("predicted", "label"):
        raise ValueError(f"target must be 'predicted' or 'label'; got {target!r}")
    eligible, _ = eligible_convs(model, skip_first=skip_first, min_kernel=min_kernel)
    if not eligible:
        raise ValueError("model has no conv eligible for GDWS")
    specs = {n: conv_spec(m) for n, m in eligible.items()}
    device = model_device(model)
    attack_fn = _attack_fn(model, attack)  # a bad name fails before the model is touched
    was_training = model.training
    model.eval()

    sums = {n: torch.zeros(m.in_channels, dtype=torch.float64, device=device)
            for n, m in eligible.items()}
    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in eligible}

    capturing = [False]

    def make_hook(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if capturing[0]:
                captured[name].append((inp[0].detach(), out))
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in eligible.items()]
    seen = 0
    bar = tqdm(total=n_samples, desc="GDWS alphas", disable=not progress, unit="img")
    try:
        for x, y in _batches(data, batch_size):
            if seen >= n_samples:
                break
            x = x[: n_samples - seen].to(device)
            y = y[: n_samples - seen].to(device=device, dtype=torch.long)
            if attack_fn is not None:
                x = attack_fn(x, y).detach()
                model.eval()
            with torch.no_grad():
                logits = model(x)
            n, k = logits.shape
            t = logits.argmax(1) if target == "predicted" else y
            if max_classes is None or k <= max_classes:
                comp = torch.arange(k, device=device).expand(n, k)
                comp = comp[comp != t.unsqueeze(1)].reshape(n, k - 1)
            else:
                masked = logits.masked_fill(F.one_hot(t, k).bool(), float("-inf"))
                comp = masked.topk(max_classes - 1, dim=1).indices
            j_per = comp.shape[1]
            rows_n = torch.arange(n, device=device).repeat_interleave(j_per)
            rows_j = comp.reshape(-1)
            for s in range(0, rows_n.numel(), pair_chunk):
                rn, rj = rows_n[s:s + pair_chunk], rows_j[s:s + pair_chunk]
                for name in captured:
                    captured[name].clear()
                xr = x[rn].clone().requires_grad_(True)
                with torch.enable_grad():
                    capturing[0] = True
                    try:
                        z = model(xr)
                    finally:
                        capturing[0] = False
                    margin = z.gather(1, t[rn].unsqueeze(1)).squeeze(1) - z.gather(
                        1, rj.unsqueeze(1)
                    ).squeeze(1)
                    outs = []
                    for name in eligible:
                        calls = captured[name]
                        if len(calls) != 1:
                            raise ValueError(
                                f"conv {name!r} ran {len(calls)} times in one forward; "
                                "alphas need each conv to run exactly once"
                            )
                        outs.append(calls[0][1])
                    grads = torch.autograd.grad(margin.sum(), outs)
                denom = 2.0 * margin.detach().to(torch.float64).square().clamp_min(margin_eps)
                for (name, conv), go in zip(eligible.items(), grads, strict=True):
                    xin = captured[name][0][0]
                    sq = _per_pair_channel_sqnorms(xin, go.detach(), conv, specs[name], max_elems)
                    kh, kw = conv.kernel_size
                    scale = (conv.out_channels // conv.groups) * kh * kw
                    sums[name] += (sq / (denom.unsqueeze(1) * scale)).sum(0)
            seen += n
            bar.update(n)
    finally:
        for h in handles:
            h.remove()
        bar.close()
        model.train(was_training)
    if seen == 0:
        raise ValueError("data yielded no samples")
    logger.info("GDWS alphas from %d samples over %d convs", seen, len(eligible))
    return {name: (s / seen).float().cpu() for name, s in sums.items()}

