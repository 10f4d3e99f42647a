"""Readers: a case written as DICOM and as NIfTI, in any orientation, prepares to the same slices."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from nibabel.affines import from_matvec
from scipy.spatial.transform import Rotation

from braintumnet.data.cache import load_prepared
from braintumnet.data.dicom_io import read_dicom_series, write_dicom_series
from braintumnet.data.prepare import prepare_site
from braintumnet.data.readers import canonical, read_volume


def _oblique() -> np.ndarray:
    rotation = Rotation.from_euler("zx", [12, 8], degrees=True).as_matrix()
    return from_matvec(rotation @ np.diag([1.0, 1.0, 2.0]), [-20.0, -24.0, -30.0])


AFFINES = {
    "axial RAS": from_matvec(np.diag([1.0, 1.0, 2.0]), [-20.0, -24.0, -30.0]),
    "axial LPS-like (x, y flipped)": from_matvec(np.diag([-1.0, -1.0, 2.0]), [20.0, 24.0, -30.0]),
    # stored as coronal slices: columns run right, rows run down (inferior), slices step anterior
    "coronal": from_matvec(np.array([[1.0, 0, 0], [0, 0, 2.0], [0, -1.0, 0]]), [-20.0, -30.0, 24.0]),
    "oblique": _oblique(),
}


@pytest.mark.parametrize("orientation", list(AFFINES))
def test_dicom_and_nifti_prepare_to_the_same_slices(tiny_site, tiny_case, data_cfg, tmp_path, orientation):
    affine = AFFINES[orientation]
    image, mask = tiny_case(seed=3, lesion=(18, 20, 12))
    site = tiny_site()
    site.add("as_nifti", image=image, mask=mask, affine=affine)
    site.add("as_dicom", image=image, mask=mask, affine=affine, fmt="dicom")
    root = site.write()

    nifti, dicom = read_volume(root / "imagesTr/as_nifti_0000.nii.gz"), read_volume(root / "dicom/as_dicom")
    assert nifti.array.shape == dicom.array.shape
    np.testing.assert_allclose(dicom.affine, nifti.affine, atol=1e-4)
    np.testing.assert_array_equal(dicom.array, nifti.array)
    assert np.all(np.diag(nifti.affine)[:3] > 0) or orientation == "oblique"  # RAS+ after canonicalisation

    report = prepare_site(root, tmp_path / "cache", data_cfg, progress=False)
    assert report.exit_code == 0, report.summary()
    prepared = load_prepared(report.cache_dir)
    a, b = prepared.slices["case_id"] == "as_nifti", prepared.slices["case_id"] == "as_dicom"
    assert prepared.slices[a]["z_index"].tolist() == prepared.slices[b]["z_index"].tolist()
    np.testing.assert_allclose(prepared.images[a.to_numpy()].astype(np.float32),
                               prepared.images[b.to_numpy()].astype(np.float32), atol=2e-3)
    np.testing.assert_array_equal(prepared.masks[a.to_numpy()], prepared.masks[b.to_numpy()])
    assert (prepared.masks == 1).any()


def test_canonical_orientation_puts_axial_slices_last():
    image = np.zeros((4, 5, 6), np.float32)
    image[1, 2, 3] = 1.0
    volume_affine = AFFINES["coronal"]
    volume = canonical(image, volume_affine)
    assert volume.array.shape == (4, 6, 5)  # stored (R, I, A) -> (R, A, S)
    voxel = np.argwhere(volume.array == 1.0)[0]
    # the bright voxel is at the same place in the world before and after
    np.testing.assert_allclose(volume.affine @ [*voxel, 1], volume_affine @ [1, 2, 3, 1])
    np.testing.assert_allclose(volume.spacing, [1.0, 2.0, 1.0])


def test_write_dicom_series_is_valid_and_deterministic(tiny_case, tmp_path):
    image, _ = tiny_case(seed=1)
    volume = image * 0.37 - 10.0  # negative values: stored as int16 with a slope and an intercept
    for out in ("a", "b"):
        write_dicom_series(volume, AFFINES["oblique"], tmp_path / out, patient_id="p1", rescale_slope=0.05,
                           rescale_intercept=-5.0, field_strength_t=1.5, manufacturer="Siemens", seed=7)
    files = sorted((tmp_path / "a").iterdir())
    assert len(files) == volume.shape[2]
    assert all(f.read_bytes() == (tmp_path / "b" / f.name).read_bytes() for f in files)

    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.file_meta.TransferSyntaxUID.is_little_endian
    assert ds.Modality == "MR" and ds.PatientID == "p1" and float(ds.MagneticFieldStrength) == 1.5
    assert ds.PixelRepresentation == 1 and float(ds.RescaleSlope) == 0.05
    assert float(ds.SliceThickness) == pytest.approx(2.0) and float(ds.SpacingBetweenSlices) == pytest.approx(2.0)
    assert len({pydicom.dcmread(f).SOPInstanceUID for f in files}) == len(files)

    array, affine = read_dicom_series(tmp_path / "a")
    np.testing.assert_allclose(affine, AFFINES["oblique"], atol=1e-4)
    np.testing.assert_allclose(array, volume, atol=0.05 / 2 + 1e-4)

    write_dicom_series(volume, AFFINES["oblique"], tmp_path / "c", patient_id="p1", seed=8, rescale_slope=0.05,
                       rescale_intercept=-5.0)
    assert pydicom.dcmread(tmp_path / "c" / files[0].name).SeriesInstanceUID != ds.SeriesInstanceUID


def test_write_dicom_series_ill_arg(tmp_path):
    with pytest.raises(ValueError, match="do not fit"):
        write_dicom_series(np.full((2, 2, 2), 1e6), np.eye(4), tmp_path, patient_id="p")
    with pytest.raises(ValueError, match="rescale_slope"):
        write_dicom_series(np.zeros((2, 2, 2)), np.eye(4), tmp_path, patient_id="p", rescale_slope=0)
