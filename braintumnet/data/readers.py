"""Read an image or mask (NIfTI file or DICOM series folder) into one canonical orientation, RAS+.

Every volume comes out as ``Volume(array (X, Y, Z) float32, affine 4×4)`` with its axes turned (by permutation and
flips only, nibabel's "closest canonical") so that X runs towards the patient's Right, Y Anterior and Z Superior:
axial slices are ``array[:, :, z]``, whatever orientation the scanner or converter stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from braintumnet.data.dicom_io import FileProblem, read_dicom_series

# Image and mask share a grid when, after canonicalisation, shapes are equal and affines agree within these.
ORIGIN_TOL_MM = 1e-3  # translation, in mm
DIRECTION_TOL = 1e-4  # direction cosines (unitless)
SPACING_TOL = 1e-4  # voxel size, relative


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3-D volume in canonical RAS+ orientation.

    Args:
        array: ``(X, Y, Z)`` float32 voxels.
        affine: 4×4 voxel-index-to-RAS-mm matrix.
    """

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along X, Y, Z in mm."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def read_volume(path: Path) -> Volume:
    """Read a NIfTI file (``.nii`` / ``.nii.gz``) or a DICOM series folder and make it canonical.

    Raises:
        FileProblem: unreadable or truncated file, not 3-D (a 4-D image, or a 2-D one), bad DICOM series.
    """
    path = Path(path)
    if path.is_dir():
        array, affine = read_dicom_series(path)
    else:
        array, affine = _read_nifti(path)
    problem = affine_problem(affine)
    if problem:
        where = "its geometry tags (ImagePositionPatient, ImageOrientationPatient, PixelSpacing)" if path.is_dir() \
            else "the header's sform/qform"
        raise FileProblem(path, f"{problem} in {where}: the voxels cannot be placed in space; re-export the scan "
                          "from the scanner's original series with its geometry")
    return canonical(array, affine)


def affine_problem(affine: np.ndarray) -> str | None:
    """None for a usable voxel-to-world matrix; else why it is not (NaN or Inf, a zero axis, axes not independent).

    A converter that lost the geometry writes such headers; orienting the volume (``canonical``) needs three
    independent axes of non-zero length.
    """
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        return "the voxel-to-world affine holds NaN or Inf"
    axes = matrix[:3, :3]
    lengths = np.linalg.norm(axes, axis=0)
    if (lengths <= 0).any():
        return f"the voxel-to-world affine has a zero axis (voxel size {np.round(lengths, 4).tolist()} mm)"
    # |det| of the axes scaled to unit length: 1 for orthogonal axes, 0 when one lies in the plane of the others.
    if abs(np.linalg.det(axes / lengths)) < 1e-3:
        return "the voxel-to-world affine's axes are not independent (a row or column is zero or repeated)"
    return None


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.errstate(all="ignore"):  # a NaN or degenerate sform warns here; affine_problem says it in one line
            img = nib.load(path)
        shape = img.shape
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError, zlib.error ... all "re-export"
        raise FileProblem(path, f"cannot be read as NIfTI ({type(exc).__name__}: {exc}): give a .nii/.nii.gz "
                          "file (re-export it) or the folder of a DICOM series") from None
    while len(shape) > 3 and shape[-1] == 1:  # (X, Y, Z, 1) is a 3-D volume written by some converters
        shape = shape[:-1]
    if len(shape) != 3:
        kind = "4-D" if len(shape) > 3 else f"{len(shape)}-D"
        raise FileProblem(path, f"is a {kind} image of shape {img.shape}: export one 3-D CE-T1 volume per case")
    try:
        array = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as exc:  # the header was fine but the voxel data is short or corrupt
        raise FileProblem(path, f"voxel data cannot be read, the file looks truncated ({type(exc).__name__}): "
                          "copy or re-export it again") from None
    return array, img.affine


def canonical(array: np.ndarray, affine: np.ndarray) -> Volume:
    """Turn ``(array, affine)`` into RAS+ axis order by permuting and flipping axes (no resampling)."""
    ornt = io_orientation(affine)
    new_affine = affine @ inv_ornt_aff(ornt, array.shape)  # the shape before reorientation, as nibabel does
    return Volume(np.ascontiguousarray(apply_orientation(array, ornt), dtype=np.float32), new_affine)


def geometry_mismatch(image: Volume, mask: Volume) -> str | None:
    """None if the mask lies on the image's voxel grid, else a short description of the difference."""
    if image.array.shape != mask.array.shape:
        return f"mask shape {mask.array.shape} differs from image shape {image.array.shape}"
    origin = np.abs(image.affine[:3, 3] - mask.affine[:3, 3]).max()
    if origin > ORIGIN_TOL_MM:
        return f"mask origin is {origin:.3g} mm away from the image's"
    size_i, size_m = image.spacing, mask.spacing
    if np.abs(size_i - size_m).max() > SPACING_TOL * size_i.max():
        return f"mask voxel size {np.round(size_m, 4).tolist()} differs from the image's {np.round(size_i, 4).tolist()}"
    direction = np.abs(image.affine[:3, :3] / size_i - mask.affine[:3, :3] / size_m).max()
    if direction > DIRECTION_TOL:
        return f"mask axes are rotated against the image's (direction cosines differ by {direction:.3g})"
    return None
