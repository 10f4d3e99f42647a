"""The federation benchmark's loopback deployment: a real ``flower-superlink`` with TLS and node authentication and
three ``python client/run.py`` sites (each a SuperNode and the site executor) through the test suite's harness
(``tests/federation/harness.py``), the app pinned from the committed tree and on every site's allow-list.

Runs: 1 local epoch per round (the test size) and the heavier local work (about 60 s of a site's own work per round
on a 2-core CPU), with the three sites training at once and then one site alone. Figures: a round's wall time over the
slowest site's own work (``metrics.json``), and where a message's time goes at a site (the executor's line per
ClientApp process). ``python -m bench --only federation --deployment`` runs it with the rest of the federation
benchmark; ``python -m bench.federation_deployment`` runs it alone into ``federation-deployment.{json,md}``.
"""

from __future__ import annotations

import io
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from bench.common import Context, median, table, write_result
from bench.federation_runs import analyse, model_bytes, settings as run_settings

REPO = Path(__file__).resolve().parents[1]

SPLIT_HEADING = "Loopback deployment: where a round's time goes (medians over the rounds after the first)"
SPLIT_HEAD = ["run", "round s", "train phase s", "slowest site's train s", "evaluate phase s",
              "slowest site's evaluate s", "train phase - work s", "evaluate phase - work s",
              "the centre between phases s"]
COSTS_HEADING = "Loopback deployment: a message's fixed cost at a site (means over the run's messages)"
COSTS_HEAD = ["run", "site", "messages", "ClientApp process s", "pull s", "install s", "load s", "push s",
              "the app's call s", "fixed cost s (install + load)", "slowest site's own work per round s"]


def run_deployment(ctx: Context, s: dict, phantom: Path) -> dict:
    """The loopback deployment's runs: 1 local epoch per round (the simulation's reference configuration) and the
    heavier local work, which shows what is left of the fixed costs (polling, ServerApp, TLS) against real work."""
    epochs = [1] + ([s["deployment_heavy_epochs"]] if s["deployment_heavy_epochs"] else [])
    try:
        return deployment(ctx, s, phantom, model_bytes({"profile": "quick", "data.img-size": 32,
                                                        "data.slices-per-case": 3, "model.feature-size": 8}), epochs)
    except Exception as exc:  # the federation itself did not come up
        return {str(e): {"local_epochs": e, "sites": 3, "error": f"{type(exc).__name__}: {exc}"[:500]}
                for e in epochs}


def deployment(ctx: Context, settings: dict, phantom: Path, size: int, epochs: list[int]) -> dict:
    """Three sites on loopback (real SuperLink, TLS, node auth, each site's allow-list and site executor), via the
    test suite's harness: one run per entry of ``epochs`` (local epochs per round) with the three sites training at
    once, then the same with one site (the others stopped), so its round has the machine to itself. Keyed
    ``"<epochs>"`` (three sites) and ``"<epochs>-one-site"``."""
    sys.path.insert(0, str(REPO / "tests" / "federation"))
    from harness import SITES as LOOP_SITES  # noqa: E402  (the test suite's loopback harness, read-only reuse)
    from harness import Federation  # noqa: E402
    from test_executor import pinned_app, set_allowlists, submit_app  # noqa: E402

    fed = Federation(ctx.workdir / "loopback", phantom, ctx.workdir / "loopback-cache")
    # The committed app (HEAD, not work in progress in the tree) as flwr run uploads it, on every site's allow-list.
    source = ctx.workdir / "loopback-source"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(source, filter="data")
    app, app_hash = pinned_app(ctx.workdir / "loopback-app", source)
    allowed = ctx.workdir / "loopback-allowed-apps"
    allowed.write_text(f"{app_hash}\n")
    set_allowlists(fed, {site: allowed for site in LOOP_SITES})
    found: dict = {}
    try:
        fed.deploy()
        fed.wait_nodes(3, 300)
        for sites in (3, 1):
            if sites == 1:
                for site in LOOP_SITES[1:]:
                    fed.kill_site(site, signal.SIGTERM)
            for local_epochs in epochs:
                key = f"{local_epochs}" + ("-one-site" if sites == 1 else "")
                ctx.say(f"federation: loopback deployment, {sites} site(s), {settings['deployment_rounds']} rounds of "
                        f"{local_epochs} local epoch(s)")
                logs = {site: len(proc.text()) for site, proc in fed.sites.items()}
                t0 = time.perf_counter()
                try:
                    run_id = submit_app(fed, app, **{"num-server-rounds": settings["deployment_rounds"],
                                                     "train.local-epochs": local_epochs, "min-available-nodes": sites,
                                                     "min-train-nodes": sites, "min-evaluate-nodes": sites})
                    status = fed.wait_finished(run_id, 1800)
                except Exception as exc:  # a failed run is a figure of its own; the next run still gets its try
                    found[key] = {"local_epochs": local_epochs, "sites": sites,
                                  "error": f"{type(exc).__name__}: {exc}"[:500]}
                    continue
                r = {"local_epochs": local_epochs, "sites": sites, "run_wall_s": time.perf_counter() - t0}
                if (fed.run_dir(run_id) / "metrics.json").is_file():  # the rounds it finished, even if it then failed
                    r.update(analyse(fed.run_dir(run_id), size, min(sites, ctx.machine.get("cpus_usable", 1))))
                    r["per_message"] = per_message_cost({s: p.text()[logs[s]:] for s, p in fed.sites.items()})
                if status["status"] != "finished:completed":
                    r["error"] = f"run ended as {status['status']} after {len(r.get('rounds', []))} round(s)"
                found[key] = r
        return found
    finally:
        fed.stop_all()


