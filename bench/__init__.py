"""Benchmarks of BrainTumNet-FL: model compute, accuracy against baselines and ablations, federation cost,
the data pipeline, and a GPU script. ``python -m bench [--quick]``; results in ``bench/results/<name>.json|.md``.

Every comparison runs side by side in one process run (repetitions interleaved, medians taken) and is reported as a
ratio against BrainTumNet, so a loaded machine slows every arm alike. Accuracy figures come from the synthetic
phantom cohort and are not clinical results.
"""
