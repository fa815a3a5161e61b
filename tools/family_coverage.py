"""Which timm architecture families every oat-plugins method handles, tried as a new user would.

One model per family (a family is a timm model module, e.g. ``timm.models.resnet``): the one
with the fewest parameters among ``timm.list_models(module=...)``, built with
``num_classes=10``, no pretrained weights, at the smallest input it runs on (32×32 first; ViT-like
models get ``img_size``). For every registered method (``oat_plugins.available_methods()``) each
case must:

1. **wrap**: ``oat_plugins.wrap(backbone, method, model_kwargs=...)``;
2. **train**: one SGD step (forward + backward, gradient norm clipped to 1) at a mixed
   per-sample λ (0, 1, 0.5, 0, ...);
3. **export**: after perturbing the conditioned parameters (so λ changes the output),
   ``model.export(λ)`` equals the model within 1e-4 (times the largest logit where that
   exceeds 1) at λ = 0 and λ = 1, queried first with autograd on as an attack would;
4. **roundtrip**: ``oat_plugins.load(oat_plugins.save(...))`` gives exactly the same output.

Usage::

    python tools/family_coverage.py [--methods film,float] [--families resnet,nfnet]
        [--limit N] [--timeout 180] [--json OUT.json] [--markdown OUT.md]

Prints one row per family, the share of families that pass per method, and each failure with
its stage and a one-line reason. Runs single-threaded (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import timm

import oat_plugins  # noqa: E402
from oat_plugins._io import atomic_write_text  # noqa: E402
from oat_plugins.layers.base import ConditionedModule, FoldableParametrization  # noqa: E402

SIZES = (32, 64, 96, 128, 160, 192, 224)
"""Input sizes tried, smallest first, until the plain model runs."""
BATCH = 6
TOLERANCE = 1e-4
GRAD_CLIP = 1.0
"""Global gradient norm of the training step (as ``fit(grad_clip=...)``)."""
STAGES = ("build", "wrap", "train", "export", "roundtrip")


class CaseTimeout(Exception):
    """A case ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`CaseTimeout` in the main thread after ``seconds`` (POSIX alarm)."""
    def _raise(*_: object) -> None:
        raise CaseTimeout(f"over the {seconds:.0f} s time limit")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Create parameters and buffers on the meta device (no memory, no init cost) while the
    rest of a model's constructor runs on the CPU (timm calls ``.item()`` on schedules)."""
    register_parameter = nn.Module.register_parameter
    register_buffer = nn.Module.register_buffer

    def _param(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def _buffer(module: nn.Module, name: str, tensor: torch.Tensor | None,
                persistent: bool = True) -> None:
        register_buffer(module, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = _param, _buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = (register_parameter,
                                                                   register_buffer)


def parameter_count(name: str) -> int | None:
    """Parameters of timm's ``name`` at ``num_classes=10`` (None if it cannot be built): on
    the meta device, else (a constructor that runs a probe forward, like the hybrid ViTs'
    CNN embedding) on the CPU."""
    for on_meta in (True, False):
        try:
            with warnings.catch_warnings(), (meta_parameters() if on_meta
                                             else contextlib.nullcontext()):
                warnings.simplefilter("ignore")
                model = timm.create_model(name, num_classes=10)
            return sum(p.numel() for p in model.parameters())
        except Exception:  # noqa: BLE001 - a model that does not build is not a candidate
            continue
    return None


def smallest_model(module: str) -> tuple[str, int] | None:
    """(name, parameter count) of the smallest model of a timm model module."""
    counts = [(parameter_count(n), n) for n in timm.list_models(module=module)]
    counts = [(c, n) for c, n in counts if c is not None]
    if not counts:
        return None
    count, name = min(counts)
    return name, count


def create(name: str, kwargs: dict[str, Any]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, num_classes=10, pretrained=False, **kwargs)


def runs(model: nn.Module, size: int) -> bool:
    """Whether ``model`` maps two ``size``×``size`` images to 10 finite logits (Swin V2 at 32×32
    gives NaN: its last stage's 1×1 window normalises relative coordinates by window - 1)."""
    try:
        with torch.no_grad():
            logits = model.eval()(torch.rand(2, 3, size, size))
            return logits.shape == (2, 10) and bool(torch.isfinite(logits).all())
    except Exception:  # noqa: BLE001 - too small an input, for instance
        return False


def input_config(name: str) -> tuple[dict[str, Any], int, nn.Module]:
    """(extra ``create_model`` kwargs, input size, the model built with them) for the smallest
    input the model runs on: ``img_size=size`` where the model takes it (ViT-like), else the
    default model at that size."""
    cfg = timm.get_pretrained_cfg(name)
    default = int(cfg.input_size[-1]) if cfg is not None else 224
    plain = create(name, {})
    takes_img_size = True
    for size in sorted({s for s in SIZES if s <= default} | {default}):
        if takes_img_size and size != default:
            try:
                model = create(name, {"img_size": size})
                if runs(model, size):
                    return {"img_size": size}, size, model
            except TypeError:  # no img_size argument
                takes_img_size = False
            except Exception:  # noqa: BLE001 - e.g. a window size that does not divide it
                pass
        if runs(plain, size):
            return {}, size, plain
    raise RuntimeError(f"runs on no input size up to {default}")


def git_commit() -> str:
    """Short commit of the code under test, with ``+dirty`` for uncommitted changes to tracked
    files (each row records it: ``--update`` mixes rows of several runs)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def one_line(err: BaseException | None) -> str:
    if err is None:
        return ""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:240]}"


def perturb(model: nn.Module, scale: float = 0.05) -> None:
    """Move every parameter and statistic of the conditioned modules away from its initial
    value, so that λ really changes the output (a fresh identity-init model would make the
    export check trivial). Convolutions (a conditioned module may hold the backbone's conv)
    stay as initialised to keep logits in a sane range for the float32 tolerance."""
    g = torch.Generator().manual_seed(1)
    owners = [m for m in model.modules()
              if isinstance(m, (ConditionedModule, FoldableParametrization))]
    convs = {id(p) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)
             for p in m.parameters(recurse=False)}
    seen: set[int] = set(convs)
    with torch.no_grad():
        for owner in owners:
            for p in owner.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    p.add_(scale * (p.abs().mean() + 1) * torch.randn(p.shape, generator=g))
            for name, b in owner.named_buffers():
                if id(b) in seen or not b.is_floating_point():
                    continue
                seen.add(id(b))
                if name.endswith("running_var"):
                    b.mul_(1 + 0.5 * torch.rand(b.shape, generator=g))
                elif name.endswith("running_mean"):
                    b.add_(scale * torch.randn(b.shape, generator=g))


def mixed_lambda(n: int) -> torch.Tensor:
    """λ = 0, 1, 0.5, 0, 1, 0.5, ...: every value twice in a batch of 6, so a method that runs
    one forward per λ value never trains a norm on a single sample."""
    return torch.tensor([(0.0, 1.0, 0.5)[i % 3] for i in range(n)])


def run_case(base: nn.Module, kwargs: dict[str, Any], size: int, method: str,
             workdir: Path) -> tuple[str, str]:
    """(stage reached, failure reason or '') of one method on a copy of the model ``base``."""
    stage = "wrap"
    name = base.pretrained_cfg["architecture"]
    try:
        torch.manual_seed(0)
        model = oat_plugins.wrap(copy.deepcopy(base), method, model_kwargs=kwargs or None)

        stage = "train"
        x = torch.rand(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
        y = torch.arange(BATCH) % 10
        model.train().set_lambda(mixed_lambda(BATCH))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if not torch.isfinite(loss):
            return stage, f"loss is {float(loss)}"
        # BN over two samples at 1×1 spatial (32×32 input, one λ per pair) gives the plain
        # timm backbone gradients of 1e4 to 1e7 (DLA, HardCoRe-NAS, DenseNet, ResNetV2,
        # ReXNet): unclipped, one step at lr 1e-3 makes it NaN before any export
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()

        stage = "export"
        perturb(model)
        model.eval()
        outputs = {}
        for lam in (0.0, 1.0):
            model.set_lambda(lam)
            # with autograd on, as an attack queries the model (fills timm's eval caches)
            outputs[lam] = model(x).detach()
            if not torch.isfinite(outputs[lam]).all():
                return stage, f"the model's own output at λ={lam} is not finite"
            with torch.no_grad():
                exported = model.export(lam).eval()
                diff = float((exported(x) - outputs[lam]).abs().max())
            # float32: relative to the logits where a random deep net's exceed 1 (DLA: 1e20)
            bound = TOLERANCE * max(1.0, float(outputs[lam].abs().max()))
            if not diff <= bound:
                return stage, f"export at λ={lam} differs by {diff:.3g} (> {bound:.3g})"
        if torch.equal(outputs[0.0], outputs[1.0]):
            return stage, "λ does not change the output after perturbing the conditioning"

        stage = "roundtrip"
        model.set_lambda(mixed_lambda(BATCH))
        path = workdir / f"{name}-{method}.pt"
        oat_plugins.save(model, path)
        loaded = oat_plugins.load(path)
        path.unlink()
        with torch.no_grad():
            if not torch.equal(loaded(x), model(x)):
                return stage, "reloaded model's output differs"
    except CaseTimeout as err:
        return stage, one_line(err)
    except Exception as err:  # noqa: BLE001 - every failure is reported, not raised
        logging.debug("%s/%s failed at %s:\n%s", name, method, stage, traceback.format_exc())
        return stage, one_line(err)
    return "ok", ""


def run_family(family: str, methods: list[str], timeout: float, workdir: Path,
               known: dict[str, Any] | None = None, commit: str = "unknown") -> dict[str, Any]:
    """Pick the family's model (or take ``known``: its row in an earlier run) and run every
    method on it."""
    row: dict[str, Any] = {"family": family, "model": None, "params": None, "size": None,
                           "kwargs": {}, "commit": commit, "results": {}}
    try:
        with time_limit(timeout):
            if known and known.get("size"):
                row.update({k: known[k] for k in ("model", "params", "size", "kwargs")})
                base = create(row["model"], row["kwargs"])
            else:
                chosen = smallest_model(family)
                if chosen is None:
                    raise RuntimeError("no model of this family builds")
                row["model"], row["params"] = chosen
                row["kwargs"], row["size"], base = input_config(row["model"])
    except Exception as err:  # noqa: BLE001 - reported as a build failure of every method
        reason = one_line(err)
        row["results"] = {m: {"ok": False, "stage": "build", "reason": reason, "seconds": 0.0}
                          for m in methods}
        return row
    for method in methods:
        start = time.perf_counter()
        with time_limit(timeout):
            stage, reason = run_case(base, row["kwargs"], row["size"], method, workdir)
        row["results"][method] = {"ok": stage == "ok", "stage": stage, "reason": reason,
                                  "seconds": round(time.perf_counter() - start, 1)}
    return row


def shares(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, dict[str, Any]]:
    """Per method: families passed / families it ran on (rows merged by ``--update`` from a
    run with other methods lack it), and how many it did not run on."""
    out = {}
    for method in methods:
        ran = [r["results"][method] for r in rows if method in r["results"]]
        passed = sum(res["ok"] for res in ran)
        out[method] = {"passed": passed, "total": len(ran), "not_run": len(rows) - len(ran),
                       "share": round(passed / max(len(ran), 1), 4)}
    return out


def cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "not run"
    verdict = "ok" if result["ok"] else f"FAIL ({result['stage']})"
    return f"{verdict} {result['seconds']:.0f}s"


def markdown(rows: list[dict[str, Any]], methods: list[str], meta: dict[str, Any]) -> str:
    """The report: table, share per method, failures."""
    lines = [
        "# timm family coverage",
        "",
        f"timm {meta['timm']}, torch {meta['torch']}, oat-plugins {meta['oat_plugins']}; "
        f"{len(rows)} families, one model each (fewest parameters), num_classes=10, "
        f"batch {BATCH}, one thread, {meta['timeout']:.0f} s per case. A case passes when the "
        "model wraps, trains one step (gradient norm clipped to "
        f"{GRAD_CLIP:g}) at a mixed per-sample λ, exports equal to the model "
        f"(≤ {TOLERANCE}, relative where logits exceed 1) at λ = 0 and 1 after perturbing the "
        "conditioning, and round-trips "
        "through save/load exactly. *commit*: the code each row ran at. "
        "Rerun: `python tools/family_coverage.py`.",
        "",
        "| family | model | params | input | commit | " + " | ".join(methods) + " |",
        "|---|---|---:|---:|---|" + "---|" * len(methods),
    ]
    for r in rows:
        cells = [cell(r["results"].get(m)) for m in methods]
        params = f"{r['params'] / 1e6:.2f}M" if r["params"] else "-"
        lines.append(f"| {r['family']} | {r['model'] or '-'} | {params} | "
                     f"{r['size'] or '-'} | {r.get('commit', 'unknown')} | "
                     + " | ".join(cells) + " |")
    lines += ["", "## Share of families per method", ""]
    for m, s in shares(rows, methods).items():
        not_run = f"; not run on {s['not_run']}" if s["not_run"] else ""
        lines.append(f"- {m}: {s['passed']}/{s['total']} ({100 * s['share']:.1f} %){not_run}")
    failures = [(r, m) for r in rows for m in methods
                if m in r["results"] and not r["results"][m]["ok"]]
    lines += ["", "## Failures", ""]
    lines += [f"- {r['family']} ({r['model']}) / {m} at {r['results'][m]['stage']}: "
              f"{r['results'][m]['reason']}" for r, m in failures] or ["none"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", help="comma-separated (default: every registered method)")
    parser.add_argument("--families", help="comma-separated timm model modules (default: all)")
    parser.add_argument("--limit", type=int, help="only the first N families")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds per case (and for choosing a family's model)")
    parser.add_argument("--models-from", type=Path,
                        help="reuse each family's model and input size from an earlier --json "
                             "output (skips choosing them)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--update", action="store_true",
                        help="keep the other families' rows of an existing --json file (and "
                             "its order); rerun only the families asked for")
    parser.add_argument("--markdown", type=Path, help="write the markdown report here")
    args = parser.parse_args(argv)
    known = oat_plugins.available_methods()
    args.methods = args.methods.split(",") if args.methods else known
    families = timm.list_modules()
    if args.families:
        wanted = args.families.split(",")
        unknown = sorted(set(wanted) - set(families))
        if unknown:
            parser.error(f"unknown families {unknown}; timm has: {', '.join(families)}")
        families = wanted
    unknown = sorted(set(args.methods) - set(known))
    if unknown:
        parser.error(f"unknown methods {unknown}; registered: {', '.join(known)}")
    args.families = families[: args.limit] if args.limit else families
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    meta = {"timm": timm.__version__, "torch": torch.__version__,
            "oat_plugins": oat_plugins.__version__, "commit": git_commit(),
            "timeout": args.timeout,
            "methods": args.methods}
    known = {}
    if args.models_from:
        known = {r["family"]: r for r in json.loads(args.models_from.read_text())["families"]}
    earlier = []
    if args.update and args.json and args.json.is_file():
        earlier = json.loads(args.json.read_text())["families"]
    rows: list[dict[str, Any]] = []
    # checkpoints of the round trip go to memory-backed storage where there is one
    scratch = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        for family in args.families:
            row = run_family(family, args.methods, args.timeout, Path(tmp), known.get(family),
                             meta["commit"])
            rows.append(row)
            status = "  ".join(f"{m}:{'ok' if res['ok'] else 'FAIL@' + res['stage']}"
                               for m, res in row["results"].items())
            print(f"{family:28s} {row['model'] or '-':32s} {status}", flush=True)
            write_reports(args, merged(earlier, rows), meta)  # a long run may be cut short
    report = markdown(merged(earlier, rows), args.methods, meta)
    print()
    print("## Share" + report.split("## Share", 1)[1])
    return 0


def merged(earlier: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``earlier`` rows with those of the families in ``rows`` replaced (new ones appended)."""
    new = {r["family"]: r for r in rows}
    out = [new.pop(r["family"], r) for r in earlier]
    return out + [r for r in rows if r["family"] in new]


def write_reports(args: argparse.Namespace, rows: list[dict[str, Any]],
                  meta: dict[str, Any]) -> None:
    if args.json:
        payload = {**meta, "shares": shares(rows, args.methods), "families": rows}
        atomic_write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", args.json)
    if args.markdown:
        atomic_write_text(markdown(rows, args.methods, meta), args.markdown)


if __name__ == "__main__":
    sys.exit(main())
