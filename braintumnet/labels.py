"""The names every layer of the core shares, in the lowest module so that each can import them: the label values of
a mask, the regions scored and gated on, the tumour types and the classification tasks, and the cohort's hospitals.

The site data contract (``braintumnet.data.contract``, docs/data.md) hands these on with its file layout; the
configuration, the model and the metrics import them from here.
"""

from __future__ import annotations

TUMOUR_LABEL = 1  # a usable case has at least one voxel of it
EDEMA_LABEL = 2
LABELS = {0: "background", TUMOUR_LABEL: "tumour (enhancing + necrotic core)", EDEMA_LABEL: "peritumoral edema"}
#: The regions of a mask and the labels each one unites: scored by the metrics, and the region that gates the
#: classifier (``model.gate-region``).
REGIONS: dict[str, tuple[int, ...]] = {"tumor": (TUMOUR_LABEL,), "edema": (EDEMA_LABEL,),
                                       "whole": (TUMOUR_LABEL, EDEMA_LABEL)}

TUMOR_TYPES = ("glioma", "metastasis", "meningioma")
# The classification task picks which tumour types are classes (config key `task`).
TASKS = {
    "3class": ("glioma", "metastasis", "meningioma"),
    "binary": ("glioma", "metastasis"),
}

SITES = ("yibin", "plagh", "jinling")  # the paper's three hospitals (§2.1.1)
EXTERNAL_SITE = "external"  # the 51-case external validation cohort, never trained on


def class_names(task: str) -> tuple[str, ...]:
    """Class names, in index order, for a task name (``3class`` or ``binary``)."""
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}: use one of {sorted(TASKS)}") from None
