"""Whole-scan inference: BrainTumNet over every axial slice of a scan, the labels back on the scan's own grid.

1. The image is read by ``braintumnet.data.readers.read_volume`` into the canonical RAS grid (:func:`read_case`).
2. Every axial slice inside the head (``braintumnet.data.preprocess.scored_slices``, the rule that chooses the slices
   a test case is scored on, from the image alone) goes through ``braintumnet.data.preprocess.preprocess_case``, the
   very function that prepares training and test slices (normalisation, in-plane resampling to ``fov_mm / img_size``
   mm, crop/pad around the brain). Slices outside it (air beyond the head) are labelled background.
3. BrainTumNet segments and classifies each slice; with ``tta`` the softmax outputs are averaged over the four flips
   of the slice (none, rows, columns, both: the flips training augments with, §2.1.2) (:func:`predict_volume`).
   The slices' labels are cleaned as one volume by the checkpoint's ``model.postprocess`` rule
   (``braintumnet.postprocess``), exactly as an evaluation cleans them before it scores.
4. The label maps go back to the scan's voxel grid: the crop/pad is undone, the resampling inverted with nearest
   neighbour (a voxel takes the label of the model pixel its centre falls in, :class:`SliceGrid`), and the axes
   turned back from RAS to the file's own order, so the mask has the input's exact shape and affine
   (:func:`write_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Resize
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from tqdm.auto import tqdm

from braintumnet.config import DataConfig
from braintumnet.data.checks import Case
from braintumnet.data.contract import CANONICAL_AXES
from braintumnet.data.dicom_io import FileProblem
from braintumnet.data.preprocess import brain_mask, preprocess_case, scored_slices
from braintumnet.data.readers import Volume, read_volume
from braintumnet.errors import BrainTumNetError
from braintumnet.postprocess import postprocess_case

TTA_FLIPS = ((), (2,), (3,), (2, 3))  # dims of a B×C×H×W batch
BATCH_SIZE = 16


@dataclass(frozen=True)
class SliceGrid:
    """Where ``preprocess_case`` puts a canonical ``(X, Y)`` slice in the model's ``img_size``² grid.

    Args:
        shape_xy: the slice's shape in the canonical volume.
        resized: its shape after in-plane resampling to ``fov_mm / img_size`` mm per pixel.
        start: the crop window's first index in the resampled grid, per axis (negative where it pads).
        img_size: the model's input side.
    """

    shape_xy: tuple[int, int]
    resized: tuple[int, int]
    start: tuple[int, int]
    img_size: int

    @classmethod
    def of(cls, image: np.ndarray, spacing_xy, cfg: DataConfig) -> SliceGrid:
        """The grid ``preprocess_case`` uses for ``image`` (X, Y, Z): the same size and brain-centre rules."""
        target = cfg.fov_mm / cfg.img_size
        shape = image.shape[:2]
        resized = tuple(max(1, round(n * float(s) / target)) for n, s in zip(shape, spacing_xy))
        brain = brain_mask(image)
        if brain.sum() < 100:
            brain = np.ones_like(brain)
        start = []
        for axis, (old, new) in enumerate(zip(shape, resized)):
            idx = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
            centre = ((idx[0] + idx[-1]) / 2 + 0.5) * new / old - 0.5
            # MONAI's SpatialCrop starts at centre - size // 2 (padded by img_size first, so never clipped).
            start.append(int(np.floor(centre + 0.5)) - cfg.img_size // 2)
        return cls(tuple(shape), resized, tuple(start), cfg.img_size)

    def to_volume(self, labels_hw: np.ndarray) -> np.ndarray:
        """``N×H×W`` model-grid labels (display order) -> ``(X, Y, N)`` labels on the canonical slice grid."""
        crop = np.flip(labels_hw, axis=1).transpose(0, 2, 1)  # undo preprocess's (X, Y) -> (H, W)
        canvas = np.zeros((len(labels_hw), *self.resized), dtype=np.float32)
        src, dst = [], []
        for start, n in zip(self.start, self.resized):
            lo, hi = max(start, 0), min(start + self.img_size, n)
            dst.append(slice(lo, max(lo, hi)))
            src.append(slice(lo - start, max(lo, hi) - start))
        canvas[:, dst[0], dst[1]] = crop[:, src[0], src[1]]
        back = Resize(self.shape_xy, mode="nearest-exact")(torch.from_numpy(canvas))
        return np.asarray(back).round().astype(np.uint8).transpose(1, 2, 0)


@dataclass(frozen=True, eq=False)
class VolumePrediction:
    """Model outputs for every axial slice of one canonical volume.

    Args:
        labels: ``(X, Y, Z)`` uint8 labels (0 background, 1 tumour, 2 edema) on the volume's own grid.
        slice_probs: ``Z×K`` class probabilities per slice (NaN on slices outside ``scored``).
        scored: ``Z`` booleans: the slices the model ran on (those inside the head).
    """

    labels: np.ndarray
    slice_probs: np.ndarray
    scored: np.ndarray


def read_case(path: Path) -> tuple[Volume, np.ndarray, tuple[int, ...], np.ndarray]:
    """The canonical volume, the orientation that turns it back to the file's own axes, and the file's shape and
    affine (NIfTI: as nibabel reads them; DICOM: the series as the reader builds it, in canonical order).

    Raises:
        BrainTumNetError: the reader's message (unreadable, truncated, 4-D, a bad series, a damaged header), or NaN
            or Inf voxels, naming the file and the fix.
    """
    try:
        volume = read_volume(path)
    except FileProblem as exc:
        raise BrainTumNetError(str(exc)) from None
    bad = int((~np.isfinite(volume.array)).sum())
    if bad:  # one NaN voxel makes every probability NaN: a report would show a type and volumes that mean nothing
        raise BrainTumNetError(f"{path}: {bad} voxels are NaN or Inf, so no prediction is made; re-export the image "
                               "(check the converter's intensity scaling)")
    if path.is_dir():
        identity = axcodes2ornt(CANONICAL_AXES)  # the mask stays in the series' canonical order
        return volume, identity, volume.array.shape, volume.affine
    header = nib.load(path)  # header only: the voxels were read above
    shape, affine = tuple(header.shape), header.affine
    to_input = ornt_transform(axcodes2ornt(CANONICAL_AXES), io_orientation(affine))
    return volume, to_input, shape, affine


@torch.inference_mode()
def predict_volume(model, cfg: DataConfig, volume: Volume, *, postprocess: str, tta: bool = False,
                   device: torch.device | None = None, batch_size: int = BATCH_SIZE,
                   progress: bool = False) -> VolumePrediction:
    """Segment and classify every axial slice of a canonical volume inside the head; labels cleaned by the rule
    ``postprocess`` (``braintumnet.postprocess``) on the model's grid, as an evaluation scores them, then mapped back to
    the volume's grid."""
    device = device or torch.device("cpu")
    depth = volume.array.shape[2]
    # The slices a test case of this scan would be scored on, chosen from the image alone, so `predict` and
    # `evaluate` see the same slices. The labels are unknown: preprocess_case gets an empty stand-in mask.
    z = scored_slices(volume.array)
    stand_in = np.zeros(volume.array.shape, dtype=np.uint8)
    slices = preprocess_case(Case("predict", "", volume, stand_in), cfg, z)
    grid = SliceGrid.of(volume.array, volume.spacing[:2], cfg)

    model = model.to(device).eval()
    labels, probs = [], []
    starts = range(0, len(z), batch_size)
    for i in tqdm(starts, desc="slices", unit="batch", disable=not progress, leave=False):
        x = torch.from_numpy(slices.images[i:i + batch_size].astype(np.float32))[:, None].to(device)
        seg, cls = 0.0, 0.0
        for dims in TTA_FLIPS if tta else ((),):
            out = model(x.flip(dims) if dims else x)
            seg_p = out.seg_logits.float().softmax(1)
            seg = seg + (seg_p.flip(dims) if dims else seg_p)
            cls = cls + out.cls_logits.float().softmax(1)
        labels.append(seg.max(1).indices.to(torch.uint8).cpu().numpy())  # argmax's labels, faster on the CPU
        probs.append((cls / (len(TTA_FLIPS) if tta else 1)).cpu().numpy())
    volume_labels = np.zeros(volume.array.shape, dtype=np.uint8)
    volume_labels[:, :, z] = grid.to_volume(postprocess_case(np.concatenate(labels), z, postprocess))
    slice_probs = np.full((depth, probs[0].shape[1]), np.nan)
    slice_probs[z] = np.concatenate(probs)
    scored = np.zeros(depth, dtype=bool)
    scored[z] = True
    return VolumePrediction(labels=volume_labels, slice_probs=slice_probs, scored=scored)


def write_mask(labels: np.ndarray, to_input: np.ndarray, shape: tuple[int, ...], affine: np.ndarray,
               source: Path, path: Path) -> Path:
    """Write canonical ``(X, Y, Z)`` labels in the input's own axis order, shape and affine (uint8 NIfTI).

    The NIfTI's sform and qform codes follow the input's, so viewers place it exactly as they place the scan.
    """
    data = apply_orientation(labels, to_input).astype(np.uint8).reshape(shape)
    image = nib.Nifti1Image(data, affine)
    header = None if source.is_dir() else nib.load(source).header
    if header is not None and "sform_code" in header and "qform_code" in header:
        sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
        image.set_sform(affine, code=sform_code or (0 if qform_code else 2))
        image.set_qform(affine, code=qform_code)
    image.header["descrip"] = b"BrainTumNet mask: 1 tumour, 2 edema"
    nib.save(image, path)
    return path
