"""DP-SGD at a site (braintumnet.privacy with braintumnet.engine): plain keys, cumulative ε, the budget, the checks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from braintumnet.config import ConfigError, PrivacyConfig, resolve
from braintumnet.engine import build_model, train_model
from braintumnet.errors import BrainTumNetError
from braintumnet.privacy import PrivacyBudgetSpent, PrivacyLedger, PrivateTraining, epsilon, noise_for_target

CPU = torch.device("cpu")


def dp_profile(tiny_profile, **dp):
    return replace(tiny_profile, privacy=PrivacyConfig(enabled=True, **{"noise_multiplier": 1.0, **dp}))


def one_round(profile, site, state, ledger, server_round, federation="fed-1"):
    """What a fresh ClientApp process does: rebuild the model, read the ledger, train, append to the ledger."""
    model = build_model(profile)
    model.load_state_dict(state)
    with ledger.locked():
        before = ledger.history(federation)
        dp = PrivateTraining(profile.privacy, before)
        train_model(model, [site], profile, CPU, epochs=1, epoch_offset=server_round - 1, total_epochs=3,
                    progress=False, privacy=dp)
        ledger.record(dp, federation_id=federation, run_id="1", server_round=server_round, before=before)
    return model, dp


def federation_history(ledger, federation):
    with ledger.locked():
        return ledger.history(federation)


def test_dp_sgd_keeps_the_plain_keys_and_epsilon_accumulates_across_processes(prepared_sites, tiny_profile,
                                                                              tmp_path):
    profile = dp_profile(tiny_profile)
    site = prepared_sites["yibin"]
    initial = build_model(profile).state_dict()
    ledger = PrivacyLedger(tmp_path, "yibin")

    model, first = one_round(profile, site, initial, ledger, 1)
    state = model.state_dict()
    assert list(state) == list(initial)  # Opacus unwrapped: no "_module." prefix, FedAvg and checkpoints unchanged
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())  # no Opacus hooks left behind
    assert any(not torch.equal(state[k], initial[k]) for k in state)

    replay, _ = one_round(profile, site, initial, ledger, 1, federation="replay")
    assert any(not torch.equal(replay.state_dict()[k], state[k]) for k in state)  # same seed, other noise/batches

    _, second = one_round(profile, site, state, PrivacyLedger(tmp_path, "yibin"), 2)
    assert 0 < first.epsilon < second.epsilon  # restored from the ledger, not started again from 0
    assert second.history[-1][2] == 2 * first.history[-1][2]  # same σ and q: Opacus merged the steps
    assert federation_history(ledger, "fed-2") == []  # another federation's ε is its own (the lifetime sums them)
    assert len(federation_history(ledger, None)) == 3


def test_the_budget_stops_training_before_any_step(prepared_sites, tiny_profile, tmp_path):
    site = prepared_sites["plagh"]
    ledger = PrivacyLedger(tmp_path, "plagh")
    model, first = one_round(dp_profile(tiny_profile), site, build_model(tiny_profile).state_dict(), ledger, 1)
    capped = dp_profile(tiny_profile, max_epsilon=first.epsilon * 1.1)  # room for round 1, not for round 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrivacyBudgetSpent, match="privacy budget spent: epsilon .* still evaluates") as err:
        one_round(capped, site, before, ledger, 2)
    assert err.value.spent == pytest.approx(first.epsilon) and err.value.after > capped.privacy.max_epsilon
    assert federation_history(ledger, "fed-1") == first.history  # nothing was spent


def test_target_epsilon_is_spread_over_the_planned_rounds():
    sigma = noise_for_target(4.0, 1e-5, sample_rate=0.25, epochs=10)
    per_round = (sigma, 0.25, 4)  # one epoch of 4 steps a round
    at_end = epsilon([per_round] * 10, 1e-5)
    assert epsilon([per_round] * 5, 1e-5) < at_end <= 4.0
    assert at_end == pytest.approx(4.0, abs=0.02)  # Opacus's search stops within 0.01 below the target
    dp = PrivateTraining(PrivacyConfig(enabled=True, target_epsilon=4.0), [per_round] * 10)
    with pytest.raises(PrivacyBudgetSpent):  # the budget defaults to the target: an 11th round is refused
        dp.plan(num_examples=32, steps_per_epoch=4, epochs=1, total_epochs=10)


def test_user_mistakes_name_the_setting(prepared_sites, tiny_profile, tmp_path):
    dp = PrivateTraining(PrivacyConfig(enabled=True, noise_multiplier=1.0, delta=0.5))
    with pytest.raises(BrainTumNetError, match="dp.delta=0.5 is not below 1/n"):
        dp.plan(num_examples=40, steps_per_epoch=5, epochs=1, total_epochs=1)
    fedprox = replace(dp_profile(tiny_profile), train=replace(tiny_profile.train, fedprox_mu=0.1))
    model = build_model(fedprox)
    with pytest.raises(BrainTumNetError, match="train.fedprox-mu=0.1"):
        train_model(model, [prepared_sites["yibin"]], fedprox, CPU, epochs=1, proximal_to=model.state_dict(),
                    progress=False, privacy=PrivateTraining(fedprox.privacy))
    for bad, match in [({"dp.enabled": True}, "set exactly one of them"),
                       ({"dp.enabled": True, "dp.noise-multiplier": 1.0, "dp.target-epsilon": 8.0}, "exactly one"),
                       ({"dp.max-grad-norm": 0.0}, "dp.max-grad-norm=0.0"),
                       ({"dp.enabled": "maybe"}, "expected true or false")]:
        with pytest.raises(ConfigError if "expected" not in match else ValueError, match=match):
            resolve(bad)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "privacy-ledger.jsonl").write_text('{"federation_id": "f"}\n{not json')
    with pytest.raises(BrainTumNetError, match=r"privacy-ledger.jsonl, line 2: unreadable journal line"):
        federation_history(PrivacyLedger(tmp_path, "x"), "f")


def test_an_empty_first_poisson_batch_is_a_noise_only_step(prepared_sites, tiny_profile, monkeypatch, tmp_path):
    """Poisson sampling can draw an empty batch, also an epoch's first; Opacus then built it as if a sample were a
    tuple of tensors, and the site's round failed with a TypeError."""
    attach = PrivateTraining.attach

    def first_batch_empty(self, model, optimizer, loader):
        wrapped, dp_optimizer, dp_loader = attach(self, model, optimizer, loader)
        sampler = dp_loader.batch_sampler

        class EmptyFirst:
            def __iter__(self):
                yield []
                yield from sampler

            def __len__(self):
                return len(sampler)

        object.__setattr__(dp_loader, "batch_sampler", EmptyFirst())  # DataLoader refuses a plain assignment
        return wrapped, dp_optimizer, dp_loader

    monkeypatch.setattr(PrivateTraining, "attach", first_batch_empty)
    profile = dp_profile(tiny_profile)
    initial = build_model(profile).state_dict()
    model, dp = one_round(profile, prepared_sites["jinling"], initial, PrivacyLedger(tmp_path, "jinling"), 1)
    state = model.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert any(not torch.equal(state[k], initial[k]) for k in state) and dp.epsilon > 0
