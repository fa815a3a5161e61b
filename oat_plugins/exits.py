"""Early exits (RDI-Nets, Hu et al., ICLR 2020) on any timm backbone with ``feature_info``.

One home for everything multi-exit: where the exits go, the heads, the split of the backbone
into stage segments (so that a sample that exits early runs no later segment), the entropy
router, calibration of its thresholds to a compute budget, and MAC accounting.

Exits are a *model-level component*, not a conditioning method: ``wrap(backbone, method,
exits="auto")`` adds them to a model of any method (``"multiexit"`` is the method that
conditions nothing and has exits by default). The heads are attached to the backbone as the
child ``oat_exits`` *before* the method's surgery, so a method conditions them exactly as it
conditions the backbone (dual norms, FiLM, weight noise, masks) and folds them on export.
The router's state (thresholds, calibration statistics) lives in :class:`ExitRouter`, the
model's ``exits`` submodule, and is saved with the model. See ``docs/methods/multiexit.md``.

Segments are lists of *steps*: a submodule name of the backbone, or ``@name`` for one of the
backbone's own methods (ViT's ``_pos_embed``, timm's ``forward_head``).
They are names, not module references, so surgery and export (which replace submodules) never
leave them stale.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

logger = logging.getLogger(__name__)

EXITS_CHILD = "oat_exits"
"""Name of the child of the backbone that holds the exit heads (see the module docstring)."""

_PROBE_SIZE = 64
"""Side of the random probe image a CNN's split is verified on (a ViT uses its img_size)."""
_VERIFY_TOLERANCE = 1e-4

Narrow = Callable[[torch.Tensor], contextlib.AbstractContextManager]
"""Given the indices of the samples still running, a context in which the backbone serves
exactly those samples (a per-sample λ narrowed to them)."""


# -- where the exits go ----------------------------------------------------------------------
@dataclass
class ExitSpec:
    """What rebuilds the exits of a model (saved in its checkpoint).

    points: ``feature_info`` indices of the backbone after which an early exit sits.
    weights: loss weight of every exit, the backbone's own head last (``len(points) + 1``).
    """

    points: list[int]
    weights: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def exit_spec(backbone: nn.Module, exits: object, weights: object = None) -> ExitSpec:
    """Resolve ``exits`` (``'auto'``, a list of ``feature_info`` indices, or a saved
    :class:`ExitSpec` dictionary) and ``weights`` (None: all 1) for ``backbone``."""
    if isinstance(exits, dict):
        return exit_spec(backbone, exits.get("points"), exits.get("weights"))
    stages = _feature_info(backbone)
    points = auto_points(stages) if exits == "auto" else _check_points(exits, len(stages))
    n = len(points) + 1
    if weights is None:
        weights = [1.0] * n
    if (not isinstance(weights, (list, tuple)) or len(weights) != n
            or not all(isinstance(w, (int, float)) and w >= 0 for w in weights)):
        raise ValueError(f"exit_weights must be {n} non-negative numbers (one per early exit "
                         f"and one for the backbone's head), got {weights!r}")
    return ExitSpec(points, [float(w) for w in weights])


def _feature_info(backbone: nn.Module) -> list[dict[str, Any]]:
    info = getattr(backbone, "feature_info", None)
    stages = [f for f in info or [] if isinstance(f, dict) and "module" in f]
    if len(stages) < 2:
        raise ValueError(f"exits need a timm backbone whose feature_info lists at least two "
                         f"stages; {type(backbone).__name__} lists {len(stages)}")
    return stages


def auto_points(stages: list[dict[str, Any]]) -> list[int]:
    """The default exits: after every stage but the last, the stem (a first entry at
    reduction 2) left out. When every entry has the same reduction (a ViT lists each block as
    a stage), three exits at a quarter, half and three quarters of the depth instead."""
    n = len(stages)
    if len({f["reduction"] for f in stages}) == 1:
        return sorted({min(max(round(n * k / 4) - 1, 0), n - 2) for k in (1, 2, 3)})
    first = 1 if stages[0]["reduction"] <= 2 and n > 2 else 0
    return list(range(first, n - 1))


