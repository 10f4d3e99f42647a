"""Compressed DICOM: with the `dicom` extra every transfer syntax a PACS commonly exports reads like the uncompressed
series; without a decoder, one message names the syntax and the extra that installs it.

Series are compressed at test time where pydicom (or Pillow, or the few lines below for JPEG lossless) can encode;
pydicom's own test files, made by GDCM and dcmtk, cover the syntaxes nothing here encodes.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from braintumnet.data.dicom_io import FileProblem, read_dicom_series, write_dicom_series

pytestmark = pytest.mark.skipif(int(pydicom.__version__.split(".")[0]) < 3, reason="pydicom 3 encodes the series")
SLOPE, INTERCEPT = 1.5, -10.0


def _volume() -> np.ndarray:
    """A smooth 8-bit-range head (so JPEG baseline can hold it too) with a bright blob: (X, Y, Z) = 40×36×3."""
    x, y, z = np.meshgrid(np.arange(40), np.arange(36), np.arange(3), indexing="ij")
    stored = 120 + 60 * np.cos(x / 5.0) * np.sin(y / 4.0 + z) + 70 * np.exp(-((x - 14) ** 2 + (y - 9) ** 2) / 12.0)
    return np.rint(stored).clip(0, 255) * SLOPE + INTERCEPT


def _jpeg_lossless_sv1(pixels: np.ndarray) -> bytes:
    """One grey 16-bit frame as JPEG lossless, process 14, selection value 1 (ITU-T T.81 annex H), by hand: nothing
    installable here encodes it. Every difference category gets a 5-bit Huffman code."""
    x = pixels.astype(np.int64)
    predicted = np.empty_like(x)
    predicted[0, 0] = 1 << 15
    predicted[0, 1:], predicted[1:, 0], predicted[1:, 1:] = x[0, :-1], x[:-1, 0], x[1:, :-1]
    bits = []
    for diff in ((x - predicted + 32768) % 65536 - 32768).ravel().tolist():
        size = abs(diff).bit_length()
        bits.append(format(size, "05b"))
        if 0 < size < 16:
            bits.append(format(diff if diff > 0 else diff - 1 + (1 << size), f"0{size}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = bytes(int(stream[i:i + 8], 2) for i in range(0, len(stream), 8)).replace(b"\xff", b"\xff\x00")
    rows, cols = x.shape
    sof = b"\xff\xc3\x00\x0b\x10" + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + b"\x01\x01\x11\x00"
    dht = b"\xff\xc4\x00\x24\x00" + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = b"\xff\xda\x00\x08\x01\x01\x00\x01\x00\x00"
    return b"\xff\xd8" + sof + dht + sos + data + b"\xff\xd9"


def _jpeg_baseline(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="JPEG", quality=95)
    return out.getvalue()


def _compress(folder: Path, syntax) -> None:
    """Re-encode every file of a series folder in ``syntax``, in place."""
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        if syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax
        elif syntax in (JPEGLosslessSV1, JPEGBaseline8Bit):
            pixels = ds.pixel_array
            if syntax == JPEGBaseline8Bit:
                ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            frame = _jpeg_lossless_sv1(pixels) if syntax == JPEGLosslessSV1 else _jpeg_baseline(pixels)
            ds.PixelData, ds.file_meta.TransferSyntaxUID = encapsulate([frame]), syntax
            ds["PixelData"].VR = "OB"
        else:
            options = {JPEGLSNearLossless: {"jls_error": 2}, JPEG2000: {"j2k_cr": [8]}}.get(syntax, {})
            ds.compress(syntax, **options)
        ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """An uncompressed series and what the reader makes of it."""
    folder = tmp_path_factory.mktemp("codecs") / "plain"
    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    write_dicom_series(_volume(), affine, folder, patient_id="c1", rescale_slope=SLOPE, rescale_intercept=INTERCEPT)
    return (folder, *read_dicom_series(folder))


# syntax -> the largest error allowed, in image units (0: lossless)
SYNTAXES = {JPEGLosslessSV1: 0, JPEGLSLossless: 0, JPEG2000Lossless: 0, RLELossless: 0,
            DeflatedExplicitVRLittleEndian: 0, JPEGLSNearLossless: 2 * SLOPE, JPEG2000: 12 * SLOPE,
            JPEGBaseline8Bit: 12 * SLOPE}


@pytest.mark.parametrize("syntax", list(SYNTAXES), ids=[s.name for s in SYNTAXES])
def test_a_compressed_series_reads_like_the_uncompressed_one(plain, tmp_path, syntax):
    folder, expected, affine = plain
    shutil.copytree(folder, tmp_path / "series")
    _compress(tmp_path / "series", syntax)
    assert pydicom.dcmread(next((tmp_path / "series").iterdir())).file_meta.TransferSyntaxUID == syntax
    array, read_affine = read_dicom_series(tmp_path / "series")
    np.testing.assert_array_equal(read_affine, affine)
    if SYNTAXES[syntax] == 0:
        np.testing.assert_array_equal(array, expected)
    else:  # lossy: close, and not a copy of the uncompressed pixels (it was compressed)
        error = np.abs(array - expected)
        assert 0 < error.max() <= SYNTAXES[syntax] and error.mean() < 0.02 * np.ptp(expected)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_pydicoms_compressed_mr_files_read_like_the_uncompressed_one(tmp_path, name):
    for file in ("MR_small.dcm", name):
        (tmp_path / file).mkdir()
        shutil.copy(get_testdata_file(file), tmp_path / file / "IM0000.dcm")
    expected, affine = read_dicom_series(tmp_path / "MR_small.dcm")
    array, read_affine = read_dicom_series(tmp_path / name)
    np.testing.assert_array_equal(array, expected)
    np.testing.assert_array_equal(read_affine, affine)


def test_pydicoms_jpeg_lossless_and_12_bit_jpeg_files_decode():
    def pixels(name: str) -> np.ndarray:
        return pydicom.dcmread(get_testdata_file(name)).pixel_array.astype(np.float64)

    # GDCM's JPEG lossless SV1 file holds the same image as the RLE one, bit for bit.
    np.testing.assert_array_equal(pixels("SC_rgb_jpeg_gdcm.dcm"), pixels("SC_rgb_rle.dcm"))
    # A 12-bit JPEG extended (lossy) image: the same picture as the JPEG 2000 file.
    extended, j2k = pixels("JPGExtended.dcm"), pixels("JPEG2000.dcm")
    assert extended.shape == j2k.shape and np.corrcoef(extended.ravel(), j2k.ravel())[0, 1] > 0.9


def test_without_the_decoder_one_message_names_the_syntax_and_the_extra(tmp_path):
    (tmp_path / "series").mkdir()
    shutil.copy(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), tmp_path / "series" / "IM0000.dcm")
    # A Python without the `dicom` extra's packages: importing any of them fails, as where they are not installed.
    script = (
        "import sys\n"
        "for name in ('pylibjpeg', 'libjpeg', 'openjpeg', 'rle', 'jpeg_ls', 'gdcm'):\n"
        "    sys.modules[name] = None\n"
        "from braintumnet.data.dicom_io import FileProblem, read_dicom_series\n"
        "try:\n"
        "    read_dicom_series(sys.argv[1])\n"
        "except FileProblem as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "series")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"{tmp_path / 'series' / 'IM0000.dcm'}: is compressed as JPEG-LS Lossless Image Compression "
        '(1.2.840.10008.1.2.4.80), and the decoder for it is not installed: pip install "braintumnet-fl[dicom]" '
        "(or re-export the series uncompressed)")


def test_a_damaged_compressed_file_is_not_blamed_on_a_missing_decoder(plain, tmp_path):
    folder, _, _ = plain
    shutil.copytree(folder, tmp_path / "series")
    _compress(tmp_path / "series", JPEGLSLossless)
    damaged = sorted((tmp_path / "series").iterdir())[1]
    ds = pydicom.dcmread(damaged)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7 not a JPEG-LS stream"])
    ds.save_as(damaged, enforce_file_format=True)
    with pytest.raises(FileProblem, match="the file is truncated or damaged") as raised:
        read_dicom_series(tmp_path / "series")
    assert raised.value.path == damaged and "braintumnet-fl[dicom]" not in str(raised.value)
