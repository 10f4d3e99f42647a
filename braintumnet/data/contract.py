"""The site data contract (docs/data.md): the file layout of a site folder, with the labels, tumour types, tasks and
site names of ``braintumnet.labels`` handed on, so the readers and the phantom cohort find every name here."""

from __future__ import annotations

from braintumnet.labels import (  # noqa: F401 (handed on: the contract's names)
    EDEMA_LABEL,
    EXTERNAL_SITE,
    LABELS,
    SITES,
    TASKS,
    TUMOR_TYPES,
    TUMOUR_LABEL,
    class_names,
)

MODALITY = "CE-T1"
SPLITS = ("train", "test")
CASES_COLUMNS = ("case_id", "image", "mask", "tumor_type", "split")
# Optional columns a site may add to cases.csv; kept in the cache index, never sent to the server.
SCANNER_COLUMNS = ("field_strength_t", "manufacturer", "scanner_model", "slice_thickness_mm")

# --- File layout of a site folder (docs/data.md, "The site folder") ---
DATASET_JSON = "dataset.json"
CASES_CSV = "cases.csv"
# The one orientation every volume is turned into on reading: array axes (X, Y, Z) run towards the patient's Right,
# Anterior and Superior (nibabel's "closest canonical"), so axial slices are ``volume[:, :, z]``.
CANONICAL_AXES = ("R", "A", "S")
