"""Cross-validation folds: per site, case level, seeded, and the same at a federated site as in the study."""

import dataclasses
from pathlib import Path

import pytest

from braintumnet.config import ConfigError, resolve
from braintumnet.data.contract import class_names
from braintumnet.data.dataset import select_slices
from braintumnet.data.folds import site_folds, training_cases_without_fold
from braintumnet.data.loading import SiteRuntime
from braintumnet.site_round import cross_validation_cases

CLASSES = class_names("3class")


def test_folds_partition_the_training_cases_and_repeat_with_the_seed(prepared_sites):
    site = prepared_sites["plagh"]
    train = set(select_slices([site], "train", CLASSES)["case_id"])
    folds = site_folds(site, CLASSES, 3, seed=7)
    assert sorted(c for f in folds for c in f) == sorted(train)  # every case in exactly one fold
    assert folds == site_folds(site, CLASSES, 3, seed=7)  # the same seed, the same folds, in any process
    for i, held in enumerate(folds):
        assert set(training_cases_without_fold(site, CLASSES, 3, i, seed=7)) == train - set(held)


def test_a_federated_site_leaves_out_the_fold_the_study_holds_out(prepared_sites, tiny_run_config):
    site = prepared_sites["yibin"]
    profile = resolve({**tiny_run_config, "cv.folds": 3, "cv.fold": 2, "train.seed": 5})
    runtime = SiteRuntime(name="yibin", data=None, cache=Path("unused"))
    cases = cross_validation_cases(site, profile, runtime)
    held = site_folds(site, CLASSES, 3, seed=5)[1]  # the study's fold index 1 is cv.fold 2
    assert not set(cases) & set(held) and cases
    no_cv = dataclasses.replace(profile, train=dataclasses.replace(profile.train, cv_folds=0, cv_fold=0))
    assert cross_validation_cases(site, no_cv, runtime) is None


@pytest.mark.parametrize("folds, fold", [(1, 1), (3, 0), (3, 4)])
def test_bad_fold_settings_name_the_keys(tiny_run_config, folds, fold):
    with pytest.raises(ConfigError, match="cv.folds"):
        resolve({**tiny_run_config, "cv.folds": folds, "cv.fold": fold})
