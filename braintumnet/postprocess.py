"""A case's predicted labels cleaned as one volume before they are scored or written: nnU-Net's rule, kept by
measurement (docs/metrics.md, "Post-processing").

A 2-D network segments each axial slice on its own, so a whole scan collects small false lesions on slices far from
the tumour (a bright vessel, the choroid plexus, the dura). Each costs little Dice but sets HD95 near the far side of
the head, and its slices also vote on the tumour type. nnU-Net's post-processing keeps, of the foreground, only its
largest connected component when that improves the validation Dice. Here it acts on tumour and edema together (a
lesion is its enhancing tumour and the edema around it), what MONAI's ``KeepLargestConnectedComponent`` does with
``independent=False``; scipy labels the components, as MONAI's transform needs scikit-image, which a site does not
otherwise install.

Rules (``model.postprocess``):

- ``largest-lesion``: keep the largest 3-D connected component of tumour ∪ edema (face neighbours, so two lesions
  that touch only at a corner stay two); every other foreground voxel becomes background. A second metastasis
  smaller than the first is dropped too: on the phantom's validation cohort (where half the metastases have 2 to 4
  lesions) the rule still gained Dice, but a site whose patients often carry several lesions should measure both.
- ``none``: the network's labels as they are.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
from scipy import ndimage

POSTPROCESS_RULES = ("largest-lesion", "none")
# The rule of a record kept before ``model.postprocess`` existed (a study's arm, a benchmark's): the network's labels.
RULE_BEFORE_IT_EXISTED = "none"

# Face neighbours in 3-D: lesions touching only at an edge or a corner stay apart.
_FACES = ndimage.generate_binary_structure(3, 1)


def with_rule(profile, rule: str | None):
    """``profile`` with ``model.postprocess`` set to ``rule`` (None: unchanged); for ``braintumnet evaluate`` and
    ``predict --postprocess``, where a site compares the rules on its own validation cases.

    Raises:
        ValueError: an unknown rule (``ModelConfig`` refuses it).
    """
    return profile if rule is None else replace(profile, model=replace(profile.model, postprocess=rule))


def postprocess_case(labels: np.ndarray, z_index: Sequence[int] | None, rule: str) -> np.ndarray:
    """One case's labels after ``rule``.

    Args:
        labels: ``S×H×W`` uint8 labels (0 background, 1 tumour, 2 edema) of the case's ``S`` axial slices.
        z_index: each slice's axial index in its scan (any order): the slices are stacked in axial order, each
            next to the one after it, gap or not. A test case holds every slice of its head (no gap); a training
            case scored in cross-validation holds slices spread through its tumour, which stacked still make one
            lesion. None: the slices are in axial order already.
        rule: one of :data:`POSTPROCESS_RULES`.

    Returns:
        A new ``S×H×W`` uint8 array in the slices' own order (``labels`` itself is not changed).

    Raises:
        ValueError: an unknown rule, or a ``z_index`` that does not give one distinct index per slice.

    Examples::

        >>> labels = np.zeros((3, 8, 8), np.uint8); labels[0:2, 1:4, 1:4] = 1; labels[2, 6, 6] = 2
        >>> int(postprocess_case(labels, None, "largest-lesion")[2, 6, 6])
        0
    """
    if rule not in POSTPROCESS_RULES:
        raise ValueError(f"postprocess={rule!r}: use one of {POSTPROCESS_RULES}")
    labels = np.asarray(labels, dtype=np.uint8)
    z = np.arange(len(labels)) if z_index is None else np.asarray(z_index, dtype=int).reshape(-1)
    if z.shape != (len(labels),) or len(np.unique(z)) != z.size:
        raise ValueError(f"z_index must give one distinct axial index per slice ({len(labels)}), got {z.tolist()}")
    if rule == "none" or not labels.any():
        return labels.copy()
    order = np.argsort(z, kind="stable")
    volume = labels[order]  # a copy, in axial order
    components, _ = ndimage.label(volume > 0, structure=_FACES)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0  # background
    volume[components != int(np.argmax(sizes))] = 0  # ties: the first component in scan order
    kept = np.empty_like(volume)
    kept[order] = volume
    return kept
