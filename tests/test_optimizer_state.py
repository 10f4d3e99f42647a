"""A site's Adam state between federated rounds (braintumnet.optimizer_state), on the tiny synthetic cohort.

Why it exists: on the quick study, centralized training cut into 10 chunks of 3 epochs with a fresh Adam per chunk
ended at tumour Dice 0.000 where one Adam over the same 30 epochs reached 0.233.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from braintumnet.engine import build_model, train_model
from braintumnet.optimizer_state import OptimizerMemory, make_optimizer

CPU = torch.device("cpu")


def _two_rounds(profile, site, second_round_optimizer):
    """Round 1 then round 2 of a 2-round, 1-epoch-per-round schedule from the same initial weights."""
    torch.manual_seed(0)
    model = build_model(profile)
    first = make_optimizer(model, profile.train.learning_rate)
    train_model(model, [site], profile, CPU, epochs=1, epoch_offset=0, total_epochs=2, progress=False,
                optimizer=first)
    second = second_round_optimizer(model, first)
    train_model(model, [site], profile, CPU, epochs=1, epoch_offset=1, total_epochs=2, progress=False,
                optimizer=second)
    return model.state_dict()


def test_saved_and_restored_adam_continues_exactly_and_differs_from_a_fresh_one(prepared_sites, tiny_profile,
                                                                               tmp_path):
    site = prepared_sites["plagh"]
    memory = OptimizerMemory(tmp_path, "plagh", "federation-1")

    def through_the_file(model, first):
        memory.save(first)
        restored = make_optimizer(model, tiny_profile.train.learning_rate)
        assert memory.restore(restored)
        return restored

    kept_in_memory = _two_rounds(tiny_profile, site, lambda model, first: first)
    through_file = _two_rounds(tiny_profile, site, through_the_file)
    fresh = _two_rounds(tiny_profile, site, lambda model, first: make_optimizer(model, 1e-4))
    assert memory.path == tmp_path / "optimizer" / "plagh" / "federation-1.pt"
    assert all(torch.equal(kept_in_memory[k], through_file[k]) for k in kept_in_memory)
    assert any(not torch.equal(kept_in_memory[k], fresh[k]) for k in kept_in_memory if k.endswith("weight"))
    memory.forget()
    assert not memory.path.exists()


def test_an_unusable_state_file_is_named_and_adam_starts_afresh(tmp_path, caplog):
    memory = OptimizerMemory(tmp_path, "../yibin", "f/1")
    assert memory.path.parent.parent == tmp_path / "optimizer"  # names cannot climb out of the cache
    other = nn.Linear(3, 2)  # as many parameters as below, other shapes
    step = make_optimizer(other, 1e-3)
    other(torch.ones(1, 3)).sum().backward()
    step.step()
    memory.save(step)
    target = make_optimizer(nn.Linear(2, 3), 1e-3)
    with caplog.at_level(logging.WARNING):
        assert not memory.restore(target)
    assert str(memory.path) in caplog.text and "shape" in caplog.text
    assert not target.state  # nothing half-loaded

    memory.path.write_bytes(b"not a torch file")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert not memory.restore(target)
    assert str(memory.path) in caplog.text and "starts afresh" in caplog.text
    assert not OptimizerMemory(tmp_path, "plagh", "new").restore(target)  # the first round: no file, no warning
