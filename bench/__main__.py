"""Run the benchmarks and write ``<out>/<name>.json`` and ``<out>/<name>.md`` for each.

``python -m bench [--quick] [--only compute,accuracy,federation,data,gpu] [--out bench/results]
[--device auto|cpu|cuda] [--deployment] [--sites N,...] [--arms KEY,...] [--seeds N,...] [--profile quick|standard]
[--fresh] [--workdir DIR]`` (bench/README.md).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from braintumnet.config import PROFILES

BENCHMARKS = {"compute": "bench.compute", "accuracy": "bench.accuracy", "federation": "bench.federation",
              "data": "bench.data_pipeline", "gpu": "bench.gpu", "joint": "bench.joint",
              "evaluation": "bench.evaluation", "transfer": "bench.transfer"}
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the few-minutes CPU version of every benchmark")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default bench/results)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--deployment", action="store_true",
                        help="with --quick, also run the federation benchmark's loopback deployment (full mode does)")
    parser.add_argument("--sites", default="",
                        help="federation: comma-separated site counts for the scaling runs, e.g. 3,6,12,24 "
                             "(default: the mode's; the phantom grows so every site gets a test case)")
    parser.add_argument("--arms", default="",
                        help="accuracy: comma-separated arms to train, e.g. multitask,two-stage (default: every arm "
                             "not yet kept in <out>/accuracy-arms-<mode>/); known: "
                             "multitask,two-stage,detached-gate,no-transformer,no-inception,no-cbam,basicunet,dynunet,swinunetr,"
                             "densenet121,resnet18,resnet50; 'kept' trains none and rewrites the tables from the "
                             "kept arms")
    parser.add_argument("--seeds", default="",
                        help="joint: comma-separated seeds, each arm trained once per seed (default 0,1,2)")
    parser.add_argument("--profile", default="quick", choices=list(PROFILES),
                        help="joint: the simulation profile whose size and phantom cohort full mode trains at "
                             "(default quick; standard is about 15-25 min per arm-seed on a CPU core)")
    parser.add_argument("--fresh", action="store_true",
                        help="accuracy: retrain the chosen arms even where a kept result with the same settings exists")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="scratch folder for cohorts, caches and run folders (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    args.only = [b.strip() for b in args.only.split(",") if b.strip()]
    try:
        args.sites = tuple(int(n) for n in args.sites.split(",") if n.strip())
    except ValueError:
        parser.error(f"--sites {args.sites}: use comma-separated whole numbers, e.g. 3,6,12,24")
    if any(n < 1 for n in args.sites):
        parser.error(f"--sites {args.sites}: every count must be at least 1")
    args.arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    from bench.accuracy import ARM_KEYS
    from bench.joint import ARMS as JOINT_ARMS

    kept_only = args.arms == ("kept",)  # train nothing: rewrite the tables from the kept arms
    known = {**ARM_KEYS, **JOINT_ARMS}
    wrong = [] if kept_only else [a for a in args.arms if a not in known]
    if wrong:
        parser.error(f"--arms {','.join(wrong)}: use some of {','.join(known)}, or kept")
    try:
        args.seeds = tuple(int(n) for n in args.seeds.split(",") if n.strip())
    except ValueError:
        parser.error(f"--seeds {args.seeds}: use comma-separated whole numbers, e.g. 0,1,2")
    args.arms = () if kept_only else args.arms or None
    unknown = [b for b in args.only if b not in BENCHMARKS]
    if unknown:
        parser.error(f"--only {','.join(unknown)}: use some of {','.join(BENCHMARKS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from bench.common import Context
    from braintumnet.engine import pick_device
    from braintumnet.errors import BrainTumNetError

    try:
        device = pick_device(args.device).type
    except BrainTumNetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if device == "cpu":
        import torch

        torch.set_num_threads(1)  # one core per process: steadier on a shared machine; stated in every table
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="braintumnet-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=args.out.absolute(), workdir=workdir.absolute(), quick=args.quick, device=device,
                  deployment=True if args.deployment else None, sites=args.sites or None,
                  arms=args.arms, fresh=args.fresh, seeds=args.seeds or None, profile=args.profile)
    started, failed = time.perf_counter(), []
    try:
        for name in args.only:
            ctx.say(f"=== {name} ({'quick' if args.quick else 'full'}, {device})")
            t0 = time.perf_counter()
            try:
                importlib.import_module(BENCHMARKS[name]).run(ctx)
            except Exception as exc:  # one failed benchmark must not lose the others' results
                logging.getLogger("bench").exception("benchmark %s failed", name)
                failed.append(f"{name}: {type(exc).__name__}: {exc}")
            ctx.say(f"=== {name} done in {time.perf_counter() - t0:.0f} s")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    ctx.say(f"all done in {time.perf_counter() - started:.0f} s; results in {ctx.out}")
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
