"""One phantom case: subject anatomy + lesions on the template grid, then acquired on the site's scanner grid.

Order of work, per case (all in memory, about a second):

1. the subject's CE-T1 signal on the 1 mm template grid (tissue fractions × contrast, plus skull and scalp);
2. its lesions (``lesions.draw``), with mass effect;
3. partial volume: blur along each axis to the scanner's voxel size (FWHM = voxel size);
4. the subject's pose and shape: scanner voxel → RAS mm → (random rotation/scale, smooth elastic displacement) →
   template voxel, sampled once with trilinear interpolation for the image and for the soft label maps;
5. the scanner (``scanner.acquire``): contrast curve, bias field, Rician noise, integers.

Image and mask share the scanner grid exactly (same affine and shape), as the site contract requires.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from braintumnet.data.contract import EDEMA_LABEL, TUMOUR_LABEL
from braintumnet.data.phantom.anatomy import Anatomy, load_anatomy, smooth_noise
from braintumnet.data.phantom.lesions import LabelMaps, draw, plan_lesions
from braintumnet.data.phantom.plan import case_rng
from braintumnet.data.phantom.scanner import HEAD_CENTRE_MNI, PROFILES, ScannerProfile, acquire, scanner_affine

ELASTIC_MM = 2.5  # standard deviation of the elastic displacement per axis
ELASTIC_SCALE_MM = 35.0  # its correlation length: smooth, lobe-sized differences between heads


@dataclass(frozen=True, eq=False)
class RenderedCase:
    """A case on its scanner grid.

    Args:
        stored: ``(X, Y, Z)`` int16 stored values; the image is ``stored * profile.rescale_slope``.
        mask: ``(X, Y, Z)`` uint8, 0 background, 1 tumour (enhancing + necrotic core), 2 peritumoral edema.
        affine: 4×4 voxel-to-RAS-mm, shared by image and mask.
        profile: the scanner it was acquired on.
    """

    stored: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    profile: ScannerProfile

    @property
    def image(self) -> np.ndarray:
        return self.stored.astype(np.float32) * np.float32(self.profile.rescale_slope)


def render_case(row, seed: int) -> RenderedCase:
    """Draw the case described by one ``cohort_plan`` row (deterministic in ``seed`` and the case id)."""
    for attempt in range(4):
        # Lesions are placed to stay inside every field of view; should one still fall outside (a low lesion and
        # a high field of view), the case is redrawn from the next generator, deterministically.
        case = _render(row, case_rng(seed, row["case_id"], f"render/{attempt}"))
        if case is not None:
            return case
    raise RuntimeError(f"{row['case_id']}: no draw put the tumour inside the field of view")


def _render(row, rng: np.random.Generator) -> RenderedCase | None:
    anat = load_anatomy()
    profile = PROFILES[row["scanner"]]

    # 1. Tissue contrast of this subject on CE-T1 (white matter = 1; grey matter darker, CSF dark).
    gm_ratio = profile.gm_ratio * rng.uniform(0.96, 1.04)
    brain = anat.wm + np.float32(gm_ratio) * anat.gm + np.float32(rng.uniform(0.18, 0.3)) * anat.csf
    image = brain + np.float32(rng.uniform(0.9, 1.1)) * anat.head

    # 2. Lesions.
    labels = draw(plan_lesions(row, anat, rng), anat, brain, image, rng)

    # 3. Partial volume: a slice integrates over its thickness. The template is 1 mm, so blur by what is missing.
    sigma = [np.sqrt(max(s * s - 1.0, 0.0)) / 2.355 for s in profile.spacing_mm]
    sigma = [s if s > 0.3 else 0.0 for s in sigma]
    if any(sigma):
        image = ndi.gaussian_filter(image, sigma, mode="nearest", truncate=3.0)
        labels = LabelMaps(labels.lo, ndi.gaussian_filter(labels.tumour, sigma, mode="constant", truncate=3.0),
                           ndi.gaussian_filter(labels.edema, sigma, mode="constant", truncate=3.0))

    # 4. Pose and shape, then one resampling onto the scanner grid.
    affine = scanner_affine(profile, rng)
    coords = _template_coords(anat, profile, affine, rng)
    signal = ndi.map_coordinates(image, coords, order=1, mode="constant", cval=0.0, prefilter=False)
    mask = _sample_labels(labels, coords)
    if not (mask == TUMOUR_LABEL).any():
        return None

    # 5. The scanner.
    return RenderedCase(stored=acquire(signal, profile, rng), mask=mask, affine=affine, profile=profile)


def _template_coords(anat: Anatomy, profile: ScannerProfile, affine: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """For each scanner voxel, where it lies in the template grid: ``(3, X, Y, Z)`` float32.

    The subject's head is the template rotated (a few degrees, mostly pitch), scaled (±6 %, ±2 % per axis) about the
    head centre and deformed by a smooth random displacement field; mapping scanner RAS mm back through that
    transform gives the template point each scanner voxel sees.
    """
    shape = profile.shape
    angles = np.deg2rad(rng.uniform([-8.0, -4.0, -5.0], [8.0, 4.0, 5.0]))  # about x (pitch), y (roll), z (yaw)
    rot = _rotation(angles)
    scale = rng.uniform(0.94, 1.06) * rng.uniform(0.98, 1.02, 3)  # a larger head would not fit a 196 mm FOV
    linear = rot @ np.diag(1.0 / scale)  # subject mm -> template mm, about the head centre
    centre = np.array(HEAD_CENTRE_MNI)
    vox_to_tpl = np.eye(4)
    vox_to_tpl[:3, :3] = linear @ affine[:3, :3]
    vox_to_tpl[:3, 3] = linear @ (affine[:3, 3] - centre) + centre - anat.affine[:3, 3]
    axes = [np.arange(n, dtype=np.float32) for n in shape]
    coords = np.empty((3, *shape), np.float32)
    for a in range(3):
        m = vox_to_tpl[a].astype(np.float32)
        coords[a] = (m[0] * axes[0])[:, None, None] + (m[1] * axes[1])[None, :, None] + (m[2] * axes[2])[None, None, :]
        coords[a] += m[3]
        coords[a] += np.float32(ELASTIC_MM) * smooth_noise(shape, ELASTIC_SCALE_MM, rng, spacing=profile.spacing_mm)
    return coords


def _rotation(angles: np.ndarray) -> np.ndarray:
    (cx, cy, cz), (sx, sy, sz) = np.cos(angles), np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _sample_labels(labels: LabelMaps, coords: np.ndarray) -> np.ndarray:
    """Labels on the scanner grid from the (blurred) soft maps: a voxel is tumour if at least half of it is."""
    mask = np.zeros(coords.shape[1:], np.uint8)
    local = coords - labels.lo.astype(np.float32).reshape(3, 1, 1, 1)
    size = np.array(labels.tumour.shape, np.float32).reshape(3, 1, 1, 1)
    inside = np.all((local >= 0) & (local <= size - 1), axis=0)
    if not inside.any():
        return mask
    pts = local[:, inside]
    tumour = ndi.map_coordinates(labels.tumour, pts, order=1, prefilter=False)
    edema = ndi.map_coordinates(labels.edema, pts, order=1, prefilter=False)
    values = np.where(edema >= 0.5, EDEMA_LABEL, 0).astype(np.uint8)
    peak = float(tumour.max(initial=0.0))
    if peak > 0:
        # Tumour where at least half the voxel is; a lesion thinner than a thick slice may never reach one half,
        # then its most tumorous voxels count, so that no drawn lesion is missing from the mask.
        values[tumour >= min(0.5, 0.5 * peak)] = TUMOUR_LABEL
    mask[inside] = values
    return mask
