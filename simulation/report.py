"""``report.md`` and a self-contained ``report.html`` (figures inlined) from the study's ``metrics.json``: every
number shown comes from that file.

Tables mirror the paper's (§3): 1 segmentation per tumour type, 2 classification accuracy by the region the
classifier sees (``model.gate-region`` tumor | edema | whole: one centralized model per region, trained only with
``--gate-regions``; without them the table says how to produce it), 3 classification, 4 external segmentation, 5
external classification; then the study questions (federated / centralized, federated against the best local model,
external / internal), every site's test split, and the federated / centralized ratio of every metric. The paper's
BrainTumNet values sit in their own row, marked as the paper's.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import NamedTuple

from braintumnet.config import GATE_REGIONS
from braintumnet.data.contract import TUMOR_TYPES
from braintumnet.metrics import METRIC_NAMES
from braintumnet.report.provenance import one_line as provenance_line
from simulation.paper import paper_value

BANNER = ("SYNTHETIC DATA: these figures come from the phantom cohort, not from patients. They show that the pipeline "
          "works; they are not clinical results.")
PAPER_ROW = "paper (reference, not ours)"
CLASSIFICATION = ("acc", "sensitivity", "specificity", "f1", "auc")
# The study's aims: federated / centralized >= 0.98, federated ahead of the best local model, external / internal
# >= 0.95.
AIM_PARITY, AIM_EXTERNAL = 0.98, 0.95
# And the federated model's own tumour Dice, at the profile the README's main job runs.
AIM_DICE = {"quick": 0.80}
# Arms that differ from the centralized one only in the region the classifier sees (Table 2): "gate:<region>".
GATE_ARM = "gate:"
REGION_NAMES = {"tumor": "tumour", "edema": "edema", "whole": "whole lesion"}


class Table(NamedTuple):
    title: str
    head: list[str]
    rows: list[list[str]]
    note: str = ""  # a paragraph under the table (or instead of it, when there are no rows)


def arms_of(doc: dict) -> list[str]:
    return [k for k in doc if k in ("centralized", "federated") or k.startswith(("local:", "federated:"))]


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _cell(doc: dict, arm: str, section: str, metric: str, site: str | None = None) -> str:
    node = doc[arm][section] if site is None else doc[arm][section].get(site, {})
    value = _number(node.get(metric))
    if value is None:
        return "n/a"
    sd_node = doc.get("sd", {}).get(arm, {}).get(section, {})
    sd = _number((sd_node if site is None else sd_node.get(site, {})).get(metric))
    text = f"{value:.3f}" if metric != "n_cases" else f"{value:.0f}"
    return f"{text} ± {sd:.3f}" if doc.get("n_repetitions", 1) > 1 and sd is not None and metric != "n_cases" else text


def _paper(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "—"


def _has(doc: dict, section: str) -> bool:
    return any(doc[a].get(section) for a in arms_of(doc))


def _tables(doc: dict) -> list[Table]:
    arms = arms_of(doc)
    tables = [("Study questions", ["question", "measured", "aim", "met?"], _questions(doc))]

    types = [t for t in TUMOR_TYPES if any(f"dice_tumor_{t}" in doc[a]["internal_test"] for a in arms)]
    rows = []
    for a in arms:
        for t in types:
            rows.append([a, t, *(_cell(doc, a, "internal_test", f"{m}_tumor_{t}{u}")
                                 for m, u in (("dice", ""), ("iou", ""), ("hd95", "_mm"), ("hd", "_mm")))])
    for t in ("glioma", "meningioma"):
        rows.append([PAPER_ROW, t, _paper(paper_value("table1", t, "dice")), _paper(paper_value("table1", t, "iou")),
                     "—", _paper(paper_value("table1", t, "hd"))])
    tables.append(("Table 1. Tumour segmentation by tumour type, pooled internal test",
                   ["arm", "type", "DSC", "IoU", "HD95 (mm)", "HD (mm)"], rows))

    tables.append(_table2(doc))

    rows = [[a, *(_cell(doc, a, "internal_test", m) for m in CLASSIFICATION)] for a in arms]
    rows.append([PAPER_ROW, *(_paper(paper_value("table3", m)) for m in CLASSIFICATION)])
    tables.append(("Table 3. Classification (case level), pooled internal test",
                   ["arm", "ACC", "sensitivity", "specificity", "F1", "AUC"], rows))

    if _has(doc, "external"):
        rows = [[a, *(_cell(doc, a, "external", m) for m in ("dice_tumor", "iou_tumor", "hd95_tumor_mm",
                                                               "hd_tumor_mm", "dice_whole", "n_cases"))]
                for a in arms]
        rows.append([PAPER_ROW, _paper(paper_value("table4", "dice")), _paper(paper_value("table4", "iou")), "—",
                     _paper(paper_value("table4", "hd")), "—", "51"])
        tables.append((f"Table 4. External site ({doc['sites']['external']}, never trained on): segmentation",
                       ["arm", "DSC", "IoU", "HD95 (mm)", "HD (mm)", "DSC whole", "cases"], rows))
        rows = [[a, *(_cell(doc, a, "external", m) for m in CLASSIFICATION)] for a in arms]
        rows.append([PAPER_ROW, *(_paper(paper_value("table5", m)) for m in CLASSIFICATION)])
        tables.append(("Table 5. External site: classification", ["arm", "ACC", "sensitivity", "specificity", "F1",
                                                                  "AUC"], rows))

    sites = doc["sites"]["internal"]
    for metric in ("dice_tumor", "acc"):
        tables.append((f"{metric} on each site's test split (rows: model; columns: test site)", ["arm", *sites],
                       [[a, *(_cell(doc, a, "per_site", metric, s) for s in sites)] for a in arms]))
    if "federated" in doc and "centralized" in doc:
        rows = []
        for section in ("internal_test", "external"):
            if doc["federated"].get(section) and doc["centralized"].get(section):
                fed, cen = doc["federated"][section], doc["centralized"][section]
                rows.append([section, *(_ratio(fed.get(m), cen.get(m)) for m in METRIC_NAMES[:-1])])
        tables.append(("Federated / centralized, every metric (1.0 = parity; for HD lower is better)",
                       ["set", *METRIC_NAMES[:-1]], rows))
    if "validation" in doc.get(arms[0], {}):
        tables.append(("Cross-validation: each fold's held-out training cases",
                       ["arm", *METRIC_NAMES[:-1]],
                       [[a, *(_cell(doc, a, "validation", m) for m in METRIC_NAMES[:-1])] for a in arms]))
    return [Table(*t) for t in tables]


def _table2(doc: dict) -> Table:
    """Classification by the region the classifier sees, one centralized model per region (``gate_regions`` in
    metrics.json maps each region to its arm); without those models, how to train them."""
    title = "Table 2. Classification (case level) by the region the classifier sees, centralized, pooled internal test"
    regions = doc.get("gate_regions") or {}
    if not regions:
        return Table(title, [], [], "Not run: it needs one centralized model per region, two more trainings than "
                     f"this run. Add --gate-regions to the run's command, e.g. `python -m simulation --profile "
                     f"{doc.get('profile', 'standard')} --gate-regions`.")
    external = any(doc[a].get("external") for a in regions.values())
    head = ["arm", "classifier sees", "ACC", "AUC (macro)", *(["external ACC", "external AUC"] if external else [])]
    rows = []
    for region in [r for r in GATE_REGIONS if r in regions]:
        a = regions[region]
        rows.append([a, REGION_NAMES[region], *(_cell(doc, a, "internal_test", m) for m in ("acc", "auc")),
                     *((_cell(doc, a, "external", m) for m in ("acc", "auc")) if external else ())])
    for region in GATE_REGIONS:
        rows.append([PAPER_ROW, REGION_NAMES[region], _paper(paper_value("table2", region)), "—",
                     *(["—", "—"] if external else [])])
    return Table(title, head, rows, "Each model is the centralized arm's with `model.gate-region` set to the region "
                 "(the classifier sees the image weighted by the segmenter's soft mask of that region); "
                 f"arms `{GATE_ARM}<region>` in metrics.json. The paper's values are its five-fold means of an "
                 "accuracy it does not define further.")


def _ratio(a, b) -> str:
    a, b = _number(a), _number(b)
    return f"{a / b:.3f}" if a is not None and b else "n/a"


# Below these a model has not learned the task (Dice of an empty prediction; chance accuracy with three classes), and
# a ratio against it says nothing: 0.007 / 0.000 "holds" perfectly on the external site.
LEARNED_FLOOR = {"dice_tumor": 0.05, "acc": 0.40}


def _verdict(ratio: str, aim: float, denominator, metric: str, what: str) -> str:
    value = _number(denominator)
    if value is not None and value < LEARNED_FLOOR[metric]:
        return f"n/a: {what} {metric} {value:.3f} is below {LEARNED_FLOOR[metric]} (not learned)"
    return "yes" if ratio != "n/a" and float(ratio) >= aim else "no"


def _questions(doc: dict) -> list[list[str]]:
    rows = []
    cen = doc.get("centralized", {}).get("internal_test")
    federated = [a for a in arms_of(doc) if a == "federated" or a.startswith("federated:")]
    locals_ = [a for a in arms_of(doc) if a.startswith("local:")]
    for arm in federated:
        fed = doc[arm].get("internal_test")
        aim = AIM_DICE.get(doc.get("profile"))
        if fed and aim is not None and _number(fed.get("dice_tumor")) is not None:
            dice = _number(fed["dice_tumor"])
            rows.append([f"{arm}, dice_tumor (internal)", f"{dice:.3f}", f">= {aim:.2f} ({doc['profile']})",
                         "yes" if dice >= aim else f"no (by {aim - dice:.3f})"])
        for metric in ("dice_tumor", "acc"):
            if fed and cen:
                r = _ratio(fed.get(metric), cen.get(metric))
                met = _verdict(r, AIM_PARITY, cen.get(metric), metric, "centralized")
                rows.append([f"{arm} / centralized, {metric} (internal)", r, f">= {AIM_PARITY}", met])
        if fed and locals_:
            for metric in ("dice_tumor", "acc"):
                best = max(locals_, key=lambda a: _number(doc[a]["internal_test"].get(metric)) or -1)
                f, b = _number(fed.get(metric)), _number(doc[best]["internal_test"].get(metric))
                rows.append([f"{arm} vs best local-only ({best}), {metric} (internal)",
                             f"{f:.3f} vs {b:.3f}" if f is not None and b is not None else "n/a", "federated ahead",
                             "yes" if f is not None and b is not None and f > b else "no"])
    for arm in (*federated, "centralized"):
        if arm in doc and doc[arm].get("external"):
            for metric in ("dice_tumor", "acc"):
                r = _ratio(doc[arm]["external"].get(metric), doc[arm]["internal_test"].get(metric))
                rows.append([f"external / internal, {arm}, {metric}", r, f">= {AIM_EXTERNAL}",
                             _verdict(r, AIM_EXTERNAL, doc[arm]["internal_test"].get(metric), metric, "internal")])
    return rows


def _steps_line(budget: dict) -> str:
    fed = budget["federated_steps_per_site"]
    ratio = max(fed.values()) / max(budget["centralized_steps"], 1)
    batches = (f" (batches of {budget['batch_size']} pooled, {budget['site_batch_size']} at a site)"
               if "site_batch_size" in budget else "")
    return (f"Equal epochs are not equal optimizer steps: the centralized model takes {budget['centralized_steps']} "
            "Adam steps; each local arm and each federated site "
            + ", ".join(f"{site} {n}" for site, n in fed.items()) + batches
            + ". FedAvg's global model moves each round by the sites' average step, not their sum, so it travels "
            f"about {max(fed.values())} steps ({ratio:.2f}x centralized) with lower-variance gradients. "
            + ("Where the centralized model is still improving at the end of its schedule, expect the federated one "
               "behind it for that reason alone." if ratio < 0.8 else
               "Each site's smaller batch (train.site-batch-size) keeps that near the pooled count."))


def _intro(doc: dict) -> list[str]:
    budget = doc["budget"]
    reps = doc.get("repetitions", [])
    lines = [f"Profile `{doc['profile']}` on {doc['device']}; cases per site: "
             + ", ".join(f"{k} {v}" for k, v in doc["cases"].items()) + ".",
             *([f"Provenance: {provenance_line(doc['provenance'])}"] if doc.get("provenance") else []),
             f"Compute budget: centralized {budget['centralized_epochs']} epochs on the pooled data; each local arm "
             f"{budget['local_epochs_per_site']} epochs on its own site; federated {budget['federated_rounds']} "
             f"rounds x {budget['federated_local_epochs']} local epochs. Every site passes over its own training data "
             "the same number of times in every arm (rounds x local epochs = centralized epochs).",
             *([_steps_line(budget)] if "centralized_steps" in budget else []),
             f"Repetitions: {len(reps)} ("
             + ", ".join(f"seed {r['seed']}" + (f" fold {r['fold'] + 1}/{doc['folds']}" if r.get('fold') is not None
                                                else "") for r in reps)
             + "); cells show the mean" + (" ± sd" if len(reps) > 1 else "") + " over them.",
             *([_reused_line(doc["reused"])] if doc.get("reused") else []),
             *(["Differential privacy (DP-SGD, docs/privacy.md) is on in the federated arm only: it protects what "
                "leaves a site; the centralized and local-only arms never send anything."]
               if doc.get("config", {}).get("privacy.enabled") else []),
             "Wall time (s): " + ", ".join(f"{k} {v}" for k, v in doc["wall_s"].items()) + "."
             + _workers_note(doc.get("provenance", {}).get("workers")),
             "How metrics are computed (docs/metrics.md): every test and external case on the whole scan (every axial "
             "slice inside the head, chosen without the labels), in 3-D on the scan's own grid, "
             + _postprocess_phrase(doc.get("config", {}).get("model.postprocess"))
             + ", then averaged over cases; Dice and IoU of the foreground (IoU <= Dice always, so the paper's IoU "
             "0.921 above its DSC 0.91 cannot be a per-case foreground IoU); HD and HD95 in mm, 374 mm where exactly "
             "one of prediction and reference is empty (BraTS); classification at case level (mean of the slices' "
             "probabilities weighted by the tumour area the model predicts on each); sensitivity, specificity, F1 "
             "and AUC macro-averaged one-vs-rest.",
             "Rows marked 'paper' are the values the paper's text quotes for BrainTumNet on its patients, for "
             "reference only; they are not results of this study."]
    return lines


def _postprocess_phrase(rule: str | None) -> str:
    """How the scored labels were cleaned; a study written before the rule existed scored the network's labels."""
    if rule == "largest-lesion":
        return "after the model's post-processing (only the largest connected lesion of the scan kept)"
    return "the network's labels as they are (no post-processing)"


