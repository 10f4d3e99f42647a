"""The study: federated vs centralized vs local-only, every model scored on every site's test split, the pooled
internal test set and the external site (FLamby's triad, field notes §4).

Compute budget: centralized trains E epochs on the pooled data; each local arm trains E epochs on its own site; the
federated arm runs R rounds of L local epochs with R·L = E, so every site passes over its own data E times in
every arm.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from braintumnet.centralized import SYNTHETIC_NOTE
from braintumnet.checkpoint import load_checkpoint, save_checkpoint
from braintumnet.config import Profile, resolve, to_dict
from braintumnet.data.contract import EXTERNAL_SITE, SITES
from braintumnet.data.contract import class_names as task_classes
from braintumnet.data.loading import load_sites
from braintumnet.engine import build_model, evaluate_model, pick_device, train_model
from simulation.flower_run import run_federated
from simulation.report import write_report

log = logging.getLogger("simulation")

# Phantom scale per profile: quick fits 15 minutes on 2 cores; paper is the paper's 485 + 51 cases.
PHANTOM_SCALE = {"quick": 0.1, "standard": 0.3, "paper": 1.0}


def say(message: str) -> None:
    """One progress line per phase and round (the study's whole console output)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def score(model, sites: dict, profile: Profile, device) -> dict:
    internal = [sites[s] for s in SITES if s in sites]
    return {
        "internal_test": evaluate_model(model, internal, "test", profile, device, progress=False),
        "external": evaluate_model(model, [sites[EXTERNAL_SITE]], None, profile, device, progress=False),
        "per_site": {s.site: evaluate_model(model, [s], "test", profile, device, progress=False) for s in internal},
    }


def run_study(out: Path, profile_name: str = "quick", *, phantom: Path | None = None, scale: float | None = None,
              seed: int = 0, device: str = "auto", skip_federated: bool = False,
              overrides: dict | None = None) -> dict:
    """Run every arm and write ``metrics.json``, ``report.md`` and ``report.html`` into ``out``.

    Args:
        overrides: run-config keys (``[tool.flwr.app.config]`` names) applied on top of the profile in every arm,
            the federated one included.
    """
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    overrides = {**(overrides or {}), "train.seed": seed}
    profile = resolve({"profile": profile_name, **overrides})
    fed = profile.federation
    epochs = fed.num_rounds * fed.local_epochs
    profile = dataclasses.replace(profile, train=dataclasses.replace(profile.train, epochs=epochs))
    dev = pick_device(device)
    cache = out / "cache"
    started = time.perf_counter()

    phantom = Path(phantom).absolute() if phantom else out / "phantom"
    if not (phantom / "phantom.json").is_file():
        from braintumnet.data.phantom import generate_cohort

        scale = scale or PHANTOM_SCALE.get(profile_name, 0.1)
        say(f"phase 1/5 cohort: writing the SYNTHETIC phantom cohort (scale {scale}) to {phantom}")
        say("  " + generate_cohort(phantom, scale=scale, seed=seed, progress=False).summary().replace("\n", "\n  "))
    else:
        say(f"phase 1/5 cohort: reusing {phantom}")
    say(f"phase 2/5 prepare: {profile.data.slices_per_case} slices per case at {profile.data.img_size} px")
    sites = {s.site: s for s in load_sites([phantom / s for s in (*SITES, EXTERNAL_SITE)], cache, profile.data,
                                           progress=False)}
    internal = [sites[s] for s in SITES]
    classes = task_classes(profile.data.task)
    results, timings = {}, {}

    def arm(name: str, train_sites) -> None:
        t0 = time.perf_counter()
        model = build_model(profile, len(classes))
        train_model(model, train_sites, profile, dev, epochs=epochs, progress=False)
        timings[name] = round(time.perf_counter() - t0, 1)
        save_checkpoint(out / "models" / f"{name.replace(':', '-')}.pt", model.state_dict(), profile, classes,
                        {"arm": name, "synthetic": True, "epochs": epochs})
        results[name] = score(model, sites, profile, dev)
        r = results[name]["internal_test"]
        say(f"  {name}: {epochs} epochs in {timings[name]} s; internal dice_tumor {r['dice_tumor']:.3f} "
            f"acc {r['acc']:.3f}")

    say(f"phase 3/5 centralized: pooled {', '.join(SITES)}")
    arm("centralized", internal)
    say(f"phase 4/5 local-only: each site alone")
    for site in internal:
        arm(f"local:{site.site}", [site])
    if not skip_federated:
        say(f"phase 5/5 federated: FedAvg on Flower's Simulation Engine, {fed.num_rounds} rounds x "
            f"{fed.local_epochs} local epochs")
        t0 = time.perf_counter()
        run_dir = run_federated({
            "profile": profile_name, **overrides, "num-server-rounds": fed.num_rounds,
            "train.local-epochs": fed.local_epochs, "checkpoint-dir": str(out / "federated"), "cache-dir": str(cache),
            "phantom-dir": str(phantom), "device": device,
        }, out, log=say)
        timings["federated"] = round(time.perf_counter() - t0, 1)
        ckpt = load_checkpoint(run_dir / "final.pt")
        model = build_model(ckpt.profile, len(ckpt.class_names))
        model.load_state_dict(ckpt.state_dict)
        results["federated"] = score(model, sites, profile, dev)
        r = results["federated"]["internal_test"]
        say(f"  federated: {timings['federated']} s; internal dice_tumor {r['dice_tumor']:.3f} acc {r['acc']:.3f}")

    document = {
        "synthetic": True,
        "note": SYNTHETIC_NOTE,
        "profile": profile_name,
        "config": to_dict(profile),
        "device": str(dev),
        "budget": {"centralized_epochs": epochs, "local_epochs_per_site": epochs,
                   "federated_rounds": fed.num_rounds, "federated_local_epochs": fed.local_epochs},
        "cases": {s.site: int(s.slices["case_id"].nunique()) for s in sites.values()},
        "wall_s": {**timings, "total": round(time.perf_counter() - started, 1)},
        **results,
    }
    (out / "metrics.json").write_text(json.dumps(document, indent=2, default=float))
    write_report(document, out)
    say(f"done in {document['wall_s']['total']} s: {out / 'metrics.json'}, {out / 'report.md'}, "
        f"{out / 'report.html'} (SYNTHETIC data)")
    return document
