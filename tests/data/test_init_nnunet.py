"""nnU-Net v2's dataset.json is read as it is (labels name → value, channel_names, file_ending, numTraining); a label
map that does not describe the contract's masks is refused with a message that says what is wrong with it."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from braintumnet.cli import main
from braintumnet.data.site import load_site
from braintumnet.errors import BrainTumNetError

NNUNET = {"channel_names": {"0": "T1c"}, "labels": {"background": 0, "tumour": 1, "edema": 2}, "numTraining": 1,
          "file_ending": ".nii.gz"}
CONTRACT = {"site": "yibin", "modality": "CE-T1", "labels": {"0": "background", "1": "tumour", "2": "edema"},
            "tumor_types": ["glioma"]}


def _site(tmp_path, meta: dict, folder: str = "Dataset502_Plagh"):
    root = tmp_path / folder
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps(meta))
    pd.DataFrame([{"case_id": "c1", "image": "imagesTr/c1_0000.nii.gz", "mask": "labelsTr/c1.nii.gz",
                   "tumor_type": "glioma", "split": "train"}]).to_csv(root / "cases.csv", index=False)
    return root


@pytest.mark.parametrize("meta, name, types", [
    (NNUNET, "Dataset502_Plagh", ("glioma", "metastasis", "meningioma")),
    ({**NNUNET, "channel_names": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}, "numTraining": 484},
     "Dataset502_Plagh", ("glioma", "metastasis", "meningioma")),
    ({**CONTRACT, "labels": {"background": 0, "tumour (enhancing + necrotic core)": 1, "peritumoral edema": 2}},
     "yibin", ("glioma",)),
])
def test_nnunet_dataset_json_is_read_as_it_is(tmp_path, meta, name, types):
    site = load_site(_site(tmp_path, meta))
    assert (site.name, site.tumor_types) == (name, types)


@pytest.mark.parametrize("labels, phrase", [
    ({"background": 0, "edema": 1, "tumour": 2}, "swap the two values in the masks"),
    ({"0": "background", "1": "peritumoral edema", "2": "enhancing tumour"}, "swap the two values in the masks"),
    ({"background": 0, "NCR": 1, "ED": 2, "ET": 3}, "lists the mask values 0, 1, 2, 3; BrainTumNet's"),
    ({"0": "background", "1": "tumour"}, "lists the mask values 0, 1; BrainTumNet's masks have exactly 0"),
    ({"background": 0, "whole tumour": [1, 2], "tumour core": 1}, "region form"),
    (["background", "tumour", "edema"], "must map the mask values to names"),
])
def test_a_wrong_label_map_says_what_is_wrong(tmp_path, labels, phrase):
    with pytest.raises(BrainTumNetError, match="dataset.json") as raised:
        load_site(_site(tmp_path, {**NNUNET, "labels": labels}))
    assert phrase in str(raised.value)
    assert "need converting first" not in str(raised.value)


@pytest.mark.parametrize("change, phrase", [
    ({"channel_names": {"0": "FLAIR"}}, "names no single contrast-enhanced T1 channel"),
    ({"file_ending": ".mha"}, "file_ending '.mha'"),
])
def test_an_nnunet_dataset_that_is_not_ce_t1_nifti_is_refused(tmp_path, change, phrase):
    with pytest.raises(BrainTumNetError, match=phrase):
        load_site(_site(tmp_path, {**NNUNET, **change}))


def test_init_takes_the_ce_t1_channel_an_nnunet_dataset_names(tiny_site, capsys):
    site = tiny_site("msd").add("BRATS_001")
    root = site.root
    (root / "imagesTr/BRATS_001_0000.nii.gz").rename(root / "imagesTr/BRATS_001_0002.nii.gz")
    (root / "imagesTr/BRATS_001_0000.nii.gz").write_bytes(b"FLAIR, not read")
    nnunet_dir = root / "Task01"  # an nnU-Net folder inside the site folder: a contract dataset.json is written
    nnunet_dir.mkdir()
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).rename(nnunet_dir / sub)
    (nnunet_dir / "dataset.json").write_text(json.dumps({**NNUNET, "channel_names": {
        "0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}, "labels": {"background": 0, "tumor": 1, "edema": 2}}))

    assert main(["init", str(root), "--from", str(nnunet_dir), "--site", "msd_site"]) == 0
    assert "channel 2" in capsys.readouterr().out
    cases = pd.read_csv(root / "cases.csv", dtype=str, keep_default_na=False)
    assert cases[["case_id", "image", "mask"]].values.tolist() == [
        ["BRATS_001", "Task01/imagesTr/BRATS_001_0002.nii.gz", "Task01/labelsTr/BRATS_001.nii.gz"]]
    meta = json.loads((root / "dataset.json").read_text())
    assert (meta["site"], meta["labels"]) == ("msd_site", {"0": "background", "1": "tumor", "2": "edema"})
