"""The site data contract (docs/data.md): names shared by the readers, the phantom cohort and the tasks."""

from __future__ import annotations

MODALITY = "CE-T1"
SITES = ("yibin", "plagh", "jinling")  # the paper's three hospitals (§2.1.1)
EXTERNAL_SITE = "external"  # the 51-case external validation cohort, never trained on
TUMOR_TYPES = ("glioma", "metastasis", "meningioma")
LABELS = {0: "background", 1: "tumour (enhancing + necrotic core)", 2: "peritumoral edema"}
SPLITS = ("train", "test")
CASES_COLUMNS = ("case_id", "image", "mask", "tumor_type", "split")
# Optional columns a site may add to cases.csv; kept in the cache index, never sent to the server.
SCANNER_COLUMNS = ("field_strength_t", "manufacturer", "scanner_model", "slice_thickness_mm")

# The classification task picks which tumour types are classes (config key `task`).
TASKS = {
    "3class": ("glioma", "metastasis", "meningioma"),
    "binary": ("glioma", "metastasis"),
}


def class_names(task: str) -> tuple[str, ...]:
    """Class names, in index order, for a task name (``3class`` or ``binary``)."""
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}: use one of {sorted(TASKS)}") from None

# --- File layout of a site folder (docs/data.md, "The site folder") ---
DATASET_JSON = "dataset.json"
CASES_CSV = "cases.csv"
TUMOUR_LABEL = 1  # a usable case has at least one voxel of it
EDEMA_LABEL = 2
# The one orientation every volume is turned into on reading: array axes (X, Y, Z) run towards the patient's Right,
# Anterior and Superior (nibabel's "closest canonical"), so axial slices are ``volume[:, :, z]``.
CANONICAL_AXES = ("R", "A", "S")
