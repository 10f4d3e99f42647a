"""Data stages: the site contract, readers, checks, preprocessing, the prepared cache and the phantom cohort."""
