"""The study's cohort (its phase 1): the SYNTHETIC phantom cohort at the profile's scale, or a user's pooled dataset
split by hospital (simulation/pooled.py)."""

from __future__ import annotations

from pathlib import Path

from braintumnet.data.phantom import complete_cohort, generate_cohort
from simulation.pooled import StudySites, phantom_sites, split_pooled

# Phantom scale per profile: quick fits 15 minutes on 2 cores; paper is the paper's 485 + 51 cases.
PHANTOM_SCALE = {"quick": 0.1, "standard": 0.3, "paper": 1.0}
# The test and external sets a profile holds out, where its own scale gives too few cases to compare models on: at
# 0.1 they are 11 and 5 cases, on which an accuracy moves in steps of 0.09 and 0.2 while the study's aims compare
# models within 0.02. quick scores on sets of standard's size and type mix, 33 and 15 cases (test-only cases added;
# the training cases unchanged): 32 more cases for the phantom to write, and seconds of scoring an arm.
PHANTOM_TEST_SCALE = {"quick": 0.3}

# The phantom is the study's data, not part of a repetition: the same cohort whatever seeds repeat the training, so
# that arms trained for other seeds (on another machine, or in a later run) were trained and scored on the same cases.
PHANTOM_SEED = 0


def cohort_scales(profile_name: str, scale: float | None) -> tuple[float, float | None]:
    """The phantom's (scale, test_scale) for a profile: a ``scale`` given on the command line is the whole cohort's
    (training and test cases alike); otherwise the profile's scale and, where it has one, its larger test scale."""
    if scale:
        return scale, None
    return PHANTOM_SCALE.get(profile_name, 0.1), PHANTOM_TEST_SCALE.get(profile_name)


def study_cohort(out: Path, profile_name: str, phantom, data, site_column, external, scale, say) -> StudySites:
    """Phase 1: the sites' folders: ``data`` (a pooled dataset) split by ``site_column`` into ``out/sites``, else the
    phantom cohort in ``phantom`` (written there, or to ``out/phantom``, unless a finished one is there; always
    :data:`PHANTOM_SEED`). ``say``: the study's progress line."""
    if data is not None:
        say(f"phase 1/5 cohort: splitting {data} by its {site_column!r} column into {out / 'sites'}")
        layout = split_pooled(Path(data), site_column, out / "sites", external)
        say(f"  training hospitals: {', '.join(layout.internal)}; external: {layout.external or 'none'}")
        return layout
    phantom = Path(phantom).absolute() if phantom else out / "phantom"
    wanted = cohort_scales(profile_name, scale)
    found = complete_cohort(phantom)
    if found is None:
        scale, test_scale = wanted
        say(f"phase 1/5 cohort: writing the SYNTHETIC phantom cohort (scale {scale}"
            + (f", test and external sets at {test_scale}" if test_scale else "") + f") to {phantom}")
        summary = generate_cohort(phantom, scale=scale, seed=PHANTOM_SEED, progress=False,
                                  test_scale=test_scale).summary()
        say("  " + summary.replace("\n", "\n  "))
    else:
        say(f"phase 1/5 cohort: reusing the SYNTHETIC phantom cohort {phantom}")
        have = (found.get("scale"), found.get("test_scale"))
        if scale is None and have != wanted:  # e.g. a folder written before quick held out larger test sets
            say(f"  note: it was written at scale {have[0]}, test scale {have[1]}; the {profile_name} profile "
                f"writes scale {wanted[0]}, test scale {wanted[1]}: its figures are not the profile's (a new --out or "
                "--phantom folder writes a fresh cohort)")
    return phantom_sites(phantom)
