"""DICOM series in and out: one classic single-frame MR series per folder, with its geometry in RAS.

DICOM's patient coordinates are LPS (x towards the patient's Left, y Posterior, z Superior); NIfTI and this project
use RAS, so x and y change sign on the way in and out. A pixel ``(r, c)`` of a slice lies at

    ImagePositionPatient + c * PixelSpacing[1] * row_direction + r * PixelSpacing[0] * column_direction

where ``ImageOrientationPatient = row_direction + column_direction`` (PS3.3 C.7.6.2.1.1). Arrays here are ``(X, Y, Z)``
with X = column index, Y = row index and Z = slice, so a stored slice is ``volume[:, :, z].T``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID, generate_uid
from pydicom.valuerep import format_number_as_ds

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
POSITION_TOL_MM = 1e-3  # slices closer than this along the normal are "at the same position"
SPACING_GAP_TOL = 0.1  # a step more than 10 % off the median step means a missing or extra slice
GEOMETRY_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
_PYDICOM_3 = int(pydicom.__version__.split(".")[0]) >= 3
# What installs the decoders of compressed transfer syntaxes that pydicom lacks (pyproject.toml's `dicom` extra).
DICOM_EXTRA_INSTALL = 'pip install "braintumnet-fl[dicom]"'


class FileProblem(Exception):
    """A file or folder cannot be used as an image. ``checks`` turns it into a ``CaseProblem`` with the case id."""

    def __init__(self, path: Path | str, problem: str):
        self.path, self.problem = Path(path), " ".join(problem.split())  # always one line
        super().__init__(f"{path}: {self.problem}")


def read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one DICOM series folder.

    Returns:
        ``(array, affine)``: float32 ``(X, Y, Z)`` in stored voxel order (not yet canonical) with RescaleSlope and
        RescaleIntercept applied, and the 4×4 voxel-to-RAS-mm affine.

    Raises:
        FileProblem: unreadable or truncated file, no DICOM files, several series, multi-frame or 4-D data,
            inconsistent or missing geometry tags, a gap in the slice positions.
    """
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    files = [p for p in files if p.name.upper() != "DICOMDIR"]
    if not files:
        raise FileProblem(folder, "folder holds no DICOM files: point cases.csv at the folder of one series")
    slices = []
    for path in files:
        try:
            slices.append(pydicom.dcmread(path))
        except Exception as exc:  # pydicom raises many types for damaged files; all mean "re-export it"
            raise FileProblem(path, f"is not a readable DICOM file ({_why(exc)}): re-export the series") from None
    _check_one_series(folder, files, slices)
    row, col, normal = _directions(files[0], slices[0])
    order = np.argsort([float(np.dot(_position(f, s), normal)) for f, s in zip(files, slices)], kind="stable")
    files, slices = [files[i] for i in order], [slices[i] for i in order]
    positions = np.array([_position(f, s) for f, s in zip(files, slices)])
    step = _slice_step(folder, positions, normal, slices[0])

    dr, dc = (float(v) for v in slices[0].PixelSpacing)  # between rows, between columns
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * dc, col * dr, step, positions[0]
    array = np.stack([_pixels(f, s) for f, s in zip(files, slices)], axis=-1)  # (X, Y, Z)
    return array, LPS_TO_RAS @ lps


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:160]


def _check_one_series(folder: Path, files: list[Path], slices: list[Dataset]) -> None:
    series = sorted({str(s.get("SeriesInstanceUID", "")) for s in slices})
    if len(series) > 1:
        raise FileProblem(
            folder,
            f"folder mixes {len(series)} series (SeriesInstanceUID {', '.join(series)}): "
            "put each series in its own folder and point cases.csv at the CE-T1 one",
        )
    for path, ds in zip(files, slices):
        _check_header(path, ds)
        if int(_numbers(path, ds, "NumberOfFrames", 1, default=1)[0]) > 1:
            raise FileProblem(path, "is a multi-frame (enhanced) DICOM: export the series as single-frame files")
    shapes = {(int(s.Rows), int(s.Columns)) for s in slices}
    orientations = np.array([[float(v) for v in s.ImageOrientationPatient] for s in slices])
    if len(shapes) > 1 or np.abs(orientations - orientations[0]).max() > 1e-4:
        raise FileProblem(folder, "slices differ in size or orientation: the folder must hold one series only")


