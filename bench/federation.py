"""Federation cost: round overhead, bytes per site per round, and wall time as sites are added.

* **Round overhead** = a round's wall time / the slowest site's own train + evaluate time (the ClientApps'
  ``seconds``), as the ServerApp records it in the run folder's ``metrics.json`` (``server.rounds.RoundRecord.close``).
  On a machine with fewer cores than sites the sites queue for cores, so the table also gives the overhead against
  the best this machine could do: ``max(slowest site, total site time / parallel slots)``. The **serial** runs
  reserve every core for each site, so Ray runs one site at a time (still one thread each): no site competes with
  another, and the round's wall time over the sum of the sites' own times is what Flower and the centre add (the
  "vs cores" column).
* **Bytes per site per round**, also from ``metrics.json`` (array payload bytes of the messages, not gRPC framing):
  received + sent, against twice the fp32 model size. With ``evaluate-in-train`` (the default) a round is one train
  instruction down and one train reply up; the last round adds the evaluate instruction for the final model, so the
  table gives the rounds before the last and the whole run's mean.
* **Sites scaling**: the same pooled cases dealt round-robin (by split and tumour type) to N = 3, 6, 12, 24 simulated
  sites, each written as its own prepared cache (``part00`` ...) that the ClientApp opens as it opens any site's;
  the run config's ``sites`` maps Flower's partitions to them. **Data scaling**: 3 sites with half and all of the
  cases, for "linear in total data".

The simulation side runs ``simulation.flower_run.run_federated`` (Flower's Simulation Engine, one CPU per site).
The loopback deployment side (full mode, or ``--deployment``; :mod:`bench.federation_deployment`) runs a real
``flower-superlink`` with TLS and node authentication and three ``python client/run.py`` sites, through the test
suite's harness (``tests/federation/harness.py``): 1 local epoch per round and the heavier local work (about 60 s of a
site's own work per round), three sites at once then one alone, so the fixed per-round costs show against both.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import Context, fmt, median, ratio, table, write_result
from bench.federation_deployment import (COSTS_HEAD, COSTS_HEADING, _deployment_aims, _deployment_notes,
                                         _deployment_rows, run_deployment)
from bench.federation_runs import analyse, model_bytes, settings as run_settings
from braintumnet.config import resolve
from braintumnet.data.cache import PreparedSite, prepared_dir, read_quarantine, write_prepared
from braintumnet.data.contract import SITES

REPO = Path(__file__).resolve().parents[1]
# Figures taken as the median over a run's repetitions.
REPEATED = ("run_wall_s", "round_wall_s_total", "overhead_median", "overhead_vs_cores_median", "overhead_round1")


def partition(sites: list[PreparedSite], n: int, cache_root: Path, data_cfg, fraction: float = 1.0,
              prefix: str = "part") -> list[str]:
    """Deal the pooled cases of ``sites`` to ``n`` new prepared sites under ``cache_root``; returns their names.

    Cases go round-robin within each (split, tumour type) group, so every part gets a share of each; ``fraction``
    keeps that share of each group's cases first (for the data-scaling runs). Every part needs a test case.
    """
    frames = []
    for i, site in enumerate(sites):
        frames.append(site.slices.assign(_site=i, _row=np.arange(len(site.slices))))
    pooled = pd.concat(frames, ignore_index=True)
    cases = pooled.drop_duplicates(["_site", "case_id"])[["_site", "case_id", "split", "tumor_type"]]
    cases = cases.sort_values(["split", "tumor_type", "_site", "case_id"]).reset_index(drop=True)
    kept = []
    for _, group in cases.groupby(["split", "tumor_type"], sort=True):
        kept.append(group.iloc[:max(1, math.ceil(fraction * len(group)))])
    cases = pd.concat(kept, ignore_index=True)
    cases["part"] = -1
    for split in ("train", "test"):
        rows = cases.index[cases["split"] == split]
        if len(rows) < n:
            raise ValueError(f"{len(rows)} {split} cases cannot be dealt to {n} sites; use a larger phantom scale")
        cases.loc[rows, "part"] = np.arange(len(rows)) % n
    names = [f"{prefix}{i:02d}" for i in range(n)]
    for part, name in enumerate(names):
        chosen = cases[cases["part"] == part][["_site", "case_id"]]
        table_ = pooled.merge(chosen, on=["_site", "case_id"]).sort_values(["_site", "_row"])
        images = np.concatenate([np.asarray(sites[s].images[table_["_row"][table_["_site"] == s].to_numpy()])
                                 for s in sorted(table_["_site"].unique())])
        masks = np.concatenate([np.asarray(sites[s].masks[table_["_row"][table_["_site"] == s].to_numpy()])
                                for s in sorted(table_["_site"].unique())])
        meta = {**sites[0].meta, "site": name, "partition_of": [s.site for s in sites], "fraction": fraction,
                "n_cases": int(len(chosen)), "n_slices": int(len(table_))}
        write_prepared(prepared_dir(cache_root, name, data_cfg), images, masks,
                       table_.drop(columns=["_site", "_row"]).reset_index(drop=True), meta,
                       read_quarantine(sites[0].path).iloc[0:0])
    return names


def simulate(ctx: Context, names: list[str], settings: dict, cache: Path, phantom: Path, tag: str,
             local_epochs: int = 1, cpus_per_site: int = 1) -> dict:
    from simulation.flower_run import run_federated

    n = len(names)
    run_config = {"profile": "quick", **settings["data"], "num-server-rounds": settings["rounds"],
                  "train.local-epochs": local_epochs, "checkpoint-dir": str(ctx.workdir / "runs" / tag),
                  "cache-dir": str(cache), "phantom-dir": str(phantom), "device": "cpu", "sites": ",".join(names),
                  "min-train-nodes": n, "min-evaluate-nodes": n, "min-available-nodes": n}
    t0 = time.perf_counter()
    # One thread per site in every run: a serial run reserves every core only so that Ray runs one site at a time,
    # and a site spinning threads on cores that other work holds ran 5x slower on a busy box.
    run_dir = run_federated(run_config, ctx.workdir / tag, num_sites=n, cpus_per_site=cpus_per_site, timeout_s=3600,
                            threads_per_site=1, log=lambda m: None)
    wall = time.perf_counter() - t0
    return {"run_dir": str(run_dir), "run_wall_s": wall, "run_config": run_config}


def run(ctx: Context) -> dict:
    from braintumnet.data.loading import load_sites

    s = run_settings(ctx)
    cores = ctx.machine.get("cpus_usable") or 1
    data_cfg = resolve({"profile": "quick", **s["data"]}).data
    size = model_bytes({"profile": "quick", **s["data"]})
    phantom = ctx.phantom(s["phantom"]).out
    base = load_sites([phantom / n for n in SITES], ctx.cache, data_cfg, progress=False)
    runs: dict[str, dict] = {}
    # (sites, share of the cases, local epochs, serial): the scaling runs, then one with ten times the work per
    # site, and that work with the sites one at a time (all cores each), for all and for half the cases.
    plan = [(n, 1.0, 1, False) for n in s["sites"]] + [(3, f, 1, False) for f in s["fractions"] if f != 1.0]
    if s["heavy_local_epochs"]:
        plan.append((3, 1.0, s["heavy_local_epochs"], False))
        plan += [(3, f, s["heavy_local_epochs"], True) for f in sorted(s["fractions"], reverse=True)]
    # Full mode repeats the plan in reverse (A B C C B A), so a drift in the machine's load cancels out of the
    # ratios; each figure is then the median over the repetitions.
    order = plan + plan[::-1] if s["repeat"] else plan
    for n, fraction, epochs, serial in order:
        tag = f"sites{n}-data{fraction:g}" + (f"-epochs{epochs}" if epochs != 1 else "") + ("-serial" if serial else "")
        cache = ctx.workdir / "fed-cache" / f"sites{n}-data{fraction:g}"
        if not cache.exists():
            partition(base, n, cache, data_cfg, fraction)
        names = [f"part{i:02d}" for i in range(n)]
        ctx.say(f"federation: simulation with {n} sites, {fraction:g} of the data, {s['rounds']} rounds of "
                f"{epochs} local epoch(s){', one site at a time' if serial else ''}")
        sim = simulate(ctx, names, s, cache, phantom, f"{tag}-{len(runs.get(tag, {}).get('repeats', []))}", epochs,
                       cpus_per_site=cores if serial else 1)
        found = {**sim, **analyse(Path(sim["run_dir"]), size, 1 if serial else min(cores, n))}
        r = runs.setdefault(tag, {"sites": n, "fraction": fraction, "local_epochs": epochs, "serial": serial,
                                  "repeats": []})
        r["repeats"].append(found)
        r.update({**found, **{k: median([x[k] for x in r["repeats"]]) for k in REPEATED}})
        ctx.say(f"  {tag}: run {found['run_wall_s']:.0f} s, rounds {found['round_wall_s_total']:.0f} s, overhead "
                f"{fmt(found['overhead_median'])} (vs cores {fmt(found['overhead_vs_cores_median'])}), bytes "
                f"(down+up)/2x model {fmt(found['exchanged_vs_2x_model'], 4)}")
    loop = run_deployment(ctx, s, phantom) if s["deployment"] else None  # None: not run in this mode
    doc = {"model_bytes_fp32": size, "rounds": s["rounds"], "data": s["data"], "phantom_scale": s["phantom"],
           "repeated": s["repeat"],
           "parallel_slots": cores, "runs": runs, "deployments": loop,
           "scaling": _scaling(runs),
           "aims": {}}
    doc["aims"] = _aims(doc)
    return write_result(ctx, "federation", "Federation cost: round overhead, bytes, sites and data scaling", doc,
                        _sections(doc), _notes(ctx, doc))


def _scaling(runs: dict) -> dict:
    serial = {r["fraction"]: r for r in runs.values() if r.get("serial")}
    runs = {k: r for k, r in runs.items() if r.get("local_epochs", 1) == 1 and not r.get("serial")}
    full = {r["sites"]: r for r in runs.values() if r["fraction"] == 1.0}
    if 3 not in full:
        return {}
    base = full[3]
    sites = {}
    for n, r in sorted(full.items()):
        rel = ratio(r["round_wall_s_total"], base["round_wall_s_total"])
        sites[n] = {"round_wall_s_total": r["round_wall_s_total"], "run_wall_s": r["run_wall_s"],
                    "vs_3_sites": rel, "run_vs_3_sites": ratio(r["run_wall_s"], base["run_wall_s"]),
                    "per_added_site": (rel - 1) / (n - 3) if n > 3 and rel is not None else None}
    data = {}
    for r in runs.values():
        if r["sites"] == 3:
            data[r["fraction"]] = {"round_wall_s_total": r["round_wall_s_total"],
                                   "vs_full": ratio(r["round_wall_s_total"], base["round_wall_s_total"])}
    # The same with the heavier local work and one site at a time: the data's own share of the round.
    data_serial = {f: {"round_wall_s_total": r["round_wall_s_total"],
                       "vs_full": ratio(r["round_wall_s_total"], serial[1.0]["round_wall_s_total"])}
                   for f, r in serial.items()} if 1.0 in serial else {}
    return {"sites": sites, "data": data, "data_serial": data_serial}


def _aims(doc: dict) -> dict:
    runs = doc["runs"]
    aims = {}
    three = next((r for r in runs.values() if r["sites"] == 3 and r["fraction"] == 1.0
                  and r.get("local_epochs", 1) == 1 and not r.get("serial")), None)
    if three:
        aims["round_overhead_simulation"] = {"value": three["overhead_median"], "aim": 1.10,
                                             "met": (three["overhead_median"] or 99) <= 1.10}
        aims["bytes_per_site_per_round_vs_2x_model"] = {
            "value": three["exchanged_vs_2x_model"], "aim": "within 2%",
            "met": abs((three["exchanged_vs_2x_model"] or 0) - 1) <= 0.02}
    for r in runs.values():
        if r.get("local_epochs", 1) > 1 and not r.get("serial"):
            aims[f"round_overhead_simulation_{r['local_epochs']}_local_epochs"] = {
                "value": r["overhead_median"], "aim": 1.10, "met": (r["overhead_median"] or 99) <= 1.10}
        elif r.get("serial") and r["fraction"] == 1.0:  # wall / sum of the sites' own times, one site at a time
            aims[f"round_overhead_simulation_one_site_at_a_time_{r['local_epochs']}_local_epochs"] = {
                "value": r["overhead_vs_cores_median"], "aim": 1.10,
                "met": (r["overhead_vs_cores_median"] or 99) <= 1.10}
    aims.update(_deployment_aims(doc.get("deployments") or {}))
    per_site = [v["per_added_site"] for v in doc["scaling"].get("sites", {}).values() if v["per_added_site"]]
    if per_site:
        aims["cost_per_added_site"] = {"value": max(per_site), "aim": 0.05, "met": max(per_site) < 0.05}
    for key, name in (("data", "half_data_vs_full"), ("data_serial", "half_data_vs_full_one_site_at_a_time")):
        half = doc["scaling"].get(key, {}).get(0.5)
        if half:
            aims[name] = {"value": half["vs_full"], "aim": "0.5 (linear, no fixed cost)",
                          "met": abs(half["vs_full"] - 0.5) <= 0.1}
    return aims


def _notes(ctx: Context, doc: dict) -> list[str]:
    notes = [f"Model: {doc['model_bytes_fp32'] / 2**20:.2f} MiB of fp32 arrays (run config {doc['data']}); "
             f"{doc['rounds']} rounds of 1 local epoch, phantom scale {doc['phantom_scale']} (SYNTHETIC). "
             "Overhead medians leave out round 1, whose ClientApps pay the cold start (shown separately). "
             f"Flower's Simulation Engine gives each site one CPU; this machine has {doc['parallel_slots']} usable "
             "core(s), so sites queue for cores and the raw overhead cannot reach 1 here with more sites than "
             "cores: 'vs cores' divides by max(slowest site, total site time / cores) instead."]
    if not doc["repeated"]:
        notes.append("Each configuration ran once, one after another (not interleaved): on a loaded machine the "
                     "sites- and data-scaling ratios carry the load's drift. The full mode runs the plan forwards "
                     "then backwards and takes medians.")
    failed = {f"{d.get('local_epochs', e)} local epoch(s)" + (", one site" if d.get("sites") == 1 else ""): d["error"]
              for e, d in (doc.get("deployments") or {}).items() if d.get("error")}
    if failed:
        said = "; ".join(f"{e}: {err}" for e, err in failed.items())
        notes.append(f"The loopback deployment did not complete in this run ({said}). Its SuperLink keeps its "
                     "state in SQLite, which answers \"database is locked\" when the machine is saturated "
                     "(docs/federation.md, Known limits): run it on a machine without other heavy work.")
    if doc.get("deployments"):
        notes += _deployment_notes(doc)
    if doc.get("deployments") is None:
        notes.append("Loopback deployment: not run in this mode (`--quick` without `--deployment`); the full mode "
                     "(`python -m bench --only federation`) runs it through tests/federation/harness.py.")
    return notes


def _sections(doc: dict) -> list[tuple[str, list[str]]]:
    head = ["run", "sites", "data", "local epochs", "run wall s", "rounds wall s", "round-1 overhead",
            "overhead (median)", "overhead vs cores", "down bytes/site/round", "down+up / 2× model",
            "down+up / 2× model, whole run"]
    rows = [[tag, r["sites"], r["fraction"], r.get("local_epochs", 1), r["run_wall_s"], r["round_wall_s_total"],
             r["overhead_round1"], r["overhead_median"], r["overhead_vs_cores_median"],
             r["rounds"][0]["bytes_down_per_site"], r.get("exchanged_vs_2x_model"), r.get("exchanged_vs_2x_model_run")]
            for tag, r in doc["runs"].items()]
    loop_rows, costs = _deployment_rows(doc.get("deployments") or {})
    sections = [("Runs (simulation: Flower Simulation Engine, one CPU per site; loopback deployment)",
                 table(head, rows + loop_rows, digits=4))]
    if costs:
        sections.append((COSTS_HEADING, table(COSTS_HEAD, costs, digits=3)))
    sc = doc["scaling"]
    if sc:
        rows = [[n, v["round_wall_s_total"], v["vs_3_sites"], v["per_added_site"], v["run_vs_3_sites"]]
                for n, v in sc["sites"].items()]
        sections.append(("Sites scaling, same total data (ratios to 3 sites)",
                         table(["sites", "rounds wall s", "rounds wall / 3 sites", "cost per added site",
                                "whole run / 3 sites"], rows)))
        rows = [[f, v["round_wall_s_total"], v["vs_full"]] for f, v in sorted(sc["data"].items())]
        sections.append(("Data scaling, 3 sites", table(["share of the cases", "rounds wall s", "vs all cases"],
                                                         rows)))
        if sc.get("data_serial"):
            rows = [[f, v["round_wall_s_total"], v["vs_full"]] for f, v in sorted(sc["data_serial"].items())]
            sections.append(("Data scaling, 3 sites one at a time, the heavier local work",
                             table(["share of the cases", "rounds wall s", "vs all cases"], rows)))
    rows = [[k, v["aim"], v["value"], v["met"]] for k, v in doc["aims"].items()]
    sections.append(("Aims", table(["figure", "aim", "measured", "met"], rows, digits=4)))
    return sections

