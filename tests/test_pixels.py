"""pacs_ai.film.pixels on small synthetic datasets: each step of the grayscale pipeline and each guard.

Real files in every transfer syntax are covered by tests/test_sample_dicoms.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from pacs_ai.film.pixels import (PixelDataError, apply_window, check_pixel_header, display_array,
                                 robust_window)

ROWS, COLUMNS = 32, 48


def dataset(pixels: np.ndarray | None = None, *, bits_stored: int = 12, **attributes) -> Dataset:
    """A minimal single-frame CR dataset holding `pixels` (a 12-bit ramp by default)."""
    if pixels is None:
        pixels = (np.arange(ROWS * COLUMNS).reshape(ROWS, COLUMNS) * 2).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8 if pixels.dtype.itemsize == 1 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def reason_code(error: pytest.ExceptionInfo) -> str:
    return str(error.value).split(":")[0]


# --- VOI: window, VOI LUT Sequence, robust window ---------------------------------------------

def test_linear_window_follows_the_standard_formula():
    # PS3.3 C.11.2.1.2.1 with c = 100, w = 11: below c - 0.5 - (w-1)/2 = 94.5 is black,
    # above c - 0.5 + (w-1)/2 = 104.5 is white, linear in between.
    values = np.array([94.0, 94.5, 99.5, 104.5, 105.0])
    np.testing.assert_allclose(apply_window(values, 100, 11), [0.0, 0.0, 0.5, 1.0, 1.0])


def test_linear_exact_and_sigmoid_windows():
    values = np.array([90.0, 95.0, 100.0, 105.0, 110.0])
    np.testing.assert_allclose(apply_window(values, 100, 10, "LINEAR_EXACT"),
                               [0.0, 0.0, 0.5, 1.0, 1.0])
    sigmoid = apply_window(values, 100, 10, "SIGMOID")
    assert sigmoid[2] == pytest.approx(0.5)
    assert np.all(np.diff(sigmoid) > 0) and sigmoid[0] > 0 and sigmoid[-1] < 1


def test_first_window_of_several_is_used():
    ds = dataset(WindowCenter=[1000, 3000], WindowWidth=[1000, 200])
    display = display_array(ds)
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ROWS, COLUMNS)
    np.testing.assert_allclose(display, apply_window(stored.astype(float), 1000, 1000), atol=1e-6)


@pytest.mark.parametrize("center, width", [(b"2047,75 ", b"4096"), (b"2048", b"4095,5 "),
                                           (b"2048", b"wide")],
                         ids=["decimal-comma-center", "decimal-comma-width", "not-a-number"])
def test_an_unreadable_window_is_no_window(center, width):
    # Some localised modality software writes Window Center/Width with a decimal comma; pydicom
    # then gives the text as it is. Like a width under 1, it is no usable window: the film gets
    # the robust window (a viewer's auto window) instead of failing as decode-failed.
    ds = dataset()
    for tag, value in ((0x00281050, center), (0x00281051, width)):
        ds[tag] = RawDataElement(Tag(tag), "DS", len(value), value, 0, False, True)
    np.testing.assert_array_equal(display_array(ds), display_array(dataset()))


@pytest.mark.parametrize("tag", [0x00281053, 0x00281052], ids=["slope", "intercept"])
def test_a_rescale_that_is_not_a_number_is_a_bad_header(tag):
    # Unlike a window, a rescale cannot be done without: it says what the stored values mean
    # (a negative slope turns them over). The reason names the header, not a decoder.
    ds = dataset()
    ds[tag] = RawDataElement(Tag(tag), "DS", 4, b"1,5 ", 0, False, True)
    with pytest.raises(PixelDataError) as error:
        display_array(ds)
    assert reason_code(error) == "bad-pixel-header"
    assert "Rescale" in str(error.value) and "'1,5'" in str(error.value)


def test_rescale_is_applied_before_the_window():
    # stored 0..3070, slope 2, intercept -1000 -> modality values -1000..5140
    ds = dataset(RescaleSlope="2", RescaleIntercept="-1000", WindowCenter="0", WindowWidth="100")
    display = display_array(ds)
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ROWS, COLUMNS)
    expected = apply_window(stored * 2.0 - 1000.0, 0, 100)
    np.testing.assert_allclose(display, expected, atol=1e-6)
    assert 0 < np.count_nonzero((display > 0) & (display < 1))


def voi_lut_item(table: list[int], first_mapped: int = 0, bits: int = 16) -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", [len(table), first_mapped, bits])
    item.add_new(0x00283006, "US", table)
    return item


def test_voi_lut_sequence_wins_over_the_window():
    # A LUT that maps everything below 1000 to white and above to black: nothing a window
    # could produce, so the output proves which one was used.
    table = [65535] * 1000 + [0] * 3096
    ds = dataset(WindowCenter="2048", WindowWidth="4096",
                 VOILUTSequence=Sequence([voi_lut_item(table)]))
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ROWS, COLUMNS)
    display = display_array(ds)
    np.testing.assert_array_equal(display, np.where(stored < 1000, 1.0, 0.0))


def test_voi_lut_clamps_outside_its_range_and_honours_first_mapped_value():
    table = list(range(0, 65536, 256))  # 256 entries, mapped from stored 1000
    ds = dataset(VOILUTSequence=Sequence([voi_lut_item(table, first_mapped=1000)]))
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ROWS, COLUMNS)
    display = display_array(ds)
    assert np.all(display[stored < 1000] == 0.0)
    assert np.all(display[stored >= 1000 + 255] == pytest.approx(table[-1] / 65535))
    inside = (stored >= 1000) & (stored < 1255)
    np.testing.assert_allclose(display[inside], (stored[inside] - 1000) * 256 / 65535, atol=1e-6)


def test_modality_lut_sequence_replaces_rescale():
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])
    item.add_new(0x00283006, "US", [4095 - v for v in range(4096)])  # inverts the values
    ds = dataset(ModalityLUTSequence=Sequence([item]), RescaleSlope="5", RescaleIntercept="7",
                 WindowCenter="2048", WindowWidth="4096")
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ROWS, COLUMNS)
    np.testing.assert_allclose(display_array(ds),
                               apply_window(4095.0 - stored, 2048, 4096), atol=1e-6)


def test_robust_window_ignores_a_few_hot_and_dead_pixels():
    rng = np.random.default_rng(7)
    pixels = rng.integers(1000, 2001, size=(100, 100)).astype(np.uint16)
    pixels.flat[:20] = 4095   # 0.2 % hot
    pixels.flat[20:40] = 0    # 0.2 % dead
    display = display_array(dataset(pixels))  # no window, no VOI LUT
    body = display.ravel()[40:]
    assert body.min() < 0.02 and body.max() > 0.98  # the contrast is set by the body
    assert np.all(display.flat[:20] == 1.0) and np.all(display.flat[20:40] == 0.0)


def test_robust_window_of_a_flat_image_is_black_not_nan():
    assert np.all(robust_window(np.full((4, 4), 7.0)) == 0.0)
    assert np.all(display_array(dataset(np.full((8, 8), 300, dtype=np.uint16))) == 0.0)


# --- polarity ----------------------------------------------------------------------------------

def test_monochrome1_is_inverted():
    mono2 = display_array(dataset(WindowCenter="2048", WindowWidth="4096"))
    mono1 = display_array(dataset(WindowCenter="2048", WindowWidth="4096",
                                  PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_presentation_lut_shape_inverse_inverts_monochrome2():
    plain = display_array(dataset(WindowCenter="2048", WindowWidth="4096"))
    inverse = display_array(dataset(WindowCenter="2048", WindowWidth="4096",
                                    PresentationLUTShape="INVERSE"))
    np.testing.assert_allclose(inverse, 1.0 - plain, atol=1e-6)


def test_monochrome1_with_inverse_is_inverted_once():
    # The DX IOD requires INVERSE with MONOCHROME1; it restates the same inversion.
    mono1 = display_array(dataset(WindowCenter="2048", WindowWidth="4096",
                                  PhotometricInterpretation="MONOCHROME1"))
    both = display_array(dataset(WindowCenter="2048", WindowWidth="4096",
                                 PhotometricInterpretation="MONOCHROME1",
                                 PresentationLUTShape="INVERSE"))
    np.testing.assert_array_equal(both, mono1)


# --- bit depths and signedness ----------------------------------------------------------------

@pytest.mark.parametrize("bits_stored", [8, 10, 12, 14, 16])
def test_every_bit_depth_keeps_the_order_of_values(bits_stored):
    top = 2 ** bits_stored - 1
    ramp = np.linspace(0, top, ROWS * COLUMNS).round().reshape(ROWS, COLUMNS)
    dtype = np.uint8 if bits_stored == 8 else np.uint16
    display = display_array(dataset(ramp.astype(dtype), bits_stored=bits_stored))
    assert display.dtype == np.float32 and display.shape == (ROWS, COLUMNS)
    assert np.all(np.diff(display.ravel()) >= 0) and display.max() == 1.0


def test_signed_pixels_with_rescale():
    pixels = np.linspace(-30000, 30000, ROWS * COLUMNS).round().astype(np.int16)
    ds = dataset(pixels.reshape(ROWS, COLUMNS), bits_stored=16, RescaleSlope="0.5",
                 RescaleIntercept="16384", WindowCenter="16384", WindowWidth="30000")
    display = display_array(ds)
    np.testing.assert_allclose(display.ravel(),
                               apply_window(pixels * 0.5 + 16384.0, 16384, 30000), atol=1e-6)
    assert display.ravel()[0] == 0.0 and display.ravel()[-1] == 1.0


def test_signed_12_bit_in_16_allocated_is_sign_extended():
    values = np.array([-2048, -1, 0, 2047] * (ROWS * COLUMNS // 4), dtype=np.int16)
    ds = dataset(values.reshape(ROWS, COLUMNS), WindowCenter="0", WindowWidth="4096")
    display = display_array(ds).ravel()
    assert display[0] < display[1] < display[2] < display[3]


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_pixels_decode_to_the_same_picture(syntax):
    native = dataset(WindowCenter="1500", WindowWidth="2000")
    compressed = dataset(WindowCenter="1500", WindowWidth="2000")
    compressed.compress(syntax, generate_instance_uid=False)
    np.testing.assert_array_equal(display_array(compressed), display_array(native))


# --- guards before decoding -------------------------------------------------------------------

def test_huge_declared_size_is_refused_before_decoding():
    ds = dataset()
    ds.Rows = ds.Columns = 60000
    with pytest.raises(PixelDataError) as error:
        display_array(ds)
    assert reason_code(error) == "too-large"
    assert "60000 x 60000" in str(error.value)


def test_the_pixel_limit_is_configurable():
    with pytest.raises(PixelDataError) as error:
        display_array(dataset(), max_pixels=ROWS * COLUMNS - 1)
    assert reason_code(error) == "too-large"
    check_pixel_header(dataset(), max_pixels=ROWS * COLUMNS)  # exactly at the limit is fine


def test_native_pixel_data_shorter_than_declared():
    ds = dataset()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    with pytest.raises(PixelDataError) as error:
        display_array(ds)
    assert reason_code(error) == "truncated-pixel-data"


def test_encapsulated_pixel_data_cut_inside_a_fragment():
    ds = dataset()
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) - 40]  # item length now overruns the data
    ds["PixelData"].is_undefined_length = True
    with pytest.raises(PixelDataError) as error:
        display_array(ds)
    assert reason_code(error) == "truncated-pixel-data"


def test_encapsulated_pixel_data_without_frames():
    ds = dataset()
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"  # an empty offset table, no fragment
    with pytest.raises(PixelDataError) as error:
        display_array(ds)
    assert reason_code(error) == "truncated-pixel-data"


def test_garbage_compressed_data_is_a_decode_failure():
    ds = dataset()
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    garbage = b"\x00\x11" * 64
    ds.PixelData = (b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0"
                    + len(garbage).to_bytes(4, "little") + garbage)
    with pytest.raises(PixelDataError) as error:
        display_array(ds)
    assert reason_code(error) == "decode-failed"


@pytest.mark.parametrize(("attributes", "code"), [
    ({"NumberOfFrames": 2}, "multi-frame"),
    ({"SamplesPerPixel": 3}, "colour"),
    ({"PhotometricInterpretation": "PALETTE COLOR"}, "colour"),
    ({"PhotometricInterpretation": "MONOCHROME3"}, "not-monochrome"),
    ({"BitsAllocated": 32}, "unsupported-bit-depth"),
    ({"BitsStored": 17}, "unsupported-bit-depth"),
    ({"Rows": 0}, "bad-pixel-header"),
])
def test_header_guards(attributes, code):
    with pytest.raises(PixelDataError) as error:
        display_array(dataset(**attributes))
    assert reason_code(error) == code


def test_no_pixel_data():
    ds = dataset()
    del ds.PixelData
    with pytest.raises(PixelDataError) as error:
        display_array(ds)
    assert reason_code(error) == "no-pixel-data"


def test_unknown_compressed_transfer_syntax():
    ds = dataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no image decoder
    with pytest.raises(PixelDataError) as error:
        display_array(ds)
    assert reason_code(error) == "unsupported-transfer-syntax"


def test_pixel_data_error_is_a_value_error():
    assert issubclass(PixelDataError, ValueError)


def test_bits_above_bits_stored_are_ignored():
    # Old modalities kept overlays in the unused high bits of 12-bit data.
    pixels = np.full((ROWS, COLUMNS), 100, dtype=np.uint16)
    pixels[: ROWS // 2] = 3000
    dirty = pixels.copy()
    dirty[0, :] |= 0xF000
    clean = display_array(dataset(pixels, WindowCenter="2048", WindowWidth="4096"))
    np.testing.assert_array_equal(
        display_array(dataset(dirty, WindowCenter="2048", WindowWidth="4096")), clean)
