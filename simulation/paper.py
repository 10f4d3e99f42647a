"""The paper's own BrainTumNet figures, shown beside ours as a reference (never as our result).

Transcribed from the text of the paper (its §3 and abstract): the tables themselves are images the text does not
carry, so only the BrainTumNet values its sentences quote are here, each with where it comes from. The paper's metric
definitions are not ours (docs/metrics.md): its IoU 0.921 above its DSC 0.91 cannot be a per-case foreground IoU and
its HD has no unit or percentile. Its Table 2 is classification accuracy by the region the classifier sees (tumour,
edema, whole); ours is the same measurement (``--gate-regions``), case-level accuracy and AUC per region.
"""

from __future__ import annotations

# table -> row -> metric -> (value, source)
PAPER = {
    "table1": {
        "glioma": {"dice": (0.902, "§3: 'mean DSC of 0.902 on the test set' (glioma paragraph)"),
                   "hd": (12.13, "§3: 'HD ... 12.13' (no unit given)")},
        "meningioma": {"dice": (0.914, "§3: 'IoU of 0.92 and DSC of 0.914'"),
                       "iou": (0.92, "§3, same sentence")},
        "all": {"dice": (0.91, "abstract"), "iou": (0.921, "abstract (above its DSC: not a foreground IoU)"),
                "hd": (12.13, "abstract")},
    },
    "table2": {  # five-fold means, classification accuracy per input region
        "tumor": (0.926, "§3: folds 0.91, 0.94, 0.93, 0.92, 0.93"),
        "edema": (0.85, "§3: folds 0.87, 0.83, 0.86, 0.85, 0.85"),
        "whole": (0.872, "§3: folds 0.89, 0.83, 0.91, 0.85, 0.87"),
    },
    "table3": {"acc": (0.934, "abstract (0.93 in §3)"), "f1": (0.912, "conclusion (0.89 in §3)"),
               "auc": (0.964, "§3 and conclusion")},
    "table4": {"dice": (0.921, "§3: external 'DSC of 92.1%'"), "iou": (0.91, "§3: external 'IoU of 91%'"),
               "hd": (11.47, "§3: external 'HD of 11.47'")},
    "table5": {"acc": (0.92, "§3: external accuracy 0.92"), "auc": (0.964, "§3: external AUC 0.964")},
}


def paper_value(table: str, *keys: str) -> float | None:
    node = PAPER.get(table, {})
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node[0] if isinstance(node, tuple) else None
