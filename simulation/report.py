"""``report.md`` and a self-contained ``report.html`` from the study's ``metrics.json`` (every number shown comes from
that file)."""

from __future__ import annotations

import html
from pathlib import Path

from braintumnet.metrics import METRIC_NAMES
from braintumnet.data.contract import TUMOR_TYPES

BANNER = ("SYNTHETIC DATA: these figures come from the phantom cohort, not from patients. They show that the pipeline "
          "works; they are not clinical results.")


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _tables(doc: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    arms = [k for k in doc if k == "centralized" or k == "federated" or k.startswith("local:")]
    tables = []
    for section, title in (("internal_test", "Pooled internal test set"), ("external", "External site (never trained on)")):
        tables.append((title, ["arm", *METRIC_NAMES],
                       [[a, *(_fmt(doc[a][section].get(m)) for m in METRIC_NAMES)] for a in arms]))
    sites = sorted({s for a in arms for s in doc[a]["per_site"]})
    for metric in ("dice_tumor", "acc"):
        tables.append((f"{metric} on each site's test split (rows: model, columns: test site)", ["arm", *sites],
                       [[a, *(_fmt(doc[a]["per_site"].get(s, {}).get(metric, "")) for s in sites)] for a in arms]))
    tables.append(("Segmentation by tumour type, pooled internal test (paper Table 1)",
                   ["arm", *(f"{m}_{t}" for t in TUMOR_TYPES for m in ("dice", "hd95"))],
                   [[a, *(_fmt(doc[a]["internal_test"].get(f"{m}_tumor_{t}" + ("_mm" if m == "hd95" else ""), ""))
                          for t in TUMOR_TYPES for m in ("dice", "hd95"))] for a in arms]))
    if "federated" in doc and "centralized" in doc:
        rows = []
        for section in ("internal_test", "external"):
            fed, cen = doc["federated"][section], doc["centralized"][section]
            rows.append([section, *(_fmt(fed[m] / cen[m]) if cen.get(m) else "n/a" for m in METRIC_NAMES[:-1])])
        tables.append(("Federated / centralized ratio (1.0 = parity; for HD lower is better)",
                       ["set", *METRIC_NAMES[:-1]], rows))
    return tables


def write_report(doc: dict, out: Path) -> None:
    budget = doc["budget"]
    intro = [f"Profile `{doc['profile']}` on {doc['device']}; cases per site: "
             + ", ".join(f"{k} {v}" for k, v in doc["cases"].items()) + ".",
             f"Compute budget: centralized {budget['centralized_epochs']} epochs on the pooled data; each local arm "
             f"{budget['local_epochs_per_site']} epochs on its own site; federated {budget['federated_rounds']} "
             f"rounds x {budget['federated_local_epochs']} local epochs (every site passes over its data the same "
             "number of times in every arm).",
             "Wall time (s): " + ", ".join(f"{k} {v}" for k, v in doc["wall_s"].items()) + ".",
             "Metrics are per case (20 or fewer representative slices), then averaged: docs/metrics.md."]
    tables = _tables(doc)
    md = ["# BrainTumNet-FL study report", "", f"**{BANNER}**", "", *intro, ""]
    for title, head, rows in tables:
        md += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    (out / "report.md").write_text("\n".join(md))
    body = [f"<h1>BrainTumNet-FL study report</h1><p class=banner>{html.escape(BANNER)}</p>"]
    body += [f"<p>{html.escape(p)}</p>" for p in intro]
    for title, head, rows in tables:
        body.append(f"<h2>{html.escape(title)}</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
                    + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                                        for r in rows) + "</table>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             ".banner{background:#fee;border:1px solid #c00;padding:8px;font-weight:bold}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset=utf-8><title>BrainTumNet-FL report"
                                     f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>")