def per_message_cost(site_logs: dict[str, str]) -> dict:
    """Where a message's time goes at a site, as means over the run's messages, from the site executor's line per
    ClientApp process: ``pull`` the message (mostly waiting for the SuperNode to receive it from the SuperLink),
    ``install`` the FAB, ``load`` the app, ``push`` the reply, and the app's own call (with Flower's small steps
    between). ``fixed_s`` = install + load: what the site adds to a message besides the transfers and the work."""
    out = {}
    for site, text in site_logs.items():
        lines = re.findall(r"ClientApp process \d+: ([0-9.]+) s in all: (.*)", text)
        if not lines:
            continue
        steps = [{k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+) s", rest)} for _, rest in lines]
        n = len(lines)
        mean = {k: sum(st.get(k, 0.0) for st in steps) / n for k in ("pull", "install", "load", "push", "rest")}
        out[site] = {"messages": n, "process_s": sum(float(t) for t, _ in lines) / n,
                     **{f"{k}_s": v for k, v in mean.items()}, "fixed_s": mean["install"] + mean["load"]}
    return out


def _round_split(deployments: dict) -> list[list]:
    """Per run, medians over the rounds after the first: each phase's wall time against its slowest site's own work
    (the rest is the messages' way: the SuperNodes' looks, transfers, the centre's polls), and the centre's own time
    between the phases (aggregation, screening, checkpoints, metrics, MLflow)."""
    rows = []
    for key, d in deployments.items():
        later = d.get("rounds", [])[1:] or d.get("rounds", [])
        if not later or d.get("error"):
            continue

        def med(f):
            return median([v for v in (f(r) for r in later) if v is not None])

        centre = med(lambda r: r["wall_s"] - (r["train_s"] or 0.0) - (r["evaluate_s"] or 0.0)
                     if r.get("wall_s") is not None else None)
        rows.append([key, med(lambda r: r.get("wall_s")), med(lambda r: r.get("train_s")),
                     med(lambda r: r.get("slowest_train_s")), med(lambda r: r.get("evaluate_s")),
                     med(lambda r: r.get("slowest_evaluate_s")),
                     med(lambda r: r["train_s"] - r["slowest_train_s"] if r.get("slowest_train_s") is not None
                         and r.get("train_s") is not None else None),
                     med(lambda r: r["evaluate_s"] - r["slowest_evaluate_s"]
                         if r.get("slowest_evaluate_s") is not None and r.get("evaluate_s") is not None else None),
                     centre])
    return rows


def _deployment_aims(deployments: dict) -> dict:
    """Round wall time / the slowest site's own work: at most 1.25 at the test size (1 local epoch), 1.05 once the
    slowest site works >= 60 s a round, 1.10 in between; a message's fixed cost at a site at most 1 s."""
    aims = {}
    for key, d in deployments.items():
        if d.get("overhead_median") is None or d.get("error"):
            continue
        work = median([r.get("slowest_site_s") for r in d["rounds"][1:] or d["rounds"] if r.get("slowest_site_s")])
        aim = 1.25 if d["local_epochs"] == 1 else 1.05 if (work or 0) >= 60 else 1.10
        name = ("round_overhead_deployment" + ("" if d["local_epochs"] == 1 else f"_{d['local_epochs']}_local_epochs")
                + ("_one_site" if d.get("sites", 3) == 1 else ""))
        aims[name] = {"value": d["overhead_median"], "aim": aim, "met": d["overhead_median"] <= aim}
        if d.get("sites", 3) > 1:
            aims[f"{name}_vs_cores"] = {"value": d["overhead_vs_cores_median"], "aim": aim,
                                        "met": d["overhead_vs_cores_median"] <= aim}
        fixed = [v["fixed_s"] for v in d.get("per_message", {}).values()]
        if fixed:
            aims[f"fixed_cost_per_message_s_{key}"] = {"value": max(fixed), "aim": 1.0, "met": max(fixed) <= 1.0}
    return aims


def _deployment_notes(doc: dict) -> list[str]:
    return ["Loopback deployment: a real `flower-superlink` (TLS, node authentication) and three `python "
            "client/run.py` sites on this machine (each a SuperNode and the site executor, which forks each message's "
            "ClientApp from a warm process and checks the app against the site's allow-list), all three training at "
            "once, then one site alone (the other two stopped). Its 'vs cores' column divides by max(slowest site, "
            f"total site time / {min(3, doc['parallel_slots'])}). A message's fixed cost at a site is its ClientApp "
            "process's steps besides the transfers (pull: mostly the SuperNode still receiving the message from the "
            "SuperLink; push: the reply) and the app's own call: the FAB's install and the app's loading."]


def _deployment_rows(deployments: dict) -> tuple[list, list]:
    rows, costs = [], []
    for key, d in deployments.items():
        if d.get("overhead_median") is not None:
            label = "loopback deployment (TLS, node auth)" + (", one site" if d.get("sites", 3) == 1 else "")
            rows.append([label + (f": {d['error']}" if d.get("error") else ""), d.get("sites", 3), 1.0,
                         d["local_epochs"], d["run_wall_s"], d["round_wall_s_total"], d["overhead_round1"],
                         d["overhead_median"], d["overhead_vs_cores_median"], d["rounds"][0]["bytes_down_per_site"],
                         d.get("exchanged_vs_2x_model"), d.get("exchanged_vs_2x_model_run")])
        else:
            rows.append(["loopback deployment", d.get("sites", 3), 1.0, d.get("local_epochs"), d.get("error"),
                         *[None] * 7])
        slowest = median([r.get("slowest_site_s") for r in d.get("rounds", [])[1:] or d.get("rounds", [])
                          if r.get("slowest_site_s")])
        for site, v in d.get("per_message", {}).items():
            costs.append([key, site, v["messages"], v["process_s"], v["pull_s"], v["install_s"], v["load_s"],
                          v["push_s"], v["rest_s"], v["fixed_s"], slowest])
    return rows, costs


def write_deployment_result(ctx: Context, s: dict, loop: dict, notes: tuple[str, ...] = ()) -> dict:
    """``federation-deployment.{json,md}`` from the deployment's runs."""
    doc = {"rounds": s["deployment_rounds"], "data": s["data"], "phantom_scale": s["phantom"],
           "parallel_slots": ctx.machine.get("cpus_usable") or 1, "deployments": loop,
           "aims": _deployment_aims(loop)}
    rows, costs = _deployment_rows(loop)
    head = ["run", "sites", "data", "local epochs", "run wall s", "rounds wall s", "round-1 overhead",
            "overhead (median)", "overhead vs cores", "down bytes/site/round", "down+up / 2× model",
            "down+up / 2× model, whole run"]
    sections = [("Runs", table(head, rows, digits=4)), (SPLIT_HEADING, table(SPLIT_HEAD, _round_split(loop), digits=3)),
                (COSTS_HEADING, table(COSTS_HEAD, costs, digits=3)),
                ("Aims", table(["figure", "aim", "measured", "met"],
                               [[k, v["aim"], v["value"], v["met"]] for k, v in doc["aims"].items()], digits=4))]
    return write_result(ctx, "federation-deployment",
                        "Federation cost: the loopback deployment (TLS, node authentication)", doc, sections,
                        [f"{s['deployment_rounds']} rounds; data {s['data']} (the test size); SYNTHETIC phantom at scale "
                         f"{s['phantom']}. Overhead medians leave out round 1.", *_deployment_notes(doc), *notes])


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.federation_deployment [--workdir DIR] [--out DIR] [--test-size-only]``: the loopback
    deployment alone (the rest of the federation benchmark is simulation), into ``federation-deployment.{json,md}``."""
    import argparse
    import tempfile

    p = argparse.ArgumentParser(prog="python -m bench.federation_deployment",
                                description="the federation benchmark's loopback deployment alone")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                   help="results folder (default bench/results)")
    p.add_argument("--test-size-only", action="store_true",
                   help="only the test size's run (1 local epoch), for a machine too busy for the long one")
    args = p.parse_args(argv)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="braintumnet-bench-"))).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=args.out.absolute(), workdir=workdir, quick=True, device="cpu", deployment=True)
    s = run_settings(ctx)
    if args.test_size_only:
        s["deployment_heavy_epochs"] = 0
    write_deployment_result(ctx, s, run_deployment(ctx, s, ctx.phantom(s["phantom"]).out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