def _check_points(exits: object, n: int) -> list[int]:
    if (not isinstance(exits, (list, tuple)) or not exits
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in exits)):
        raise ValueError(f"exits must be 'auto' or a non-empty list of feature_info indices, "
                         f"got {exits!r}")
    points = sorted(set(exits))
    if points[0] < 0 or points[-1] > n - 2:
        raise ValueError(f"exit indices must be feature_info indices in [0, {n - 2}] (the last "
                         f"stage, {n - 1}, is followed by the backbone's own head); got "
                         f"{list(exits)}")
    return points


# -- the split into segments -------------------------------------------------------------------
def run_steps(backbone: nn.Module, steps: Sequence[str], h: torch.Tensor) -> torch.Tensor:
    """Run ``steps`` of ``backbone`` (submodule names or ``@method``) in order on ``h``."""
    for step in steps:
        h = getattr(backbone, step[1:])(h) if step[0] == "@" else backbone.get_submodule(step)(h)
    return h


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode inside the block (no running statistics updated); the modes restored."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _candidate_chains(backbone: nn.Module, stages: list[dict[str, Any]]
                      ) -> Iterator[tuple[list[str], list[str]]]:
    """(chain, optional tail) pairs: ``chain`` plus some prefix of ``tail`` may reproduce
    ``forward_features``. Sequential CNNs: the children, a Sequential child flattened when
    stages are inside it (``stages.0``, ...); ViT-style models: embedding, blocks, norm."""
    points = {f["module"] for f in stages}
    children = []
    for name, child in backbone.named_children():
        inside = any(p.startswith(name + ".") for p in points)
        children += ([f"{name}.{c}" for c, _ in child.named_children()]
                     if inside and isinstance(child, nn.Sequential) else [name])
    last = stages[-1]["module"]
    if last in children:
        end = children.index(last) + 1
        yield children[:end], children[end:]
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, nn.Sequential) and all(
            hasattr(backbone, a) for a in ("patch_embed", "_pos_embed", "norm")):
        embed = ["patch_embed", "@_pos_embed"] + [
            name for name in ("patch_drop", "norm_pre") if hasattr(backbone, name)]
        yield embed + [f"blocks.{i}" for i in range(len(blocks))] + ["norm"], []


@torch.no_grad()
def split_backbone(backbone: nn.Module, points: Sequence[int]
                   ) -> tuple[list[list[str]], list[torch.Size]]:
    """The backbone as ``len(points) + 1`` segments (the last ends with ``@forward_head``),
    verified on a random probe to reproduce ``backbone(x)``, and the shape of the features at
    each exit. Raises ``ValueError`` when the backbone cannot be split this way."""
    stages = _feature_info(backbone)
    probe = torch.rand(1, *_probe_shape(backbone), generator=torch.Generator().manual_seed(0))
    param = next(backbone.parameters())
    probe = probe.to(device=param.device, dtype=param.dtype)
    with _eval_mode(backbone):
        expected = backbone.forward_features(probe)
        chain = next((c for c in (_verified(backbone, chain, tail, probe, expected)
                                  for chain, tail in _candidate_chains(backbone, stages))
                      if c is not None), None)
        if chain is None:
            raise ValueError(
                f"cannot split {type(backbone).__name__} into stage segments: running its "
                "children in sequence does not reproduce forward_features (its forward is not "
                "a chain of stages). Exits support sequential CNNs (ResNet, ConvNeXt, ByobNet, "
                "EfficientNet, ...) and ViT-style models (patch_embed, blocks, norm)")
        segments = _cut(chain, [stages[i]["module"] for i in points], backbone)
        shapes, h = [], probe
        for steps in segments[:-1]:
            h = run_steps(backbone, steps, h)
            shapes.append(h.shape)
        out = run_steps(backbone, segments[-1], h)
        torch.testing.assert_close(out, backbone(probe), rtol=_VERIFY_TOLERANCE,
                                   atol=_VERIFY_TOLERANCE)
    return segments, shapes


def _verified(backbone: nn.Module, chain: list[str], tail: list[str], probe: torch.Tensor,
              expected: torch.Tensor) -> list[str] | None:
    """``chain`` extended by the shortest prefix of ``tail`` that reproduces ``expected``."""
    try:
        h = run_steps(backbone, chain, probe)
    except (RuntimeError, TypeError, ValueError):
        return None
    for k in range(len(tail) + 1):
        if h.shape == expected.shape and torch.allclose(h, expected, rtol=_VERIFY_TOLERANCE,
                                                        atol=_VERIFY_TOLERANCE):
            return chain + tail[:k]
        if k < len(tail):
            try:
                h = run_steps(backbone, tail[k:k + 1], h)
            except (RuntimeError, TypeError, ValueError):
                return None
    return None


