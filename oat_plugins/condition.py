"""The condition λ and the one mechanism by which it reaches conditioned layers.

A :class:`Condition` is a small shared object. The :class:`~oat_plugins.ConditionalModel` owns
it, every conditioned layer holds a reference to it, and ``set_lambda`` writes it. Layers never
receive λ as a forward argument, so timm blocks that call their children with one argument,
torchattacks and RobustBench keep working unchanged.

λ is changed for a while through one idiom, :meth:`Condition.at` (``model.at(lam)`` and
:func:`condition` delegate to it), and a per-sample λ is split into groups of equal λ by one
function, :func:`lambda_groups`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Iterator
from typing import Protocol, TypeVar

import torch

Lambda = float | torch.Tensor
"""A scalar λ for the whole batch, or a tensor of shape (N,) with one λ per sample."""


def validate_lambda(lam: object, *, per_sample: bool = True) -> Lambda:
    """Return ``lam`` as a Python float or a 1-D float tensor, or raise ``ValueError``.

    Allowed: a real number in [0, 1]; a 0-d tensor holding one; and, when ``per_sample`` is
    true, a 1-D tensor (or list) of numbers in [0, 1], one per sample.
    """
    if isinstance(lam, bool):
        raise ValueError(f"λ must be a number in [0, 1], got the bool {lam!r}")
    if isinstance(lam, (list, tuple)):
        lam = torch.as_tensor(lam, dtype=torch.float32)
    if isinstance(lam, torch.Tensor):
        if lam.dim() == 0:
            lam = float(lam)
        else:
            return _validate_per_sample(lam, per_sample)
    if not isinstance(lam, (int, float)):
        raise ValueError(f"λ must be a float in [0, 1] or a tensor of shape (N,), got {lam!r}")
    value = float(lam)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"λ must be in [0, 1] and not NaN, got {value!r}")
    return value


def _validate_per_sample(lam: torch.Tensor, per_sample: bool) -> torch.Tensor:
    if not per_sample:
        raise ValueError(
            "one λ for the whole batch is needed here (a float in [0, 1]); "
            f"got a tensor of shape {tuple(lam.shape)}"
        )
    if lam.dim() != 1 or lam.numel() == 0:
        raise ValueError(
            f"a per-sample λ must be a non-empty 1-D tensor of shape (N,), got shape "
            f"{tuple(lam.shape)}"
        )
    lam = lam.detach().float()
    bad = torch.isnan(lam) | (lam < 0) | (lam > 1)
    if bool(bad.any()):
        raise ValueError(
            f"every λ must be in [0, 1] and not NaN; got {lam[bad][:5].tolist()} "
            f"({int(bad.sum())} bad values)"
        )
    return lam


def lambda_groups(lam: torch.Tensor) -> list[tuple[float, torch.Tensor]]:
    """The distinct values of a per-sample λ (ascending), each with the indices of its samples.

    The one place a per-sample λ is split: a model whose method serves a per-sample λ by one
    forward per value, training's per-group attack and evaluation all use it."""
    values, inverse = torch.unique(lam, sorted=True, return_inverse=True)
    return [(float(v), torch.nonzero(inverse == i, as_tuple=True)[0])
            for i, v in enumerate(values.tolist())]


T = TypeVar("T")


