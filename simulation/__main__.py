"""``python -m simulation``: the whole study on the embedded synthetic cohort (see simulation/study.py)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from braintumnet.errors import BrainTumNetError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulation", description=__doc__)
    parser.add_argument("--profile", default="quick", choices=["quick", "standard", "paper"])
    parser.add_argument("--out", type=Path, help="run folder (default runs/study-<profile>-<time>)")
    parser.add_argument("--phantom", type=Path, help="reuse a phantom cohort folder")
    parser.add_argument("--scale", type=float, help="phantom scale (default: the profile's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-federated", action="store_true", help="only the centralized and local arms")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Per-site test splits of a small cohort often lack a class; the report shows the NaN AUC instead.
    logging.getLogger("braintumnet.metrics").setLevel(logging.ERROR)
    out = args.out or Path("runs") / f"study-{args.profile}-{time.strftime('%Y%m%d-%H%M%S')}"
    from simulation.study import run_study

    try:
        run_study(out, args.profile, phantom=args.phantom, scale=args.scale, seed=args.seed, device=args.device,
                  skip_federated=args.skip_federated)
    except BrainTumNetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