def _cut(chain: list[str], after: list[str], backbone: nn.Module) -> list[list[str]]:
    missing = [name for name in after if name not in chain]
    if missing:
        raise ValueError(f"cannot put an exit after {missing} of {type(backbone).__name__}: "
                         "not a step of its stage chain; choose other feature_info indices")
    cuts = [chain.index(name) + 1 for name in after]
    bounds = [0, *cuts, len(chain)]
    return [chain[a:b] for a, b in zip(bounds, bounds[1:], strict=False)][:-1] + [
        chain[cuts[-1]:] + ["@forward_head"]]


def _probe_shape(backbone: nn.Module) -> tuple[int, int, int]:
    from .checkpoint import in_chans_of  # checkpoint imports methods, which import this

    img = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
    height, width = (img if img is not None else (_PROBE_SIZE, _PROBE_SIZE))
    return in_chans_of(backbone) or 3, int(height), int(width)


# -- heads --------------------------------------------------------------------------------------
def build_heads(backbone: nn.Module, spec: ExitSpec, shapes: Sequence[torch.Size]
                ) -> nn.ModuleList:
    """One head per early exit, sized by depth as in the RDI-Nets reference: early (first
    third of the stages) MaxPool → conv5×5+BN+ReLU → MaxPool → conv3×3+BN → AvgPool → Linear;
    middle: one residual block + AvgPool + Linear; late: AvgPool + Linear. Token features (a
    ViT's (N, L, D)) are mean-pooled by the router and get LayerNorm → Linear."""
    stages = _feature_info(backbone)
    first = 1 if stages[0]["reduction"] <= 2 and len(stages) > 2 else 0  # not the stem
    classes = backbone.num_classes
    heads = []
    for point, shape in zip(spec.points, shapes, strict=True):
        depth = (point - first + 1) / (len(stages) - first)
        heads.append(_head(shape, stages[point]["num_chs"], classes, depth, backbone))
    param = next(backbone.parameters())
    return nn.ModuleList(heads).to(device=param.device, dtype=param.dtype)