def _check_header(path: Path, ds: Dataset) -> None:
    """Every tag the reader turns into numbers is present (where required) and numeric, before any arithmetic: a
    damaged header is the file's problem, named with its tag, not a crash of the whole site's check."""
    missing = [t for t in (*GEOMETRY_TAGS, "Rows", "Columns", "PixelData") if t not in ds]
    if missing:
        raise FileProblem(path, f"lacks {', '.join(missing)}: export the original MR series")
    for keyword, count in (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6), ("PixelSpacing", 2),
                           ("Rows", 1), ("Columns", 1)):
        values = _numbers(path, ds, keyword, count)
        if keyword in ("PixelSpacing", "Rows", "Columns") and (values <= 0).any():
            raise FileProblem(path, f"{keyword} is {_shown(ds, keyword)}, not positive: re-export the series")
    for keyword in ("RescaleSlope", "RescaleIntercept", "SliceThickness"):
        _numbers(path, ds, keyword, 1, default=0.0)  # optional, but a number where given


def _numbers(path: Path, ds: Dataset, keyword: str, count: int, *, default: float | None = None) -> np.ndarray:
    """The ``count`` finite numbers of tag ``keyword``; ``default`` where the tag is absent or empty (None: required).

    Raises:
        FileProblem: the tag is missing (and required), or its value is not ``count`` finite numbers.
    """
    try:
        value = ds.get(keyword)
    except Exception:  # pydicom may fail converting a damaged value on access
        value = _shown(ds, keyword)
    if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
        if default is None:
            raise FileProblem(path, f"lacks {keyword}: export the original MR series")
        return np.full(count, default)
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        numbers = np.array([])
    if len(numbers) != count or not np.isfinite(numbers).all():
        what = "a number" if count == 1 else f"{count} numbers"
        raise FileProblem(path, f"{keyword} is {_shown(ds, keyword)}, not {what}: the header is damaged; re-export "
                          "the series from the scanner or PACS")
    return numbers


def _shown(ds: Dataset, keyword: str) -> str:
    """A tag's value as stored, for messages (at most 60 characters)."""
    element = ds.get_item(keyword)
    raw = getattr(element, "value", None)
    if isinstance(raw, bytes):
        text = raw.decode("latin-1", "replace").strip()
    elif isinstance(raw, (list, tuple, MultiValue)):
        text = "\\".join(str(v) for v in raw)  # as DICOM writes several values
    else:
        text = str(raw)
    return "'" + "".join(c if c.isprintable() else "?" for c in text[:60]) + "'"


