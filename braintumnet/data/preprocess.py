"""§2.1.2 preprocessing: a checked 3-D case becomes normalised 2-D axial slices.

Per case: intensities scaled to [0, 1] between the 0.5th and 99.5th percentiles of the brain's voxels; the slices
chosen (a training case's ``slices_per_case`` representative slices, ``representative_slices``; a test case's
every slice inside the head, ``scored_slices``, chosen without the labels); each resampled in-plane to
``fov_mm / img_size`` mm per pixel (image bilinear with anti-aliasing, mask nearest) and cropped/padded to
``img_size`` × ``img_size`` around the centre of the brain's bounding box. Through-plane nothing is resampled.
Output slices are ``(H, W)`` with rows from anterior (top) to posterior and columns from the patient's left to right,
as nilearn draws axial slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import BorderPad, Resize, ScaleIntensityRange, SpatialCrop
from monai.utils import convert_to_numpy

from braintumnet.config import DataConfig
from braintumnet.data.checks import Case
from braintumnet.data.contract import TUMOUR_LABEL
from braintumnet.errors import CaseProblem

PREPROCESS_VERSION = 4  # bump when the output changes; part of the cache's reuse check
PERCENTILES = (0.5, 99.5)
# "Brain" = voxels brighter than this fraction of the volume's 99th percentile: well above MR background noise,
# well below any tissue on CE-T1.
BRAIN_THRESHOLD = 0.1
# A test case is scored on the axial slices whose head cross-section (``brain_mask``) covers at least this fraction of
# its largest one, and every slice between them. Low enough to keep the vertex and the skull base, where a lesion can
# still sit; high enough that slices of air and noise beyond the head drop out.
SCORED_SLICE_FRACTION = 0.05


@dataclass(frozen=True, eq=False)
class Slices:
    """One case's prepared slices.

    Args:
        images: ``N×H×W`` float16 in [0, 1] (the cache's type).
        masks: ``N×H×W`` uint8 labels.
        z_index: ``N`` axial indices in the canonical volume (inferior to superior).
        spacing_mm: ``(spacing_y, spacing_x)`` of the output pixels (rows, columns), in mm.
        spacing_z_mm: the scan's own distance between axial slices, in mm (through-plane is never resampled).
        unchosen_tumour_voxels: reference tumour voxels in axial slices that were not chosen (a check on the
            label-free slice rule of test cases; never used to choose).
    """

    images: np.ndarray
    masks: np.ndarray
    z_index: np.ndarray
    spacing_mm: tuple[float, float]
    spacing_z_mm: float = float("nan")
    unchosen_tumour_voxels: int = 0


def representative_slices(mask: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` axial slices spread evenly over the lesion's axial extent.

    The extent is that of the tumour (label 1) from its lowest to its highest axial index; edema is left out because
    it often reaches far above and below the tumour, and slices of edema alone say little about the tumour type. With at least ``n`` slices in it, the extent is cut into ``n`` equal bins and the pick
    is each bin's centre slice. Centres, not ``linspace(first, last)``: the two end slices of a lesion often hold
    only a few voxels (or a stray edema voxel), and with small ``n`` they would be most of the picks.
    With fewer, the window grows symmetrically into the neighbouring slices (shifted to stay inside the volume).

    Args:
        mask: ``(X, Y, Z)`` labels.
        n: how many slices.

    Raises:
        ValueError: no tumour voxel, or a volume with fewer than ``n`` slices.

    Examples::

        representative_slices(mask, 20)  # lesion on z = 40..99 -> 41, 44, 47, ..., 98
    """
    depth = mask.shape[2]
    if depth < n:
        raise ValueError(f"the volume has {depth} axial slices, fewer than the {n} needed")
    z = np.flatnonzero((mask == TUMOUR_LABEL).any(axis=(0, 1)))
    if not len(z):
        raise ValueError("the mask has no tumour voxel (label 1)")
    first, last = int(z[0]), int(z[-1])
    if last - first + 1 >= n:
        # Bins of width length/n >= 1, so the centres are unique slices.
        length = last - first + 1
        return np.floor(first + (np.arange(n) + 0.5) * length / n).astype(int)
    start = first - (n - (last - first + 1)) // 2
    start = min(max(start, 0), depth - n)
    return np.arange(start, start + n)


def brain_mask(image: np.ndarray) -> np.ndarray:
    """Voxels above ``BRAIN_THRESHOLD`` × the 99th percentile: the head, not the background."""
    return image > BRAIN_THRESHOLD * np.percentile(image, 99)


def scored_slices(image: np.ndarray) -> np.ndarray:
    """The axial slices a test case is scored on, chosen from the image alone: a contiguous run, in axial order.

    From the lowest to the highest axial index whose ``brain_mask`` area is at least ``SCORED_SLICE_FRACTION`` of the
    largest axial area, every slice in between included, so the run can be stacked back into a volume and scored in
    3-D. The labels play no part: a false positive on a tumour-free slice is scored like any other. A volume with no
    head voxel at all keeps every slice.

    Args:
        image: ``(X, Y, Z)`` intensities.

    Examples::

        scored_slices(image)  # head on z = 3..140 of 150 -> 3, 4, ..., 140
    """
    area = brain_mask(image).sum(axis=(0, 1))
    inside = np.flatnonzero(area >= SCORED_SLICE_FRACTION * area.max()) if area.max() > 0 else np.zeros(0, int)
    if not inside.size:
        return np.arange(image.shape[2])
    return np.arange(inside[0], inside[-1] + 1)


def preprocess_case(case: Case, cfg: DataConfig, z: np.ndarray | None = None) -> Slices:
    """Normalise, pick, resample and crop one checked case.

    Args:
        case: the checked case.
        cfg: image size, slices per case, field of view.
        z: the axial indices to prepare, in increasing order; None = ``representative_slices`` of the case's tumour
            (a training case). Test cases pass ``scored_slices(image)``, ``braintumnet predict`` every slice.

    Raises:
        CaseProblem: ``z`` is None and the volume has fewer axial slices than ``cfg.slices_per_case``.
    """
    image, mask = case.image.array, case.mask
    if z is None:
        try:
            z = representative_slices(mask, cfg.slices_per_case)
        except ValueError as exc:
            raise CaseProblem(case.case_id, case.image_path,
                              f"{exc}: lower slices_per_case or use a volume that covers the whole tumour") from None
    z = np.asarray(z, dtype=int)
    if z.ndim != 1 or not z.size or np.any(np.diff(z) <= 0) or z[0] < 0 or z[-1] >= image.shape[2]:
        raise ValueError(f"z must be increasing axial indices inside 0..{image.shape[2] - 1}, got {z.tolist()}")
    brain = brain_mask(image)
    if brain.sum() < 100:  # a nearly blank image: fall back to all voxels rather than fail
        brain = np.ones_like(brain)
    # Percentiles over brain voxels only (MONAI's ScaleIntensityRangePercentiles would count the background).
    low, high = np.percentile(image[brain], PERCENTILES)
    scale = ScaleIntensityRange(a_min=float(low), a_max=float(max(high, low + 1e-6)), b_min=0.0, b_max=1.0, clip=True)

    # Stack the chosen slices as channels: (N, X, Y), so MONAI's 2-D transforms handle them in one call.
    img = torch.as_tensor(image[:, :, z]).permute(2, 0, 1)
    lab = torch.as_tensor(mask[:, :, z].astype(np.float32)).permute(2, 0, 1)
    sx, sy = (float(s) for s in case.image.spacing[:2])
    target = cfg.fov_mm / cfg.img_size
    size = (max(1, round(image.shape[0] * sx / target)), max(1, round(image.shape[1] * sy / target)))
    img = Resize(size, mode="bilinear", anti_aliasing=True)(scale(img))
    lab = Resize(size, mode="nearest-exact")(lab)

    # Centre of the brain's bounding box, moved to the resampled grid: voxel centres map as (i + 0.5) * zoom - 0.5.
    centre = []
    for axis, (old, new) in enumerate(zip(image.shape[:2], size)):
        extent = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        centre.append(((extent[0] + extent[-1]) / 2 + 0.5) * new / old - 0.5)
    # Pad first so that the crop window never leaves the array: a brain near the border still ends up centred.
    crop = SpatialCrop(roi_center=[int(np.floor(c + 0.5)) + cfg.img_size for c in centre], roi_size=cfg.img_size)
    pad = BorderPad(spatial_border=cfg.img_size)
    img, lab = crop(pad(img)), crop(pad(lab))

    unchosen = np.ones(image.shape[2], dtype=bool)
    unchosen[z] = False
    return Slices(
        images=np.clip(_to_hw(img), 0.0, 1.0).astype(np.float16),
        masks=np.rint(_to_hw(lab)).astype(np.uint8),
        z_index=z,
        spacing_mm=(image.shape[1] * sy / size[1], image.shape[0] * sx / size[0]),
        spacing_z_mm=float(case.image.spacing[2]),
        unchosen_tumour_voxels=int((mask[:, :, unchosen] == TUMOUR_LABEL).sum()),
    )


def _to_hw(stack: torch.Tensor) -> np.ndarray:
    """``(N, X, Y)`` RAS slices to ``(N, H, W)``: rows = Y from anterior to posterior, columns = X left to right."""
    return np.flip(convert_to_numpy(stack).transpose(0, 2, 1), axis=1)
