"""``resume-from=latest`` resumes the newest checkpoint only when every run folder belongs to one federation."""

from __future__ import annotations

import os

import pytest
import torch

from braintumnet.config import resolve
from braintumnet.errors import BrainTumNetError
from server.checkpoints import RunFolder, find_resume_point

STATE = {"w": torch.zeros(2)}


def _save(root, run_id: int, federation: str, server_round: int, age_s: float = 0.0):
    path = RunFolder(root, run_id).save_round(server_round, STATE, resolve({}), ("glioma", "metastasis"),
                                              {"federation-id": federation, "round": server_round}, best=False)
    stamp = path.stat().st_mtime - age_s
    os.utime(path, (stamp, stamp))  # latest.pt is a hard link: the same file, the same time
    return path


def test_latest_among_several_federations_is_refused(tmp_path):
    """The newest latest.pt was taken whatever its federation, carrying that federation's id onto another's run."""
    _save(tmp_path, 7, "aaaa", server_round=3, age_s=60)
    _save(tmp_path, 8, "bbbb", server_round=1)
    with pytest.raises(BrainTumNetError) as info:
        find_resume_point(tmp_path, "latest")
    message = str(info.value)
    assert "2 federations" in message
    assert "federation aaaa: run-7 (round 3)" in message and "federation bbbb: run-8 (round 1)" in message
    assert "resume-from='run-8'" in message
    point = find_resume_point(tmp_path, "run-7")  # naming one works
    assert point.round == 3 and point.meta["federation-id"] == "aaaa"

    # A resumed federation has several run folders, all with its id: there latest is its newest round.
    one = tmp_path / "one"
    _save(one, 7, "aaaa", server_round=3, age_s=60)
    _save(one, 8, "aaaa", server_round=5)
    point = find_resume_point(one, "latest")
    assert point.round == 5 and point.path.parent.name == "run-8"


def test_a_checkpoint_without_a_federation_id_makes_latest_ambiguous(tmp_path):
    _save(tmp_path, 7, "aaaa", server_round=3, age_s=60)
    _save(tmp_path, 8, "", server_round=2)
    with pytest.raises(BrainTumNetError, match=r"unknown \(run-8: no federation id in its meta\)"):
        find_resume_point(tmp_path, "latest")