def _reused_line(reused: list[dict]) -> str:
    """Whole repetitions, then single arms (grouped by repetition and commit) taken from an earlier run."""
    groups: dict[tuple, list[dict]] = {}
    for r in reused:
        groups.setdefault((r["seed"], r.get("fold"), r.get("commit"), "arm" in r, r.get("scored_with"),
                           tuple(sorted((r.get("scored_again") or {}).items()))), []).append(r)
    parts = []
    for (seed, fold, commit, single, scored_with, within), entries in groups.items():
        arms = f" ({', '.join(e['arm'] for e in entries)})" if single else ""
        finished = max(str(e.get("finished")) for e in entries)
        again = f", {_scored_again(scored_with)}" if scored_with else ""
        for rule in dict.fromkeys(r for _, r in within):  # a whole repetition some of whose arms were scored again
            again += f"; {', '.join(arm for arm, r in within if r == rule)} {_scored_again(rule)}"
        parts.append(f"seed {seed}" + (f" fold {fold + 1}" if fold is not None else "") + arms
                     + f", finished {finished} at commit {commit}{again}")
    return ("Reused from an earlier run into this folder (the same settings; simulation/saved.py): "
            + "; ".join(parts) + ". Their arms' wall times are those of that run and count in the arms' figures; "
            "the total is this run's alone.")