class Condition:
    """The current λ, shared by all conditioned layers of one model, with a per-λ cache.

    :meth:`cached` keeps tensors that depend only on λ (and on the batch's size, device and
    dtype), e.g. FiLM's λ encoding, until λ changes; methods use it for anything that is a
    pure function of λ.
    """

    def __init__(self, lam: Lambda = 0.0) -> None:
        self._cache: dict[tuple, torch.Tensor | int] = {}
        self._lam: Lambda = validate_lambda(lam)
        self._frozen = False

    @property
    def weights_constant(self) -> bool:
        """No gradient is wanted for the conditioning weights (under ``torch.no_grad`` or
        inference mode, or inside :meth:`frozen`): layers may serve values folded at a
        scalar λ instead of recomputing them every forward."""
        return self._frozen or not torch.is_grad_enabled()

    @property
    def serves_folded(self) -> bool:
        """Whether layers may serve values folded at the current λ: a scalar λ and constant
        conditioning weights."""
        return self.is_scalar and self.weights_constant

    @property
    def is_frozen(self) -> bool:
        """Inside :meth:`frozen`: the weights stay constant for a while (an attack's steps)."""
        return self._frozen

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Treat the conditioning weights as constants inside the block (gradients still flow
        to the inputs): what an attack needs."""
        previous, self._frozen = self._frozen, True
        try:
            yield
        finally:
            self._frozen = previous

    @property
    def lam(self) -> Lambda:
        return self._lam

    @lam.setter
    def lam(self, value: object) -> None:
        self._set(validate_lambda(value))

    def _set(self, lam: Lambda) -> None:
        self._lam = lam
        self._cache.clear()

    @contextlib.contextmanager
    def at(self, lam: object, *, validate: bool = True) -> Iterator[None]:
        """Hold ``lam`` inside the block; the previous λ (float or per-sample tensor) is
        restored exactly on exit. ``validate=False`` is for values taken from an already
        validated λ (the groups of a per-sample λ)."""
        previous = self._lam
        self._set(validate_lambda(lam) if validate else lam)
        try:
            yield
        finally:
            self._set(previous)

    @property
    def is_scalar(self) -> bool:
        return isinstance(self._lam, float)

    def check_batch(self, batch_size: int) -> None:
        """Raise if a per-sample λ does not have one entry per input sample."""
        if not self.is_scalar and self._lam.numel() != batch_size:
            raise ValueError(
                f"per-sample λ has {self._lam.numel()} entries but the batch has {batch_size} "
                "samples; set one λ per sample (or a float for the whole batch)"
            )

    def cached(self, key: Hashable, x: torch.Tensor,
               compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``compute(λ values)`` for the batch of ``x``, kept until λ changes.

        ``compute`` receives :meth:`values` (float32) and must depend on nothing but λ and
        buffers that never change (its result is not recomputed when parameters change).
        Tensors made under ``torch.inference_mode`` cannot be saved for a later backward, so
        they are cached apart from those made outside it."""
        full = (key, x.shape[0], x.device, torch.is_inference_mode_enabled())
        if full not in self._cache:
            self._cache[full] = compute(self.values(x))
        return self._cache[full]

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """λ as a float32 (B,) tensor on ``x``'s device matching its leading dimension (B = 1
        for a scalar λ). Kept in float32 whatever the activations' dtype (under bf16, λ codes
        would be off by up to half a percent).

        Some backbones fold extra items into the batch dimension (e.g. windows of Swin, in
        sample-major order); a per-sample λ is then repeated to that size.
        """
        full = ("values", x.shape[0], x.device, torch.is_inference_mode_enabled())
        if full not in self._cache:
            if self.is_scalar:
                lam = torch.full((1,), self._lam, device=x.device, dtype=torch.float32)
            else:
                lam = _expand_to_batch(self._lam.to(device=x.device), x.shape[0])
            self._cache[full] = lam
        return self._cache[full]

    def clean_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean (B,) mask of the samples with λ == 0 (those routed to the clean branch)."""
        return self.cached("clean", x, lambda lam: lam == 0)

    def clean_count(self, x: torch.Tensor) -> int:
        """How many of ``x``'s batch items have λ == 0, kept until λ changes: counted once
        per λ on λ's own device, not once per layer on ``x``'s (a device sync each)."""
        full = ("clean-count", x.shape[0])
        if full not in self._cache:
            if self.is_scalar:
                count = x.shape[0] if self._lam == 0 else 0
            else:
                count = int(_expand_to_batch(self._lam == 0, x.shape[0]).sum())
            self._cache[full] = count
        return self._cache[full]


def _expand_to_batch(lam: torch.Tensor, batch: int) -> torch.Tensor:
    n = lam.shape[0]
    if batch == n:
        return lam
    if batch % n:
        raise ValueError(
            f"a layer saw a batch of {batch} items, which is not a multiple of the {n} "
            "per-sample λ values"
        )
    return lam.repeat_interleave(batch // n)


class _HasAt(Protocol):
    def at(self, lam: object) -> contextlib.AbstractContextManager: ...


def condition(model: _HasAt, lam: object) -> contextlib.AbstractContextManager:
    """Temporarily set λ on ``model`` (same as ``model.at(lam)``); the previous value is
    restored on exit.

    >>> with oat_plugins.condition(model, 0.3):
    ...     logits = model(x)
    """
    return model.at(lam)
