#!/usr/bin/env python
"""Stage A of the device bench (issues 11 and 12): every trade-off model trained at once, one
``bench/tradeoff.py`` process per model on one GPU, for as many epochs as the stage's time
allows, then swept with the same attack on the same test images.

1. Decode the data once (``tradeoff.load_data`` writes the uint8 caches the runs read).
2. Start every run with ``--plan``: each times a few training steps of its model (PGD-7)
   while the others do the same, writes ``calibration.json`` and waits.
3. Size one plan for all runs from the slowest: the strongest training attack of
   ``ATTACK_LADDER`` that affords ``--min-epochs`` epochs in the time left (less the sweep
   and a margin), else the rung with the most epochs; the cosine schedule spans exactly
   those epochs. Every run then trains, saves its model and sweeps λ.
4. After each run ends, and at the end, merge what has finished into ``--out``
   (``results.json``, ``tradeoff.md``, ``tradeoff.png``, ``status.json``). At the deadline
   the runs still going get SIGTERM (fit writes ``last.pt``), then SIGKILL.

    python bench/device/stage_a.py --data /tmp/cifar --out /tmp/res/stage_a --budget-s 300
    python bench/device/stage_a.py --data /tmp/cifar --out /tmp/s --budget-s 200 --device cpu \\
        --runs film,standard --max-epochs 1 -- --n-train 512 --n-examples 64 --steps 2  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

started = time.monotonic()  # the budget counts from here, imports included

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import tradeoff  # noqa: E402

from oat_plugins._io import atomic_write_text  # noqa: E402
from oat_plugins.evaluate import SweepResult  # noqa: E402

RUNS = ("film", "float:recipe=reference", "float:recipe=oat", "float:recipe=extremes",
        "floats:density=0.5", "smart", "standard", "pgd-at")
ATTACK_LADDER = (("pgd", 7), ("pgd", 3), ("fgsm-rs", 1))
CALIBRATION_ATTACK = ATTACK_LADDER[0]
SAFETY = 0.85  # share of the estimated time left that training may plan to use
SWEEP_FACTOR = 2.0  # sweep estimate from the step time: larger batches, clean passes
EXIT_S = 15.0  # between the deadline for the runs and the stage's end: stopping, merging
SAVE_S = 5.0  # a run's saving of its model and results after the sweep
EPOCH_OVERHEAD = (1.03, 1.0)  # per epoch: ×, + s (fit's clean evaluation, checkpoint)


def say(message: str) -> None:
    print(f"[stage_a +{time.monotonic() - started:5.1f}s] {message}", flush=True)


def slug(run: str) -> str:
    """The folder name tradeoff.py gives a run."""
    return run.replace(":", "-").replace("=", "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="extracted CIFAR-10 JPEG folder")
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="seconds from this script's start until everything is merged")
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", default=",".join(RUNS),
                   help="tradeoff.py methods (name[:key=value]) and baselines (standard, "
                   "pgd-at), one process each")
    p.add_argument("--min-epochs", type=int, default=5,
                   help="fewest epochs for which a stronger training attack is kept")
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--calibrate-steps", type=int, default=20)
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    p.add_argument("extra", nargs="*", help="after --: more bench/tradeoff.py options")
    return p.parse_args(argv)


# -- the runs --------------------------------------------------------------------------------
def start_run(run: str, args: argparse.Namespace, out: Path) -> subprocess.Popen:
    baseline = run in tradeoff.BASELINES
    attack, steps = CALIBRATION_ATTACK
    command = [sys.executable, "-u", str(ROOT / "bench" / "tradeoff.py"),
               "--data", args.data, "--device", args.device,
               "--methods", "" if baseline else run, "--baselines", run if baseline else "",
               "--train-attack", attack, "--train-steps", str(steps),
               "--plan", str(out / "plan.json"), "--calibrate-steps", str(args.calibrate_steps),
               "--plan-wait", str(args.budget_s), "--eval-batch-size", str(args.eval_batch_size),
               "--no-progress", "--out", str(out / "runs" / slug(run)), *args.extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    log = open(out / "logs" / f"{slug(run)}.log", "w")  # noqa: SIM115 (the child keeps it)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=ROOT)


def calibration(run: str, out: Path) -> dict[str, Any] | None:
    path = out / "runs" / slug(run) / "calibration.json"
    return json.loads(path.read_text()) if path.is_file() else None


def wait_for_calibrations(procs: dict[str, subprocess.Popen], out: Path,
                          timeout_s: float) -> dict[str, dict[str, Any]]:
    """The calibrations of the runs, once every run has written one or ended (or at the
    timeout: the late ones then follow the plan untimed)."""
    limit = time.monotonic() + timeout_s
    while True:
        found = {run: c for run in procs if (c := calibration(run, out)) is not None}
        pending = [r for r, p in procs.items() if r not in found and p.poll() is None]
        if not pending or time.monotonic() > limit:
            if pending:
                say(f"no calibration yet from {pending}; planning without them")
            return found
        time.sleep(0.5)


# -- the plan --------------------------------------------------------------------------------
def step_seconds(run: str, timed: float, attack_steps: int) -> float:
    """A run's seconds per step with a training attack of ``attack_steps`` iterations,
    from its step time with the calibration attack (attack passes + about two training
    passes; standard training runs no attack)."""
    if run == "standard":
        return timed
    return timed * (attack_steps + 2) / (CALIBRATION_ATTACK[1] + 2)


def sweep_seconds(run: str, timed: float, targs: argparse.Namespace, eval_batch: int) -> float:
    lambdas = 1 if run in tradeoff.BASELINES else len(targs.lambdas)
    passes = lambdas * math.ceil(targs.n_examples / eval_batch) * (targs.steps + 2)
    return SWEEP_FACTOR * timed * passes / (CALIBRATION_ATTACK[1] + 2)


def make_plan(calibrations: dict[str, dict[str, Any]], targs: argparse.Namespace,
              args: argparse.Namespace, left_s: float) -> dict[str, Any]:
    """Epochs and training attack for every run (see the module docstring)."""
    timed = {run: c["seconds_per_step"][run] for run, c in calibrations.items()}
    per_epoch = max(c["steps_per_epoch"] for c in calibrations.values())
    reserve = SAVE_S + max(sweep_seconds(r, t, targs, args.eval_batch_size)
                           for r, t in timed.items())
    usable = SAFETY * (left_s - reserve)
    options = []
    for attack, steps in ATTACK_LADDER:
        epoch_s = max(EPOCH_OVERHEAD[0] * per_epoch * step_seconds(r, t, steps)
                      + EPOCH_OVERHEAD[1] for r, t in timed.items())
        epochs = min(args.max_epochs, int(usable // epoch_s))
        options.append({"train_attack": attack, "train_steps": steps, "epochs": epochs,
                        "epoch_seconds_estimate": round(epoch_s, 2)})
    chosen = next((o for o in options if o["epochs"] >= min(args.min_epochs, args.max_epochs)),
                  max(options, key=lambda o: o["epochs"]))
    return {**chosen, "epochs": max(chosen["epochs"], 1),
            "fits": chosen["epochs"] >= 1, "options": options,
            "seconds_per_step_pgd7": timed, "steps_per_epoch": per_epoch,
            "left_seconds": round(left_s, 1), "reserve_seconds": round(reserve, 1),
            "safety": SAFETY, "runs_timed": sorted(timed)}


# -- merging ---------------------------------------------------------------------------------
def merge(runs: list[str], out: Path, status: dict[str, str], plan: dict[str, Any]) -> int:
    """One table, plot and results.json from the runs that have finished; returns how many."""
    results: dict[str, tuple[SweepResult, float]] = {}
    settings = []
    for run in runs:
        path = out / "runs" / slug(run) / "results.json"
        if not path.is_file():
            continue
        payload = json.loads(path.read_text())
        settings.append(payload["setting"])
        for name, entry in payload["results"].items():
            results[name] = (SweepResult.from_dict(entry), entry["train_seconds"])
    atomic_write_text(json.dumps({"status": status, "plan": plan}, indent=2),
                      out / "status.json")
    if not results:
        return 0
    note = (f"; {len(runs)} runs trained at the same time, one process each on the same "
            f"device (train times are wall times under that sharing); epochs and training "
            f"attack chosen by bench/device/stage_a.py from timed steps")
    title = f"{settings[0].split(' ')[0]}, {next(iter(results.values()))[0].meta['attack']}"
    tradeoff.write_report(results, out, settings[0] + note, title,
                          time.monotonic() - started,
                          {"plan": plan, "status": status, "run_settings": settings})
    return len(settings)


# -- the stage -------------------------------------------------------------------------------
def stop(procs: dict[str, subprocess.Popen], grace_s: float) -> None:
    """SIGTERM to the runs still going (fit then writes last.pt), SIGKILL after grace_s."""
    alive = [p for p in procs.values() if p.poll() is None]
    for p in alive:
        p.terminate()
    limit = time.monotonic() + grace_s
    for p in alive:
        try:
            p.wait(max(limit - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def monitor(procs: dict[str, subprocess.Popen], runs: list[str], out: Path,
            plan: dict[str, Any], deadline: float) -> dict[str, str]:
    """Merge after every run that ends; stop the rest at the deadline."""
    status = {run: "running" for run in runs}
    while any(s == "running" for s in status.values()):
        for run, proc in procs.items():
            if status[run] == "running" and proc.poll() is not None:
                status[run] = "finished" if proc.returncode == 0 else f"failed ({proc.returncode})"
                say(f"{run}: {status[run]}; merged {merge(runs, out, status, plan)} run(s)")
        if time.monotonic() > deadline:
            late = [r for r, s in status.items() if s == "running"]
            say(f"deadline: stopping {late}")
            stop(procs, 8.0)
            status.update({r: "stopped at the deadline" for r in late})
            break
        time.sleep(1.0)
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    deadline = started + args.budget_s - EXIT_S
    runs = [r for r in args.runs.split(",") if r]
    targs = tradeoff.parse_args(["--data", args.data, *args.extra])
    say(f"decoding {args.data} once")
    tradeoff.load_data(args.data)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # outer timeout: clean up below
    procs = {run: start_run(run, args, out) for run in runs}
    atomic_write_text("".join(f"{p.pid}\n" for p in procs.values()), out / "pids.txt")
    say(f"started {len(procs)} runs: {', '.join(runs)}")
    plan: dict[str, Any] = {}
    status = {run: "not started" for run in runs}
    try:
        calibrations = wait_for_calibrations(procs, out, 0.4 * args.budget_s)
        if calibrations:
            plan = make_plan(calibrations, targs, args, deadline - time.monotonic())
        else:
            plan = {"epochs": 0, "fits": False, "reason": "no run timed its steps"}
        atomic_write_text(json.dumps(plan, indent=2), out / "plan.json")
        say(f"plan: {plan['epochs']} epoch(s) of {plan.get('train_attack')}-"
            f"{plan.get('train_steps')}; {json.dumps(plan)}")
        status = monitor(procs, runs, out, plan, deadline)
    finally:
        stop(procs, 5.0)
        merged = merge(runs, out, status, plan)
        say(f"merged {merged} of {len(runs)} runs into {out}: {status}")
    return 0 if all(s == "finished" for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