def _scored_again(rule: str) -> str:
    return f"scored again from the kept models with this study's post-processing (they had been scored with '{rule}')"


def _md_table(title: str, head: list[str], rows: list[list[str]], note: str = "") -> list[str]:
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows),
             ""] if rows else []
    return [f"## {title}", "", *table, *([note, ""] if note else [])]


def write_report(doc: dict, out: Path) -> None:
    out = Path(out)
    synthetic = doc.get("synthetic", False)
    tables, intro, figures = _tables(doc), _intro(doc), doc.get("figures", [])
    md = ["# BrainTumNet-FL study report", ""]
    md += [f"**{BANNER}**", ""] if synthetic else []
    md += [*intro, ""]
    for title, head, rows, note in tables:
        md += _md_table(title, head, rows, note)
    if figures:
        md += ["## Figures", ""] + [f"![{f['title']}]({f['path']})" for f in figures] + [""]
    (out / "report.md").write_text("\n".join(md))

    body = ["<h1>BrainTumNet-FL study report</h1>"]
    body += [f"<p class=banner>{html.escape(BANNER)}</p>"] if synthetic else []
    body += [f"<p>{_inline_code(html.escape(p))}</p>" for p in intro]
    for title, head, rows, note in tables:
        body.append(f"<h2>{html.escape(title)}</h2>")
        if rows:
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                        + "</table>")
        if note:
            body.append(f"<p>{_inline_code(html.escape(note))}</p>")
    if figures:
        body.append("<h2>Figures</h2>")
        for f in figures:
            data = base64.b64encode((out / f["path"]).read_bytes()).decode()
            body.append(f"<figure><img alt='{html.escape(f['title'])}' src='data:image/png;base64,{data}'>"
                        f"<figcaption>{html.escape(f['title'])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "img{max-width:100%}figure{margin:1em 0}"
             ".banner{background:#fee;border:1px solid #c00;padding:8px;font-weight:bold}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset=utf-8><title>BrainTumNet-FL report"
                                     f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>")


def _inline_code(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def _workers_note(workers: dict | None) -> str:
    """With ``--jobs``, the arms' times overlap: say so beside them."""
    if not workers:
        return ""
    return (f" {workers['processes']} worker processes ({workers['torch_threads']} torch thread(s) each) trained the "
            "centralized and local-only arms while the federated arm ran, so those arms' times overlap and were "
            "measured on shared cores; the total is the study's.")

