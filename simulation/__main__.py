"""``python -m simulation``: the whole study on the embedded synthetic cohort (see simulation/study.py)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from braintumnet.config import DEFAULT_PROFILE, PROFILES, check_keys, parse_overrides
from braintumnet.errors import BrainTumNetError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation", description=__doc__)
    parser.add_argument("--profile", default=DEFAULT_PROFILE, choices=list(PROFILES))
    parser.add_argument("--out", type=Path, help="run folder (default runs/study-<profile>-<time>); run the same "
                        "study into the same folder again to continue it: the repetitions (seeds, folds) it finished "
                        "are reused, the others trained")
    parser.add_argument("--phantom", type=Path, help="reuse a phantom cohort folder")
    parser.add_argument("--data", type=Path, help="a pooled dataset (dataset.json + cases.csv with a hospital "
                        "column) to split by hospital instead of the synthetic phantom")
    parser.add_argument("--site-column", default="hospital", help="cases.csv column naming each case's hospital")
    parser.add_argument("--external", default="external", help="the hospital of --data kept for external "
                        "validation only (never trained on)")
    parser.add_argument("--scale", type=float,
                        help="phantom scale, training and test cases alike (default: the profile's; quick trains at "
                             "0.1 and tests on 33 internal and 15 external cases, test sets of standard's size, "
                             "docs/phantom.md)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each one repeats the study (mean ± sd)")
    parser.add_argument("--folds", type=int, default=0, help="k-fold cross-validation of the training cases "
                        "(each site holds out its own fold; every fold trains every arm)")
    parser.add_argument("-c", "--run-config", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config overrides for every arm, as in flwr run -c: key=value pairs separated by "
                        "spaces, values in TOML, bare words as text (repeatable)")
    parser.add_argument("--ray-address", help="run the simulated sites on this running Ray cluster "
                        "(ray start --head prints it) instead of a private Ray instance")
    parser.add_argument("--cpus-per-site", type=int, default=1, help="Ray CPUs each simulated site reserves")
    parser.add_argument("--gpus-per-site", type=float, default=0.0, help="Ray GPUs each simulated site reserves")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-federated", action="store_true", help="only the centralized and local arms")
    parser.add_argument("--budget", default="epochs", choices=["epochs", "wall-time", "both"],
                        help="the federated arm's compute budget: epochs (each site passes over its data as often as "
                             "the centralized model: the paper's setting), wall-time (each site trains as long as the "
                             "centralized model, the sites in parallel), or both (two federated arms)")
    parser.add_argument("--gate-regions", action="store_true",
                        help="Table 2, classification by region: also train a centralized model for each other "
                        "model.gate-region (the region the classifier sees: tumor, edema, whole), two more trainings")
    parser.add_argument("--arms", default="", help="train only these arms of every seed (comma-separated, names as "
                        "in metrics.json: centralized, local:<site>, federated, federated:wall-time, gate:edema, "
                        "gate:whole) and keep them in --out without a report; gather the repetitions/ folders of "
                        "several machines into one run folder and run the study there without --arms to report them")
    parser.add_argument("--jobs", type=int, default=0, help="worker processes that train the centralized, Table 2 "
                        "and local-only arms while the federated arm runs, each keeping its arms in --out as --arms "
                        "does (default 0: one per usable core on a CPU, none on a GPU; 1: every arm in this process, "
                        "one after the other); their logs are in --out/workers/")
    # A worker of a study started with --jobs: trains its --arms and logs nothing to MLflow (its study does).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from simulation.workers import die_with_the_study

        die_with_the_study()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Per-site test splits of a small cohort often lack a class; the report shows the NaN AUC instead.
    logging.getLogger("braintumnet.metrics").setLevel(logging.ERROR)
    out = args.out or Path("runs") / f"study-{args.profile}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. --seeds 0,1,2")
    if args.jobs < 0:
        parser.error(f"--jobs {args.jobs}: give a number of worker processes (0 = one per core, 1 = none)")
    if args.folds == 1 or args.folds < 0:
        parser.error("--folds must be 0 (no cross-validation) or at least 2")
    try:
        overrides = parse_overrides(args.run_config)
        # Here, before the study's heavy imports and before its run folder exists, so a misspelt key costs nothing
        # and leaves nothing behind.
        check_keys(overrides)
        arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
        federated = any(a.startswith("federated") for a in arms) if arms else not args.skip_federated
        _require_extras(phantom=args.data is None, federated=federated)
    except BrainTumNetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    from simulation.flower_run import Cluster
    from simulation.study import run_study

    try:
        run_study(out, args.profile, phantom=args.phantom, data=args.data, site_column=args.site_column,
                  external=args.external, scale=args.scale, seeds=seeds or (0,), folds=args.folds,
                  device=args.device, skip_federated=args.skip_federated, gate_regions=args.gate_regions,
                  budgets=("epochs", "wall-time") if args.budget == "both" else (args.budget,),
                  overrides=overrides, arms=arms, jobs=args.jobs, worker=args.worker,
                  cluster=Cluster(args.ray_address, args.cpus_per_site, args.gpus_per_site))
    except BrainTumNetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _require_extras(*, phantom: bool, federated: bool) -> None:
    """Fail before any work when the 'simulation' extra is missing (a site's install leaves it out), not an hour in."""
    from braintumnet.extras import require

    needed = {"matplotlib": "the study's figures", "mlflow": "the study's MLflow runs"}
    if phantom:
        needed["nilearn"] = "the synthetic phantom cohort"
    if federated:
        needed["ray"] = "the federated arm (Flower's Simulation Engine)"
    for module, purpose in needed.items():
        require(module, purpose, extra="simulation")


if __name__ == "__main__":
    sys.exit(main())
