"""The phantom cohort: a synthetic stand-in for the paper's three-hospital CE-T1 cohort (§2.1.1), NOT patient data.

No public dataset has glioma, metastasis and meningioma with hospital ids, and nothing can be downloaded at run time,
so the project draws its own cohort in the site data contract (docs/data.md; how it is drawn: docs/phantom.md):

- ``cohort_plan(scale, seed, test_scale=None)``: one row per case (site, type, split, atypical tag, scanner), no images;
- ``generate_cohort(out, scale=..., seed=..., fmt="nifti" | "dicom", preview=..., test_scale=...)``: the site folders
  on disk;
- ``complete_cohort(root)``: whether (and with what settings) a finished cohort is in ``root``.
"""

from braintumnet.data.phantom.cohort import CohortSummary, complete_cohort, generate_cohort
from braintumnet.data.phantom.plan import cohort_plan, held_out_scale

__all__ = ["CohortSummary", "cohort_plan", "complete_cohort", "generate_cohort", "held_out_scale"]