def _head(shape: torch.Size, channels: int, classes: int, depth: float,
          backbone: nn.Module) -> nn.Module:
    if len(shape) == 3 and shape[-1] == channels:
        return nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, classes))
    if len(shape) != 4 or shape[1] != channels:
        raise ValueError(f"cannot put an exit on features of shape {tuple(shape)} from "
                         f"{type(backbone).__name__}: exits take (N, C, H, W) or (N, L, C) "
                         "token features")
    pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, classes)]
    if depth <= 1 / 3:
        return nn.Sequential(
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(channels, channels, 5, padding=2, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            *pool)
    if depth <= 2 / 3:
        return nn.Sequential(BasicBlock(channels, channels), *pool)
    return nn.Sequential(*pool)


def head_logits(head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """An exit's logits from the features at its point (token features mean-pooled)."""
    return head(h.mean(1) if h.dim() == 3 else h)


# -- running and routing ------------------------------------------------------------------------
def all_exit_logits(backbone: nn.Module, heads: nn.ModuleList, segments: list[list[str]],
                    x: torch.Tensor) -> list[torch.Tensor]:
    """Every exit's (N, classes) logits on every sample, the backbone's own head last."""
    outputs, h = [], x
    for k, steps in enumerate(segments):
        h = run_steps(backbone, steps, h)
        outputs.append(head_logits(heads[k], h) if k < len(heads) else h)
    return outputs


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Softmax entropy (nats) of each row, in float32."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1)


def route(exit_logits: Sequence[torch.Tensor], thresholds: torch.Tensor) -> torch.Tensor:
    """(N,) index of the first exit whose entropy is below its threshold (the last if none)."""
    return first_below(torch.stack([entropy(t) for t in exit_logits[:-1]], dim=1),
                       thresholds[:-1])


def first_below(entropies: torch.Tensor, thresholds: object) -> torch.Tensor:
    """(N,) index of the first of the early exits' (N, E-1) ``entropies`` below its threshold
    (a scalar threshold applies to every early exit), E-1 (the backbone's head) if none."""
    t = torch.as_tensor(thresholds, dtype=torch.float32, device=entropies.device)
    below = entropies < t.expand(entropies.shape[1])
    return torch.where(below.any(1), below.float().argmax(1), entropies.shape[1])


def adaptive_logits(backbone: nn.Module, heads: nn.ModuleList, segments: list[list[str]],
                    thresholds: torch.Tensor, x: torch.Tensor,
                    narrow: Narrow | None = None) -> torch.Tensor:
    """Input-adaptive inference with early stopping: each sample leaves at the first exit
    whose entropy is below its threshold, and only the samples still running go through the
    next segment (a head whose threshold is -inf is not evaluated). Differentiable w.r.t.
    ``x``: each output row is the logits of the exit that sample left at."""
    narrow = narrow or (lambda _: contextlib.nullcontext())
    active = torch.arange(x.shape[0], device=x.device)
    out: torch.Tensor | None = None
    h, last = x, len(segments) - 1
    for k, steps in enumerate(segments):
        with narrow(active):
            h = run_steps(backbone, steps, h)
            if k < last and not bool(torch.isneginf(thresholds[k])):
                logits = head_logits(heads[k], h)
                leave = entropy(logits) < thresholds[k].to(h.device)
            elif k == last:
                logits, leave = h, torch.ones_like(active, dtype=torch.bool)
            else:
                continue
        if out is None:
            out = logits.new_zeros(x.shape[0], logits.shape[1])
        out = out.index_copy(0, active[leave], logits[leave])
        active, h = active[~leave], h[~leave]
        if active.numel() == 0:
            break
    return out


# -- the router's state -------------------------------------------------------------------------
class ExitRouter(nn.Module):
    """The thresholds of an entropy router (a buffer: early exits -inf, i.e. never taken,
    until calibrated; the last +inf) and the calibration statistics they are picked from
    (extra state: the early exits' entropies on the calibration data, its image size and the
    MACs of each segment and head there), so :meth:`set_budget` re-picks thresholds in situ.
    """

    def __init__(self, spec: ExitSpec, segments: list[list[str]]) -> None:
        super().__init__()
        self.spec = spec
        self.segments = segments
        thresholds = torch.full((len(spec.points) + 1,), float("-inf"))
        thresholds[-1] = float("inf")
        self.register_buffer("thresholds", thresholds)
        self.calibration: dict[str, Any] | None = None
        self._macs: dict[tuple[int, ...], MacTable] = {}

    @property
    def n_exits(self) -> int:
        return len(self.spec.points) + 1

    def get_extra_state(self) -> dict[str, Any]:
        return {"calibration": self.calibration}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.calibration = state.get("calibration")

    def set_thresholds(self, values: Sequence[float] | torch.Tensor) -> None:
        """Set the early exits' thresholds (the last stays +inf)."""
        values = torch.as_tensor(values, dtype=torch.float32).flatten()
        if values.numel() not in (self.n_exits - 1, self.n_exits):
            raise ValueError(f"expected {self.n_exits - 1} thresholds (one per early exit), "
                             f"got {values.numel()}")
        self.thresholds[: self.n_exits - 1] = values[: self.n_exits - 1].to(self.thresholds)

    def set_budget(self, budget: float) -> dict[str, Any]:
        """Thresholds giving the most accurate routing (the latest exits) whose mean MACs on
        the calibration data are at most ``budget`` × the backbone's; one entropy threshold
        for every early exit. Returns the thresholds, the mean MAC fraction and the exit
        shares on the calibration data."""
        cal = self._require_calibration()
        if not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget <= 0:
            raise ValueError(f"the exit budget is a fraction of the backbone's MACs > 0, got "
                             f"{budget!r}")
        table = MacTable(**cal["macs"])

        def fraction(t: float) -> float:
            return table.mean_fraction(first_below(cal["entropies"], t), t)

        chosen = _smallest_within(_threshold_candidates(cal["entropies"]), fraction, budget)
        self.set_thresholds([chosen] * (self.n_exits - 1))
        return self.summary()

    def set_shares(self, shares: Sequence[float]) -> dict[str, Any]:
        """Per-exit thresholds so that exit i takes the share ``shares[i]`` of the calibration
        samples (sequential quantiles of the entropy among the samples still running;
        thresholds half-way between neighbouring entropies)."""
        cal = self._require_calibration()
        shares = _check_shares(shares, self.n_exits)
        ent = cal["entropies"]
        remaining = torch.ones(ent.shape[0], dtype=torch.bool)
        thresholds = []
        for i, share in enumerate(shares[:-1]):
            values = ent[remaining, i].sort().values
            k = min(round(share * ent.shape[0]), values.numel())
            t = _between(values, k)
            thresholds.append(t)
            remaining &= ~(ent[:, i] < t)
        self.set_thresholds(thresholds)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        cal = self._require_calibration()
        exits = first_below(cal["entropies"], self.thresholds[:-1])
        table = MacTable(**cal["macs"])
        return {"thresholds": self.thresholds.tolist(),
                "mean_fraction": table.mean_fraction(exits, self.thresholds[:-1]),
                "exit_shares": _shares(exits, self.n_exits),
                "calibration_size": [len(exits), *cal["input_size"]]}

    def _require_calibration(self) -> dict[str, Any]:
        if self.calibration is None:
            raise ValueError("the exits are not calibrated: call model.calibrate(held_out_data, "
                             "budget=...) first (held-out data, never the test split)")
        return self.calibration


def _smallest_within(candidates: list[float], fraction: Callable[[float], float],
                     budget: float) -> float:
    """The smallest threshold among ascending ``candidates`` whose cost ``fraction`` is at
    most ``budget``. -inf evaluates no head (the backbone's cost, 1); above it every head is
    evaluated until a sample leaves, and the cost does not increase with the threshold, so
    the rest is a bisection."""
    if fraction(candidates[0]) <= budget:
        return candidates[0]
    lo, hi = 1, len(candidates) - 1
    if fraction(candidates[hi]) > budget:
        raise ValueError(f"budget {budget:g} is below the cheapest routing on the calibration "
                         f"data ({fraction(candidates[hi]):.3f} of the backbone's MACs: every "
                         "sample at the first exit)")
    while lo < hi:
        mid = (lo + hi) // 2
        if fraction(candidates[mid]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return candidates[lo]


def _threshold_candidates(entropies: torch.Tensor) -> list[float]:
    """-inf (no early exit) and the midpoints between sorted distinct entropies, plus one
    above the largest (every sample at the first exit), ascending."""
    values = entropies.flatten().unique().sort().values
    mids = ((values[1:] + values[:-1]) / 2).tolist()
    return [float("-inf"), *mids, float(values[-1]) + 1.0]


def _between(values: torch.Tensor, k: int) -> float:
    """A threshold with exactly the ``k`` smallest of sorted ``values`` below it."""
    if k <= 0:
        return float("-inf")
    if k >= values.numel():
        return float(values[-1]) + 1.0
    return float((values[k - 1] + values[k]) / 2)


def _shares(exits: torch.Tensor, n: int) -> list[float]:
    return (torch.bincount(exits, minlength=n).float() / max(exits.numel(), 1)).tolist()


def _check_shares(shares: object, n: int) -> list[float]:
    if (not isinstance(shares, (list, tuple)) or len(shares) != n
            or not all(isinstance(s, (int, float)) and s >= 0 for s in shares)
            or abs(sum(shares) - 1) > 1e-6):
        raise ValueError(f"shares must be {n} non-negative fractions (one per exit, the "
                         f"backbone's head last) summing to 1, got {shares!r}")
    return [float(s) for s in shares]


# -- cost ---------------------------------------------------------------------------------------
@dataclass
class MacTable:
    """MACs per sample of each segment (the last includes the backbone's head) and of each
    early head, at one input size."""

    segments: list[int]
    heads: list[int]

    @property
    def backbone(self) -> int:
        return sum(self.segments)

    def per_exit(self, evaluated: Sequence[bool]) -> torch.Tensor:
        """(E,) MACs of a sample leaving at each exit: the segments up to it and every head
        ``evaluated`` on the way (a head whose threshold is -inf is skipped), rejected or
        taken."""
        heads = [m if e else 0 for m, e in zip(self.heads, evaluated, strict=True)]
        steps = torch.tensor(self.segments, dtype=torch.float64)
        steps[:-1] += torch.tensor(heads, dtype=torch.float64)
        return steps.cumsum(0)

    def mean_macs(self, exits: torch.Tensor, thresholds: object) -> float:
        """Mean MACs of samples leaving at ``exits`` under early-exit ``thresholds``."""
        t = torch.as_tensor(thresholds, dtype=torch.float32).expand(len(self.heads))
        per_exit = self.per_exit((~torch.isneginf(t)).tolist())
        return float(per_exit[exits.cpu()].mean())

    def mean_fraction(self, exits: torch.Tensor, thresholds: object) -> float:
        return self.mean_macs(exits, thresholds) / self.backbone


@torch.no_grad()
def measure_macs(backbone: nn.Module, heads: nn.ModuleList, segments: list[list[str]],
                 x: torch.Tensor) -> MacTable:
    """MACs (``torch.utils.flop_counter`` FLOPs / 2: convolutions, matmuls, attention) per
    sample of each segment and each early head, measured on one sample of ``x``'s size."""
    h = x[:1]
    seg_macs, head_macs = [], []
    with _eval_mode(backbone), _eval_mode(heads):
        for k, steps in enumerate(segments):
            h, macs = _counted(lambda t, s=steps: run_steps(backbone, s, t), h)
            seg_macs.append(macs)
            if k < len(heads):
                head_macs.append(_counted(lambda t, k=k: head_logits(heads[k], t), h)[1])
    return MacTable(seg_macs, head_macs)


def _counted(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
             ) -> tuple[torch.Tensor, int]:
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn(x)
    return out, counter.get_total_flops() // 2


def cost_summary(table: MacTable, exits: torch.Tensor, thresholds: torch.Tensor
                 ) -> dict[str, Any]:
    """What ``model.cost(x)`` returns for samples routed to ``exits``: mean MACs per sample
    (every segment run and every head evaluated, rejected ones included; a head whose
    threshold is -inf is skipped, as the early-stopping forward skips it), the backbone's
    MACs, their ratio, each exit's share and the MAC table."""
    mean = table.mean_macs(exits, thresholds[:-1])
    return {"mean_macs": mean, "backbone_macs": table.backbone,
            "fraction": mean / table.backbone,
            "exit_shares": _shares(exits.cpu(), len(table.segments)),
            "segment_macs": list(table.segments), "head_macs": list(table.heads)}


# -- calibration data ---------------------------------------------------------------------------
def calibration_batches(data: Dataset | DataLoader | Iterable, batch_size: int = 256
                        ) -> Iterator[torch.Tensor]:
    """Image batches of ``data``: a Dataset of (image, label) (batched here) or a DataLoader
    / iterable of (images, labels) batches. Refuses a dataset that says it is a test split
    (torchvision's ``train=False``, ``split='test'``): thresholds fitted on the test set,
    as in the reference code, bias every number measured on it."""
    if _is_test_split(data):
        raise ValueError("calibrate the exits on held-out data (e.g. a part of the training "
                         "set kept out of training), never on the test split: it is what the "
                         "accuracy and cost are then measured on")
    loader = DataLoader(data, batch_size=batch_size) if isinstance(data, Dataset) else data
    for batch in loader:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("calibration data must yield (images, labels) with images of "
                             "shape (N, C, H, W) in [0, 1]")
        yield images


def _is_test_split(data: object) -> bool:
    seen = 0
    while data is not None and seen < 8:  # DataLoader → Subset → ... → the dataset
        if getattr(data, "train", None) is False or getattr(data, "split", None) in (
                "test", "val"):
            return True
        data = getattr(data, "dataset", None)
        seen += 1
    return False


# -- the exported model -------------------------------------------------------------------------
class MultiExitNet(nn.Module):
    """A plain multi-exit model: what ``ConditionalModel.export(λ)`` gives for a model with
    exits (its conditioning folded). ``forward`` is input-adaptive inference with early
    stopping on normalised inputs (``export`` puts the normaliser in front, as for every
    model); :meth:`exit_logits` and :meth:`route` as on the conditional model."""

    def __init__(self, backbone: nn.Module, heads: nn.ModuleList, segments: list[list[str]],
                 thresholds: torch.Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.segments = segments
        self.register_buffer("thresholds", thresholds.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adaptive_logits(self.backbone, self.heads, self.segments, self.thresholds, x)

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        return all_exit_logits(self.backbone, self.heads, self.segments, x)

    def route(self, exit_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        return route(exit_logits, self.thresholds)


def attach_exits(backbone: nn.Module, exits: object, weights: object = None
                 ) -> ExitRouter | None:
    """Add exit heads to ``backbone`` (the child ``oat_exits``, so that the method's surgery
    conditions them too) and return the router, or None when ``exits`` is None."""
    if exits is None:
        if weights is not None:
            raise ValueError("exit_weights needs exits (exits='auto' or feature_info indices)")
        return None
    if hasattr(backbone, EXITS_CHILD):
        raise ValueError(f"this backbone already has a child named {EXITS_CHILD!r}")
    spec = exit_spec(backbone, exits, weights)
    segments, shapes = split_backbone(backbone, spec.points)
    backbone.add_module(EXITS_CHILD, build_heads(backbone, spec, shapes))
    return ExitRouter(spec, segments)


def export_exits(router: ExitRouter, folded: nn.Module, keep: bool) -> nn.Module:
    """From the folded copy of a backbone with exit heads: the plain backbone (``keep``
    False) or a :class:`MultiExitNet` with the router's current thresholds."""
    heads = folded.get_submodule(EXITS_CHILD)
    delattr(folded, EXITS_CHILD)
    if not keep:
        return folded
    return MultiExitNet(folded, heads, router.segments, router.thresholds)


# -- training -----------------------------------------------------------------------------------
def exit_sum_loss(loss_of: Callable[[Any], tuple[torch.Tensor, dict[str, float]]], ctx: Any,
                  weights: Sequence[float]) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ_i w_i · (the method's loss with exit i's logits as the model's output): one training
    forward returns every exit's logits, and the method's loss hook (e.g. OAT's, FLOAT's, or
    RDI-Nets' 0.5·CE clean + 0.5·CE adversarial for ``multiexit``) sees each exit in turn.
    The statistics are those of the backbone's own head."""
    memo: dict[str, Any] = {}

    def forward_of(i: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def forward(inputs: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
            if "outputs" not in memo:
                memo.update(inputs=inputs, outputs=ctx.forward(inputs, lam))
            elif not torch.equal(inputs, memo["inputs"]):
                raise RuntimeError("a loss hook that runs the training forward on different "
                                   "inputs per call cannot be summed over exits")
            return memo["outputs"][i]
        return forward

    total, stats = None, {}
    for i, weight in enumerate(weights):
        loss, stats = loss_of(replace(ctx, forward=forward_of(i)))
        total = weight * loss if total is None else total + weight * loss
    return total, stats


# -- the model's API ----------------------------------------------------------------------------
class MultiExitAPI:
    """The multi-exit part of :class:`~oat_plugins.ConditionalModel` (a mixin; every method
    raises a clear error on a model without exits)."""

    exits: ExitRouter | None

    def _router(self) -> ExitRouter:
        if self.exits is None:
            raise ValueError("this model has no exits; wrap with exits='auto' (or a list of "
                             "feature_info indices), or method='multiexit'")
        return self.exits

    @property
    def exit_heads(self) -> nn.ModuleList:
        """The early exits' heads (conditioned like the backbone)."""
        self._router()
        return self.backbone.get_submodule(EXITS_CHILD)

    def exits_report(self) -> list[str]:
        """Lines for ``model.summary()``: where the exits are, their heads and thresholds."""
        if self.exits is None:
            return []
        spec, router = self.exits.spec, self.exits
        stages = _feature_info(self.backbone)
        heads = [f"after {stages[p]['module']} ({sum(q.numel() for q in h.parameters()):,} "
                 f"parameters)" for p, h in zip(spec.points, self.exit_heads, strict=True)]
        state = ("thresholds " + ", ".join(f"{t:.3g}" for t in router.thresholds.tolist())
                 if router.calibration is not None else "not calibrated (no early exit)")
        return [f"  {len(heads)} early exits: " + "; ".join(heads), f"  router: {state}"]

    @property
    def exit_thresholds(self) -> torch.Tensor:
        """(E,) entropy thresholds of the router (early exits -inf until calibrated, the last
        +inf)."""
        return self._router().thresholds

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's (N, classes) logits for images ``x`` in [0, 1] at the current λ, the
        backbone's own head last: no routing, no early stopping, differentiable w.r.t. x."""
        router = self._router()
        return self._run(lambda t: all_exit_logits(self.backbone, self.exit_heads,
                                                   router.segments, t), self.prepare_inputs(x))

    def route(self, exit_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """(N,) index of the exit the router picks for each sample from :meth:`exit_logits`:
        the first whose softmax entropy is below its threshold, else the last."""
        return route(exit_logits, self._router().thresholds)

    def adaptive_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Input-adaptive logits of normalised ``x`` with early stopping (``model(x)``)."""
        router = self._router()
        lam = self.condition.lam
        narrow = None if self.condition.is_scalar else (
            lambda idx: self.condition.at(lam[idx.to(lam.device)], validate=False))
        return adaptive_logits(self.backbone, self.exit_heads, router.segments,
                               router.thresholds, x, narrow)

    @torch.no_grad()
    def calibrate(self, data: Dataset | DataLoader | Iterable, *, budget: float | None = None,
                  shares: Sequence[float] | None = None, batch_size: int = 256
                  ) -> dict[str, Any]:
        """Fit the router's thresholds on held-out ``data`` (a Dataset of (image, label), or
        a DataLoader of batches; never the test split) at the current scalar λ, to a target
        mean MAC ``budget`` (a fraction of the backbone's MACs, heads evaluated and rejected
        included) or to per-exit ``shares`` of the samples. The early exits' entropies and the
        MAC table are kept in the model (and its checkpoint) for :meth:`set_exit_budget`.
        Returns the thresholds, the mean MAC fraction and each exit's share on ``data``."""
        router = self._router()
        if (budget is None) == (shares is None):
            raise ValueError("calibrate needs exactly one of budget= (a fraction of the "
                             "backbone's MACs) or shares= (one fraction per exit)")
        if not self.condition.is_scalar:
            raise ValueError("calibrate at one scalar λ (model.at(λ)), not a per-sample λ")
        device = next(self.parameters()).device
        entropies, size = [], None
        with _eval_mode(self):
            for images in calibration_batches(data, batch_size):
                logits = self.exit_logits(images.to(device))
                entropies.append(torch.stack([entropy(t) for t in logits[:-1]], 1).cpu())
                size = tuple(images.shape[1:])
        if size is None:
            raise ValueError("the calibration data is empty")
        router.calibration = {"entropies": torch.cat(entropies), "input_size": list(size),
                              "macs": asdict(self.mac_table(size))}
        summary = router.set_budget(budget) if budget is not None else router.set_shares(shares)
        logger.info("exits calibrated on %d samples: thresholds %s, mean MACs %.3f of the "
                    "backbone's, exit shares %s", len(router.calibration["entropies"]),
                    summary["thresholds"], summary["mean_fraction"], summary["exit_shares"])
        return summary

    def set_exit_budget(self, budget: float) -> dict[str, Any]:
        """Re-pick the thresholds for a mean MAC ``budget`` (fraction of the backbone's) from
        the calibration statistics kept in the model: compute as a knob, like λ. Returns what
        :meth:`calibrate` returns."""
        return self._router().set_budget(budget)

    def mac_table(self, input_size: Sequence[int]) -> MacTable:
        """MACs per sample of each segment and head for images of ``input_size`` (C, H, W)."""
        router = self._router()
        key = tuple(int(s) for s in input_size)
        if key not in router._macs:
            param = next(self.parameters())
            x = torch.rand(1, *key, device=param.device, dtype=param.dtype)
            with self.at(self.lam if self.condition.is_scalar else 0.0):
                router._macs[key] = measure_macs(self.backbone, self.exit_heads,
                                                 router.segments, self.normalize(x))
        return router._macs[key]

    @torch.no_grad()
    def cost(self, x: torch.Tensor) -> dict[str, Any]:
        """Compute of input-adaptive inference on images ``x`` at the current λ and
        thresholds: ``mean_macs`` per sample (segments run and every head evaluated, rejected
        ones included), ``backbone_macs``, their ratio ``fraction``, ``exit_shares`` and the
        per-segment and per-head MACs (``torch.utils.flop_counter``)."""
        router = self._router()
        exits = self.route(self.exit_logits(x))
        return cost_summary(self.mac_table(x.shape[1:]), exits, router.thresholds)
