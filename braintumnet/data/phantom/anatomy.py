"""Head anatomy for the phantom: nilearn's MNI152 brain with a synthetic skull and scalp, and a subject warp.

The paper's cases are real CE-T1 head scans (§2.1.1). The phantom starts from a real brain, the MNI152 2009 template
that nilearn ships inside its wheel (no download), and turns its grey/white-matter maps into tissue fractions on the
template's 1 mm grid. Skull and scalp are not in that (skull-stripped) template, so they are drawn as layers at a
fixed distance outside the intracranial space: dura, inner table, diploë, outer table, muscle, fat, skin.

Everything static is built once per process (``load_anatomy``, cached) and shared with worker processes by fork.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from braintumnet.extras import require

log = logging.getLogger(__name__)

PAD_BELOW_MM = 12  # the template stops at MNI z = -72 mm: repeat its lowest slice (brainstem) 12 mm further down
HEAD_MARGIN_MM = 20  # the thickest scalp (15 mm x 1.25) plus air, kept when cropping the template grid

# Scalp and skull layers outside the intracranial space: (outer edge in mm, CE-T1 signal relative to white matter).
# Fat and diploic marrow are bright on T1, cortical bone dark, dura enhances mildly after gadolinium.
HEAD_LAYERS = (
    (1.0, 0.50),  # dura
    (2.8, 0.04),  # inner table
    (5.2, 0.70),  # diploë (marrow)
    (6.8, 0.04),  # outer table
    (9.5, 0.42),  # galea and muscle
    (13.5, 1.25),  # subcutaneous fat
    (15.0, 0.55),  # skin
)


@dataclass(frozen=True, eq=False)
class Anatomy:
    """Static tissue maps on the cropped 1 mm template grid (voxel = mm, axes RAS, float32 ``(X, Y, Z)``).

    Args:
        wm, gm, csf: white matter, grey matter and CSF fractions (intracranial only).
        icm: intracranial space, soft mask in [0, 1].
        head: CE-T1 signal of skull and scalp layers (0 inside the skull), relative to white matter.
        sdist: signed distance to the intracranial surface in mm (negative inside), float16.
        affine: voxel-to-MNI-mm affine of this grid.
    """

    wm: np.ndarray
    gm: np.ndarray
    csf: np.ndarray
    icm: np.ndarray
    head: np.ndarray
    sdist: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.wm.shape

    def to_voxel(self, mni: np.ndarray) -> np.ndarray:
        """MNI mm ``(..., 3)`` to voxel coordinates of this grid (the grid is unrotated, 1 mm)."""
        return np.asarray(mni) - self.affine[:3, 3]

    def to_mni(self, vox: np.ndarray) -> np.ndarray:
        return np.asarray(vox) + self.affine[:3, 3]


@functools.lru_cache(maxsize=1)
def load_anatomy() -> Anatomy:
    """Build the static anatomy from nilearn's shipped MNI152 template (offline; a few seconds, once per process)."""
    # Imported here: nilearn takes ~2 s to import, only the phantom needs it, and a site's install leaves it out.
    datasets = require("nilearn.datasets", "the synthetic phantom cohort")

    t1 = datasets.load_mni152_template(resolution=1)  # resolution 1 is the shipped file itself: no resampling
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), np.float32)
    brain = np.asarray(t1.get_fdata(), np.float32) > 0.02  # skull-stripped: brain + ventricles + sulcal CSF
    affine = t1.affine.copy()

    # Continue the lowest slice downwards (brainstem), then leave room for the skull to close below it. Scanner
    # fields of view start above MNI z = -70 mm, so this crude neck is rarely seen.
    def pad(a):
        below = np.zeros(a.shape[:2] + (HEAD_MARGIN_MM,), a.dtype)
        return np.concatenate([below, np.repeat(a[:, :, :1], PAD_BELOW_MM, axis=2), a], axis=2)

    gm, wm, brain = pad(gm), pad(wm), pad(brain)
    affine[2, 3] -= PAD_BELOW_MM + HEAD_MARGIN_MM
    # Crop first (brain bounding box plus the scalp margin): every later step costs in proportion to the voxels.
    idx = np.argwhere(brain)
    lo, hi = idx.min(0) - HEAD_MARGIN_MM, idx.max(0) + HEAD_MARGIN_MM + 1
    if (lo < 0).any() or (hi > brain.shape).any():  # the template has room on every side (below: padded)
        raise RuntimeError(f"MNI template too tight for a {HEAD_MARGIN_MM} mm scalp: box {lo}..{hi} of {brain.shape}")
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    gm, wm, brain = gm[crop], wm[crop], brain[crop]
    affine[:3, 3] += lo
    # Intracranial space: the brain with its sulci closed and a 1 mm subarachnoid layer around it.
    icm = ndi.binary_closing(brain, structure=ndi.generate_binary_structure(3, 1), iterations=4)
    icm = ndi.binary_fill_holes(icm)
    icm = ndi.binary_dilation(icm, structure=ndi.generate_binary_structure(3, 2))
    # Outside: exact distance (the scalp layers are 1-4 mm thick). Inside: depth is only used to place lesions, so
    # a 2 mm grid is precise enough and 8x cheaper.
    outside = ndi.distance_transform_edt(~icm).astype(np.float32)
    coarse = ndi.distance_transform_edt(icm[::2, ::2, ::2], sampling=2.0).astype(np.float32)
    inside = ndi.zoom(coarse, np.array(icm.shape) / np.array(coarse.shape), order=1, grid_mode=True, mode="nearest")
    sdist = np.where(icm, -np.maximum(inside, 0.5), outside - 0.5).astype(np.float32)
    icm_soft = np.clip(0.5 - sdist, 0.0, 1.0)  # a hard edge here; resampling to the scanner grid softens it
    gm, wm = gm * icm_soft, wm * icm_soft
    total = gm + wm
    over = total > icm_soft  # probabilistic maps may overlap: keep fractions summing to at most the space
    scale = np.where(over, icm_soft / np.maximum(total, 1e-6), 1.0).astype(np.float32)
    gm, wm = gm * scale, wm * scale
    csf = np.clip(icm_soft - gm - wm, 0.0, 1.0)
    head = _head_signal(sdist, affine)
    anat = Anatomy(wm=wm, gm=gm, csf=csf, icm=icm_soft, head=head, sdist=sdist.astype(np.float16), affine=affine)
    log.debug("phantom anatomy: grid %s, origin %s", anat.shape, affine[:3, 3])
    return anat


