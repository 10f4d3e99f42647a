"""nnU-Net v2's ``dataset.json`` taken as it is, and the label map of either form checked against the contract.

nnU-Net v2 writes ``{"channel_names": {"0": "T1c"}, "labels": {"background": 0, "tumour": 1, "edema": 2},
"numTraining": 32, "file_ending": ".nii.gz"}``: names map to mask values, the other way round from the contract's
``{"0": "background", "1": ..., "2": ...}``. Both forms are read here. Either way the masks' values themselves must
already be the contract's (1 tumour, 2 edema): a mask is never silently remapped (docs/data.md, "Masks").
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from braintumnet.data.contract import EDEMA_LABEL, LABELS, MODALITY, TUMOR_TYPES, TUMOUR_LABEL

NIFTI_ENDINGS = (".nii.gz", ".nii")
# How CE-T1 channels are named in nnU-Net datasets (BraTS "t1c"/"t1ce", the Medical Segmentation Decathlon "t1gd"),
# compared in lower case without spaces, dashes, underscores or plus signs.
CE_T1_NAMES = frozenset({"cet1", "cet1w", "t1ce", "t1c", "t1gd", "t1gad", "t1wgd", "t1cgd", "t1post", "t1wpost",
                         "t1postcontrast", "t1contrast", "t1wce", "t1wc", "ct1"})
_EDEMA_WORDS = ("edema", "oedema")
_TUMOUR_WORDS = ("tumo", "enhanc", "necro", "core", "lesion")
_CONTRACT_EXAMPLE = json.dumps({str(k): v for k, v in LABELS.items()})
_NNUNET_EXAMPLE = json.dumps({"background": 0, "tumour": TUMOUR_LABEL, "edema": EDEMA_LABEL})


def is_nnunet(meta: dict) -> bool:
    """An nnU-Net v2 ``dataset.json``: it names its input channels."""
    return "channel_names" in meta


def ce_t1_channel(channel_names) -> str | None:
    """The key (``"0"``, ``"2"`` ...) of the one channel named like CE-T1, else None (none, or several)."""
    if not isinstance(channel_names, dict):
        return None
    keys = [k for k, name in channel_names.items() if re.sub(r"[\s_+\-]", "", str(name).lower()) in CE_T1_NAMES]
    return str(keys[0]) if len(keys) == 1 else None


def with_contract_keys(path: Path, meta: dict) -> tuple[dict, str | None]:
    """Fill in what an nnU-Net v2 ``dataset.json`` lacks: ``site``, ``modality`` and ``tumor_types``.

    ``site`` defaults to the dataset's folder name (``Dataset501_Yibin``), ``modality`` to CE-T1 when exactly one
    channel is named like it, ``tumor_types`` to all three; keys the file has are kept. A contract ``dataset.json``
    comes back unchanged.

    Returns:
        ``(meta, problem)``: the completed dict, and why it cannot be used (None if it can).
    """
    if not is_nnunet(meta):
        return meta, None
    meta = dict(meta)
    channels = meta["channel_names"]
    if "modality" not in meta:
        if ce_t1_channel(channels) is None:
            return meta, (f"channel_names {json.dumps(channels)} names no single contrast-enhanced T1 channel; "
                          f"BrainTumNet reads CE-T1 only: name that channel \"{MODALITY}\" (or \"T1c\"), or add "
                          f"\"modality\": \"{MODALITY}\" if channel 0 is CE-T1")
        meta["modality"] = MODALITY
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in NIFTI_ENDINGS:
        return meta, (f"file_ending {ending!r}: BrainTumNet reads NIfTI ({', '.join(NIFTI_ENDINGS)}) and DICOM; "
                      "convert the images and labels to .nii.gz")
    meta.setdefault("site", Path(path).absolute().parent.name)
    meta.setdefault("tumor_types", list(TUMOR_TYPES))
    return meta, None


def labels_problem(labels) -> str | None:
    """Why ``labels`` does not describe the contract's masks (0 background, 1 tumour, 2 edema), or None.

    Accepts the contract's form (mask value → name) and nnU-Net v2's (name → mask value). Names are free, but one
    that says edema on value 1, or tumour on value 2, means the masks are labelled the other way round.
    """
    if not isinstance(labels, dict) or not labels:
        return f"\"labels\" must map the mask values to names, {_CONTRACT_EXAMPLE} (or, as nnU-Net v2 writes it, " \
               f"names to values: {_NNUNET_EXAMPLE})"
    if all(isinstance(v, (int, list)) and not isinstance(v, bool) for v in labels.values()):
        if any(isinstance(v, list) for v in labels.values()):
            return (f"\"labels\" uses nnU-Net's region form ({json.dumps(labels)}); BrainTumNet needs one value per "
                    f"label: {_NNUNET_EXAMPLE}")
        names = {int(v): str(k) for k, v in labels.items()}
        if len(names) < len(labels):
            return f"\"labels\" gives two names the same value ({json.dumps(labels)}); give each label its own value"
        form = "nnU-Net"
    elif all(isinstance(k, str) and re.fullmatch(r"\d+", k.strip()) for k in labels):
        names = {int(k): str(v) for k, v in labels.items()}
        form = "contract"
    else:
        return (f"\"labels\" {json.dumps(labels)} is neither mask value → name, {_CONTRACT_EXAMPLE}, nor (nnU-Net v2) "
                f"name → value, {_NNUNET_EXAMPLE}")
    values = sorted(names)
    if values != sorted(LABELS):
        has = ", ".join(str(v) for v in values)
        return (f"\"labels\" lists the mask values {has}; BrainTumNet's masks have exactly 0 background, "
                f"{TUMOUR_LABEL} tumour (enhancing rim + necrotic core), {EDEMA_LABEL} peritumoral edema: relabel the "
                f"masks to these values (e.g. BraTS: 1 and 3 to 1, 2 stays 2) and list them as "
                f"{_CONTRACT_EXAMPLE if form == 'contract' else _NNUNET_EXAMPLE}")
    tumour, edema = names[TUMOUR_LABEL].lower(), names[EDEMA_LABEL].lower()
    if _says_edema(tumour) or (not _says_edema(edema) and any(w in edema for w in _TUMOUR_WORDS)):
        return (f"\"labels\" names value {TUMOUR_LABEL} {names[TUMOUR_LABEL]!r} and value {EDEMA_LABEL} "
                f"{names[EDEMA_LABEL]!r}, but BrainTumNet's masks have {TUMOUR_LABEL} = tumour and {EDEMA_LABEL} = "
                f"edema: swap the two values in the masks and in \"labels\"")
    return None


def _says_edema(name: str) -> bool:
    return any(w in name for w in _EDEMA_WORDS)
