"""The shared train/evaluate engine on a tiny phantom cohort (synthetic), on the CPU."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from braintumnet.centralized import train_centralized
from braintumnet.checkpoint import load_checkpoint, save_checkpoint
from braintumnet.data.dataset import SliceDataset, select_slices
from braintumnet.engine import build_model, cosine_lr, train_model
from braintumnet.scoring import evaluate_model
from braintumnet.errors import BrainTumNetError
from braintumnet.losses import MultiTaskLoss
from braintumnet.metrics import METRIC_NAMES

CPU = torch.device("cpu")


def no_augment(profile, **train):
    return dataclasses.replace(profile, train=dataclasses.replace(profile.train, rotation_deg=0.0, flip_prob=0.0,
                                                                  **train))


@pytest.fixture(scope="module")
def overfit_batch(phantom_root, cache_root, tiny_profile):
    """The 8 phantom slices (64 px) with the largest tumour area: small lesions vanish at the 32 px test size."""
    from braintumnet.data.loading import prepare_and_load

    data = dataclasses.replace(tiny_profile.data, img_size=64, slices_per_case=2)
    model = dataclasses.replace(tiny_profile.model, feature_size=16)
    site = prepare_and_load(phantom_root / "plagh", cache_root, data, progress=False)
    table = select_slices([site], None, ("glioma", "metastasis", "meningioma"))
    area = np.array([(site.masks[r] == 1).sum() for r in table["row"]])
    table = table.iloc[np.argsort(-area)[:8]].reset_index(drop=True)
    profile = dataclasses.replace(tiny_profile, data=data, model=model)
    return profile, next(iter(torch.utils.data.DataLoader(SliceDataset([site], table), batch_size=8)))


def test_model_overfits_a_tiny_phantom_batch(overfit_batch):
    """Tumour Dice above 0.9 on 8 phantom slices within a bounded number of Adam steps."""
    profile, batch = overfit_batch
    torch.manual_seed(0)
    model = build_model(profile)
    # 3e-4: measured to pass 0.9 at about 250 steps; 1e-3 and above make the attention masks unstable.
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    criterion = MultiTaskLoss()
    target = batch["mask"][:, 0] == 1
    for step in range(1, 401):
        out = model(batch["image"])
        loss = criterion(out.seg_logits, batch["mask"], out.cls_logits, batch["label"])
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
        if step % 25 == 0:
            pred = out.seg_logits.detach().argmax(1) == 1
            dice = float(2 * (pred & target).sum() / (pred.sum() + target.sum()))
            if dice > 0.9:
                break
    assert dice > 0.9, f"tumour Dice {dice:.3f} after {step} steps"


def test_train_counts_slices_and_evaluate_counts_cases(prepared_sites, tiny_profile):
    sites = [prepared_sites["yibin"], prepared_sites["plagh"]]
    model = build_model(tiny_profile)
    epochs = []  # what a progress line gets after each epoch: the global epoch and its losses
    metrics = train_model(model, sites, tiny_profile, CPU, epochs=1, epoch_offset=2, total_epochs=3, progress=False,
                          on_epoch=lambda epoch, losses: epochs.append((epoch, losses)))
    n_train_slices = sum(((s.slices["split"] == "train")).sum() for s in sites)
    assert metrics["num-examples"] == n_train_slices
    assert np.isfinite(metrics["train_loss"])
    assert epochs == [(3, {k: metrics[k] for k in ("train_loss", "train_loss_seg", "train_loss_cls")})]
    result = evaluate_model(model, sites, "test", tiny_profile, CPU, progress=False)
    assert set(METRIC_NAMES) <= set(result)
    n_test_cases = sum(s.slices.loc[s.slices["split"] == "test", "case_id"].nunique() for s in sites)
    assert result["num-examples"] == result["n_cases"] == n_test_cases
    assert 0.0 <= result["iou_tumor"] <= result["dice_tumor"] <= 1.0


def test_the_same_seed_trains_the_same_weights_augmentation_included(prepared_sites, tiny_profile):
    """MONAI's random transforms have their own generators: unseeded, two runs of one seed used to differ."""
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(tiny_profile)
        train_model(model, [prepared_sites["plagh"]], tiny_profile, CPU, epochs=1, progress=False)
        weights.append(model.state_dict())
    assert tiny_profile.train.rotation_deg > 0 and tiny_profile.train.flip_prob > 0
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_cosine_schedule_continues_across_rounds():
    assert cosine_lr(1e-4, 0.0) == pytest.approx(1e-4)
    assert cosine_lr(1e-4, 0.5) == pytest.approx(5e-5)
    assert cosine_lr(1e-4, 1.0) == pytest.approx(0.0)


def test_fedprox_term_pulls_towards_the_global_weights(prepared_sites, tiny_profile):
    site = [prepared_sites[s] for s in ("yibin", "plagh", "jinling")]
    start = build_model(tiny_profile).state_dict()
    drift = {}
    for mu in (0.0, 50.0):
        profile = no_augment(tiny_profile, fedprox_mu=mu, learning_rate=1e-2)
        model = build_model(profile)
        model.load_state_dict(start)
        # Several steps: at the first one the weights equal the anchor, so the proximal gradient is zero.
        train_model(model, site, profile, CPU, epochs=3, proximal_to=start, progress=False)
        drift[mu] = sum((model.state_dict()[k] - start[k]).float().norm() ** 2 for k in start) ** 0.5
    assert drift[50.0] < drift[0.0]


def test_two_stage_classification_phase_leaves_the_segmenter_alone(prepared_sites, tiny_profile):
    profile = dataclasses.replace(tiny_profile, model=dataclasses.replace(tiny_profile.model, mode="two-stage"))
    model = build_model(profile)
    seg_before = [p.detach().clone() for p in model.segmentation_parameters()]
    # Epoch 1 of 2 is the classification half of the schedule.
    train_model(model, [prepared_sites["yibin"]], profile, CPU, epochs=1, epoch_offset=1, total_epochs=2,
                progress=False)
    assert all(torch.equal(a, b) for a, b in zip(seg_before, model.segmentation_parameters()))


def test_checkpoint_round_trip_and_corrupt_file(tmp_path, tiny_profile):
    model = build_model(tiny_profile)
    path = save_checkpoint(tmp_path / "m.pt", model.state_dict(), tiny_profile, ("glioma", "metastasis",
                                                                                  "meningioma"), {"round": 3})
    ckpt = load_checkpoint(path)
    assert ckpt.profile == tiny_profile and ckpt.meta["round"] == 3
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in model.state_dict().items())
    (tmp_path / "bad.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BrainTumNetError, match="bad.pt.*corrupt"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(BrainTumNetError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_centralized_training_writes_a_self_describing_model(prepared_sites, tiny_profile, tmp_path):
    sites = [prepared_sites[s] for s in ("yibin", "plagh", "jinling")]
    report = train_centralized(sites, tiny_profile, tmp_path / "run", external=[prepared_sites["external"]],
                               folds=2, epochs=1, device="cpu", synthetic=True, progress=False)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["synthetic"] is True and "NOT clinical" in written["note"]
    for section in ("internal_test", "external"):
        assert set(METRIC_NAMES) <= set(written[section])
    assert set(written["per_site"]) == {"yibin", "plagh", "jinling"}
    assert len(written["folds"]) == 2 and "dice_tumor" in written["cross_validation"]
    assert report["internal_test"]["n_cases"] == sum(
        s.slices.loc[s.slices["split"] == "test", "case_id"].nunique() for s in sites)
    assert load_checkpoint(tmp_path / "run" / "model.pt").class_names == ("glioma", "metastasis", "meningioma")
