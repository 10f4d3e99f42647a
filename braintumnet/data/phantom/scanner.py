"""Scanner profiles: each hospital's field strength, grid, noise, bias field and contrast curve.

§2.1.1 names a 1.5 T Siemens Espree and a 3 T GE scanner. The phantom gives each training site its own profile, so
the sites differ the way hospitals do (non-IID in appearance as well as in class mix), and gives the external site
one that no training site has (another vendor, thicker slices, lower SNR, stronger bias).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from braintumnet.data.phantom.anatomy import smooth_noise

HEAD_CENTRE_MNI = (0.0, -16.0, 16.0)  # mm; the middle of the scanner field of view before the subject's offset


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner turns anatomy into stored voxels.

    Args:
        name: profile id, written to the cohort plan.
        field_strength_t, manufacturer, scanner_model: the ``cases.csv`` scanner columns.
        spacing_mm: voxel size (X, Y, Z); Z is the slice thickness (axial slices, contiguous).
        fov_mm: field of view (X, Y, Z) in mm.
        snr: white-matter signal over the noise sigma (Rician noise on the magnitude image).
        bias: standard deviation of the log bias field (receive-coil and B1 inhomogeneity; larger at 3 T).
        gamma: contrast curve applied to the relative signal (vendor reconstruction and sequence differences).
        gm_ratio: grey-matter signal relative to white matter.
        wm_level: stored value of white matter before noise.
        rescale_slope: the modality rescale (DICOM RescaleSlope, NIfTI scl_slope); stored = value / slope.
    """

    name: str
    field_strength_t: float
    manufacturer: str
    scanner_model: str
    spacing_mm: tuple[float, float, float]
    fov_mm: tuple[float, float, float]
    snr: float
    bias: float
    gamma: float
    gm_ratio: float
    wm_level: float
    rescale_slope: float = 1.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(round(f / s)) for f, s in zip(self.fov_mm, self.spacing_mm))

    def scanner_columns(self) -> dict[str, object]:
        """The optional ``cases.csv`` columns of the site contract."""
        return {
            "field_strength_t": self.field_strength_t,
            "manufacturer": self.manufacturer,
            "scanner_model": self.scanner_model,
            "slice_thickness_mm": self.spacing_mm[2],
        }


PROFILES = {
    p.name: p
    for p in (
        # Yibin: the paper's 1.5 T Siemens Espree, a 2-D axial spin-echo protocol with 5 mm slices.
        ScannerProfile("siemens_espree_1.5t", 1.5, "Siemens", "MAGNETOM Espree", (0.9, 0.9, 5.0), (196, 226, 150),
                       snr=18.0, bias=0.08, gamma=1.0, gm_ratio=0.80, wm_level=250.0),
        # PLAGH: the paper's 3 T GE, 3-D gradient echo with the paper's 1 mm in-plane voxels; 1.5 mm slices (not
        # the paper's 1 mm) keep the whole cohort under 2 GB on disk.
        ScannerProfile("ge_mr750_3t", 3.0, "GE", "Discovery MR750", (1.0, 1.0, 1.5), (196, 226, 150),
                       snr=32.0, bias=0.15, gamma=0.9, gm_ratio=0.72, wm_level=400.0),
        # Jinling: another 3 T GE, 2-D axial with 3 mm slices and a slightly steeper contrast curve.
        ScannerProfile("ge_signa_hdxt_3t", 3.0, "GE", "Signa HDxt", (0.94, 0.94, 3.0), (196, 226, 150),
                       snr=26.0, bias=0.13, gamma=1.1, gm_ratio=0.75, wm_level=350.0),
        # External: a vendor no training site has, 1.5 T, 6 mm slices, coarse in-plane, low SNR, strong bias,
        # flatter grey-white contrast and a non-unit rescale slope as Philips scanners write.
        ScannerProfile("philips_ingenia_1.5t", 1.5, "Philips", "Ingenia", (1.15, 1.15, 6.0), (196, 230, 150),
                       snr=13.0, bias=0.22, gamma=1.2, gm_ratio=0.84, wm_level=1100.0, rescale_slope=2.5),
    )
}
SITE_PROFILES = {
    "yibin": "siemens_espree_1.5t",
    "plagh": "ge_mr750_3t",
    "jinling": "ge_signa_hdxt_3t",
    "external": "philips_ingenia_1.5t",
}


def scanner_affine(profile: ScannerProfile, rng: np.random.Generator) -> np.ndarray:
    """Voxel-to-RAS-mm affine of an axial acquisition centred on the head, with the operator's few-mm offset."""
    shape = np.array(profile.shape)
    spacing = np.array(profile.spacing_mm)
    centre = np.array(HEAD_CENTRE_MNI) + rng.uniform(-4.0, 4.0, 3)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = np.round(centre - (shape - 1) / 2 * spacing, 3)  # rounded: exact in DICOM's decimal strings
    return affine


def acquire(signal: np.ndarray, profile: ScannerProfile, rng: np.random.Generator) -> np.ndarray:
    """Relative signal (white matter = 1) to stored integers: contrast curve, bias field, Rician noise.

    Args:
        signal: ``(X, Y, Z)`` float32 on the scanner grid, white matter about 1.
        profile: the site's scanner.
        rng: the case's random generator.

    Returns:
        ``(X, Y, Z)`` int16 stored values; the image is ``stored * profile.rescale_slope``.
    """
    shape = signal.shape
    out = np.power(np.maximum(signal, 0.0), profile.gamma, dtype=np.float32)
    # Bias: a smooth multiplicative field (correlation length ~10 cm), different for each case.
    log_bias = smooth_noise(shape, 100.0, rng, spacing=profile.spacing_mm) * profile.bias
    out *= np.exp(log_bias, dtype=np.float32) * np.float32(profile.wm_level)
    # Rician noise: the magnitude of a complex signal with Gaussian noise in both channels, so the background is
    # Rayleigh-distributed, not zero, and low signals are biased upwards, as in real magnitude images.
    sigma = np.float32(profile.wm_level / profile.snr)
    real = out + sigma * rng.standard_normal(shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imag * imag)
    stored = np.rint(magnitude / np.float32(profile.rescale_slope))
    return np.clip(stored, 0, np.iinfo(np.int16).max).astype(np.int16)