def _directions(path: Path, ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3:
        raise FileProblem(path, f"ImageOrientationPatient {iop.tolist()} is not two unit orthogonal vectors")
    return row, col, normal


def _position(path: Path, ds: Dataset) -> np.ndarray:
    return np.array([float(v) for v in ds.ImagePositionPatient])


def _slice_step(folder: Path, positions: np.ndarray, normal: np.ndarray, first: Dataset) -> np.ndarray:
    """The LPS vector from one slice to the next (the affine's third column)."""
    if len(positions) == 1:
        return normal * float(first.get("SliceThickness", 1.0) or 1.0)
    gaps = np.diff(positions @ normal)
    if gaps.min() < POSITION_TOL_MM:
        raise FileProblem(
            folder,
            f"{int((gaps < POSITION_TOL_MM).sum()) + 1} slices share a position: the series looks 4-D "
            "(several volumes or echoes); export a single 3-D CE-T1 volume",
        )
    median = float(np.median(gaps))
    if np.abs(gaps - median).max() > SPACING_GAP_TOL * median:
        raise FileProblem(
            folder,
            f"slice positions are unevenly spaced ({gaps.min():.3g} to {gaps.max():.3g} mm): "
            "a slice is missing or extra; re-export the whole series",
        )
    # Using the end-to-end vector (not normal * spacing) keeps gantry-tilted series right.
    return (positions[-1] - positions[0]) / (len(positions) - 1)


def _pixels(path: Path, ds: Dataset) -> np.ndarray:
    try:
        stored = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax.is_compressed and not _decoder_installed(syntax):
            raise FileProblem(path, f"is compressed as {syntax.name} ({syntax}), and the decoder for it is not "
                              f"installed: {DICOM_EXTRA_INSTALL} (or re-export the series uncompressed)") from None
        raise FileProblem(path, f"pixel data cannot be decoded ({_why(exc)}): the file is truncated or damaged; "
                          "re-export it (uncompressed if it fails again)") from None
    if stored.ndim != 2:
        raise FileProblem(path, f"pixel data has shape {stored.shape}: export a grey-scale single-frame series")
    # Modality rescale by hand: MR series carry at most a slope and an intercept, never a LUT sequence.
    slope, intercept = float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return (stored.T.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)


def _decoder_installed(syntax: pydicom.uid.UID) -> bool:
    """Whether some pixel-data plugin of pydicom can decode ``syntax`` with the packages installed here.

    pydicom itself decodes RLE and, through Pillow, JPEG baseline and some JPEG 2000; JPEG lossless, JPEG-LS and
    12-bit JPEG need the pylibjpeg / pyjpegls plugins of the ``dicom`` extra.
    """
    if _PYDICOM_3:
        from pydicom.pixels.decoders.base import get_decoder

        try:
            return get_decoder(syntax).is_available
        except NotImplementedError:  # a syntax pydicom has no decoder for at all
            return False
    return any(handler.supports_transfer_syntax(syntax) and handler.is_available()
               for handler in pydicom.config.pixel_data_handlers)


def write_dicom_series(
    volume: np.ndarray,
    affine: np.ndarray,
    out_dir: Path,
    *,
    patient_id: str,
    study_uid: str | None = None,
    series_description: str = "CE-T1",
    rescale_slope: float = 1.0,
    rescale_intercept: float = 0.0,
    field_strength_t: float | None = None,
    manufacturer: str | None = None,
    seed: int = 0,
) -> None:
    """Write ``volume`` as an MR Image Storage series, one file per slice of its last axis (``IM0000.dcm``, ...).

    Stored values are ``round((volume - rescale_intercept) / rescale_slope)`` as uint16 (int16 if any is negative).
    Nothing depends on the clock, and UIDs come from ``generate_uid`` with entropy from ``seed``, ``patient_id`` and
    the series description, so the same arguments give byte-identical files.

    Args:
        volume: ``(X, Y, Z)`` intensities, indexed like ``affine``.
        affine: 4×4 voxel-to-RAS-mm affine; any orientation, including oblique ones.
        out_dir: created if needed.
        patient_id: PatientID and PatientName.
        study_uid: StudyInstanceUID; derived from ``seed`` and ``patient_id`` if None.
        series_description: SeriesDescription.
        rescale_slope, rescale_intercept: the modality rescale the reader applies.
        field_strength_t: MagneticFieldStrength in tesla, if known.
        manufacturer: Manufacturer, if known.
        seed: entropy for the UIDs.

    Raises:
        ValueError: a volume that is not 3-D, a non-positive slope, or values that do not fit 16 bits.

    Examples::

        write_dicom_series(vol, affine, Path("site/dicom/c001"), patient_id="c001", rescale_slope=0.05)
    """
    if volume.ndim != 3 or affine.shape != (4, 4):
        raise ValueError(f"volume must be (X, Y, Z) and affine 4x4, got {volume.shape} and {affine.shape}")
    if rescale_slope <= 0:
        raise ValueError(f"rescale_slope={rescale_slope}: use a positive value")
    stored = np.rint((np.asarray(volume, np.float64) - rescale_intercept) / rescale_slope)
    dtype = np.uint16 if stored.min() >= 0 else np.int16
    info = np.iinfo(dtype)
    if stored.min() < info.min or stored.max() > info.max:
        raise ValueError(f"values {stored.min()}..{stored.max()} do not fit {dtype.__name__}: adjust rescale_slope")
    stored = stored.astype(dtype)

    lps = LPS_TO_RAS @ np.asarray(affine, np.float64)
    dc, dr = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    row, col = lps[:3, 0] / dc, lps[:3, 1] / dr
    thickness = float(np.linalg.norm(lps[:3, 2]))
    entropy = [str(seed), patient_id, series_description]
    study_uid = study_uid or generate_uid(entropy_srcs=[str(seed), patient_id, "study"])
    series_uid = generate_uid(entropy_srcs=[*entropy, "series"])
    frame_uid = generate_uid(entropy_srcs=[*entropy, "frame-of-reference"])

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for z in range(volume.shape[2]):
        position = (lps @ np.array([0.0, 0.0, z, 1.0]))[:3]
        sop_uid = generate_uid(entropy_srcs=[*entropy, "instance", str(z)])
        ds = _slice_dataset(stored[:, :, z].T, sop_uid, patient_id, series_description)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.InstanceNumber = z + 1
        ds.ImagePositionPatient = _ds(position)
        ds.ImageOrientationPatient = _ds(np.concatenate([row, col]))
        ds.SliceLocation = _ds([np.dot(position, np.cross(row, col))])[0]
        ds.PixelSpacing = _ds([dr, dc])
        ds.SliceThickness = ds.SpacingBetweenSlices = _ds([thickness])[0]
        ds.RescaleSlope, ds.RescaleIntercept = _ds([rescale_slope])[0], _ds([rescale_intercept])[0]
        ds.Manufacturer = manufacturer or ""
        if field_strength_t is not None:
            ds.MagneticFieldStrength = _ds([field_strength_t])[0]
        _save(ds, out_dir / f"IM{z:04d}.dcm")


def _ds(values) -> list[str]:
    """Decimal String values: DICOM allows at most 16 characters each."""
    return [format_number_as_ds(float(v)) for v in np.ravel(values)]


def _slice_dataset(pixels: np.ndarray, sop_uid: str, patient_id: str, description: str) -> Dataset:
    """One slice's MR Image IOD, minus geometry: patient, study, series, equipment, image pixel (PS3.3 A.4)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, sop_uid
    meta.TransferSyntaxUID, meta.ImplementationClassUID = ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, sop_uid, "MR"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_id, patient_id, "", ""
    ds.StudyDate = ds.StudyTime = ds.ReferringPhysicianName = ds.AccessionNumber = ""
    ds.StudyID, ds.SeriesNumber, ds.SeriesDescription = "1", 1, description
    ds.PositionReferenceIndicator, ds.BodyPartExamined = "", "HEAD"
    # Acquisition parameters of the paper's CE-T1 protocol (§2.1.1): TE 3.02 ms, TR 1650 ms, flip angle 15°.
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "GR", "SP", "", "3D"
    ds.EchoTime, ds.RepetitionTime, ds.FlipAngle, ds.EchoTrainLength = "3.02", "1650", "15", 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, int(pixels.dtype == np.int16)
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


def _save(ds: Dataset, path: Path) -> None:
    if _PYDICOM_3:
        ds.save_as(path, enforce_file_format=True)
    else:  # pydicom 2.4 takes the encoding from the dataset, not the file meta
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