def _head_signal(sdist: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """CE-T1 signal of the scalp/skull layers, with a thickness that varies smoothly over the head."""
    rng = np.random.default_rng(20250101)  # fixed: the same skull for every subject before the subject warp
    thickness = 1.0 + 0.18 * smooth_noise(sdist.shape, 40.0, rng)
    d = np.maximum(sdist, 0.0) / np.clip(thickness, 0.75, 1.25)
    edges, values, inner = [-0.25], [0.0], 0.0
    for outer, value in HEAD_LAYERS:  # piecewise constant with 0.5 mm ramps centred on each boundary (anti-aliased)
        edges += [inner + 0.25, outer - 0.25]
        values += [value, value]
        inner = outer
    edges.append(inner + 0.25)
    values.append(0.0)
    head = np.interp(d, edges, values).astype(np.float32)
    head[sdist <= 0] = 0.0
    # Superior sagittal sinus: a bright (enhancing) vessel in the dura along the midline, above the ventricles.
    x, _, z = (np.arange(n, dtype=np.float32) + affine[i, 3] for i, n in enumerate(sdist.shape))
    midline = np.exp(-(x / 3.0) ** 2)[:, None, None] * (z > 10)[None, None, :]
    sinus = midline * np.clip(1.0 - np.abs(sdist - 1.5) / 2.0, 0.0, 1.0)
    return np.maximum(head, 1.3 * sinus).astype(np.float32)


def smooth_noise(shape: tuple[int, int, int], scale_mm: float, rng: np.random.Generator, spacing=1.0) -> np.ndarray:
    """A smooth random 3-D field with unit standard deviation and correlation length ``scale_mm``.

    Long correlation (bias fields, elastic warps): random coefficients on a control grid ``scale_mm`` apart, spread
    by separable Gaussian kernels, i.e. three matrix products, much cheaper than filtering full-size white noise with
    a wide kernel. Short correlation (lesion texture): filtered white noise.
    """
    spacing = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
    if scale_mm < 8 * spacing.min():
        # Short correlation: filtering white noise is cheaper than a dense control grid. Gaussian-filtered white noise
        # with sigma s has correlation width s*sqrt(2), matching the kernel method below.
        field = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 0.7 * scale_mm / spacing,
                                    mode="wrap", truncate=3.0)
        return _standardise(field)
    kernels = []
    for n, step in zip(shape, spacing):
        pos = np.arange(n) * step
        ctrl = np.arange(-scale_mm, n * step + scale_mm, scale_mm * 0.7)
        kernels.append(np.exp(-0.5 * ((pos[:, None] - ctrl[None, :]) / (0.7 * scale_mm)) ** 2).astype(np.float32))
    k0, k1, k2 = kernels
    field = rng.standard_normal((k0.shape[1], k1.shape[1], k2.shape[1])).astype(np.float32)
    field = np.tensordot(k0, field, axes=(1, 0))  # (X, c1, c2)
    field = np.matmul(k1, field)  # (X, Y, c2), batched over X
    field = field @ k2.T  # (X, Y, Z), contiguous
    return _standardise(field)


def _standardise(field: np.ndarray) -> np.ndarray:
    # Statistics of a subsample: the field is smooth, so that is as good and 8x cheaper.
    probe = field[::2, ::2, ::2]
    field -= np.float32(probe.mean())
    field *= np.float32(1.0 / max(float(probe.std()), 1e-6))
    return field
