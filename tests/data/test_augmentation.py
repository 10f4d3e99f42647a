"""The paper's augmentation (§2.1.2) on plain tensors gives what MONAI's metadata-tracking transforms give."""

from __future__ import annotations

import torch
from monai.data import get_track_meta

from braintumnet.config import get_profile
from braintumnet.data.dataset import augmentation, plain_tensors


def test_augmentation_without_metadata_gives_the_same_values_as_plain_tensors():
    cfg = get_profile("quick").train
    g = torch.Generator().manual_seed(0)
    items = [{"image": torch.rand(1, 32, 32, generator=g), "mask": torch.randint(0, 3, (1, 32, 32), generator=g)}
             for _ in range(40)]
    with_meta = augmentation(cfg, seed=5)
    expected = [with_meta(dict(item)) for item in items]
    plain = augmentation(cfg, seed=5)
    assert get_track_meta()
    changed = 0
    for item, want in zip(items, expected):
        with plain_tensors():
            got = plain(dict(item))
        assert get_track_meta(), "the module-wide switch is put back"
        for key in ("image", "mask"):
            assert type(got[key]) is torch.Tensor, (key, type(got[key]))
            assert torch.equal(got[key], want[key].as_subclass(torch.Tensor)), key
        changed += not torch.equal(got["image"], item["image"])
    assert changed > 10, "the flips and rotations were drawn"
