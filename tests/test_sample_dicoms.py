"""sample_dicoms/: complete, honest about itself, and the model sees the source picture.

The central claim (issue 4): for every sample made from a source JPEG, the array that reaches
the model, `to_model_input(display_array(ds))`, agrees with the same JPEG sent through the same
function, whatever the transfer syntax, bit depth, rescale, VOI or polarity.

Metric: mean absolute difference (MAD) between the two [1, 200, 200] inputs, whose values are
histogram ranks in [0, 1]. Lossless samples must be within 0.005 and lossy ones within 0.01
(measured: 0.0004-0.0024 and 0.0004-0.0039). For scale: the same picture inverted scores 0.5,
and two different films of the same class score about 0.1-0.2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import (JPEG2000, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
                         RLELossless)

from pacs_ai.film.film_input import dataset_display_image
from pacs_ai.film.filters import skip_reason
from pacs_ai.film.pixels import display_array
from pacs_ai.model.preprocessing import to_model_input
from testbed.environment import REPO_ROOT, SAMPLE_DICOMS, require_tool, skip_or_fail

LOSSLESS_TOLERANCE = 0.005
LOSSY_TOLERANCE = 0.01
SIZE_LIMIT_BYTES = 40_000_000

MANIFEST = json.loads((SAMPLE_DICOMS / "manifest.json").read_text())
ENTRIES = MANIFEST["files"]
OK = [e for e in ENTRIES if e["expected_status"] == "ok"]
WITH_SOURCE = [e for e in ENTRIES if e["source"] and e["expected_status"] != "error"
               and e.get("number_of_frames", 1) == 1]
REQUIRED_SYNTAXES = {ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                     DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGExtended12Bit,
                     JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless,
                     JPEG2000, RLELossless}


def ids(entries: list[dict]) -> list[str]:
    return [e["file"] for e in entries]


def read(entry: dict) -> pydicom.Dataset:
    return pydicom.dcmread(SAMPLE_DICOMS / entry["file"])


@pytest.fixture(scope="module")
def originals() -> Path:
    from testbed.environment import SHARED_DATA

    folder = SHARED_DATA / "originals"
    if not (folder / "train").is_dir():
        skip_or_fail(f"source JPEGs not found at {folder}")
    return folder


# --- the folder and its manifest -------------------------------------------------------------

def test_manifest_lists_exactly_the_files_in_the_folder():
    on_disk = {p.name for p in SAMPLE_DICOMS.iterdir() if p.is_file()}
    assert on_disk - {"README.md", "manifest.json"} == {e["file"] for e in ENTRIES}
    assert len(ENTRIES) == len({e["file"] for e in ENTRIES})


def test_folder_is_small():
    total = sum(p.stat().st_size for p in SAMPLE_DICOMS.iterdir() if p.is_file())
    assert total < SIZE_LIMIT_BYTES, f"sample_dicoms/ is {total / 1e6:.1f} MB"


def test_manifest_entries_are_well_formed():
    assert MANIFEST["format"] == "pacs-ai-sample-dicoms/1"
    for entry in ENTRIES:
        assert entry["expected_status"] in ("ok", "skipped", "error"), entry["file"]
        assert (entry["expected_reason"] is None) == (entry["expected_status"] == "ok")
        if entry["source"]:
            assert entry["class"] in ("NORMAL", "PNEUMONIA")
            assert entry["source"].startswith(f"train/{entry['class']}/")
    instance_uids = [e["sop_instance_uid"] for e in ENTRIES if e["sop_instance_uid"]]
    assert len(instance_uids) == len(set(instance_uids))


def test_the_set_covers_what_the_issue_asks_for():
    ok_syntaxes = {e["transfer_syntax"] for e in OK}
    assert REQUIRED_SYNTAXES <= ok_syntaxes, REQUIRED_SYNTAXES - ok_syntaxes
    ok_uncompressed = [e for e in OK if not pydicom.uid.UID(e["transfer_syntax"]).is_compressed]
    for modality in ("CR", "DX"):
        for klass in ("NORMAL", "PNEUMONIA"):
            assert any(e["modality"] == modality and e["class"] == klass for e in OK), (
                modality, klass)
    assert {12, 16} <= {e["bits_stored"] for e in ok_uncompressed}
    assert {"PA", "AP"} <= {e["view_position"] for e in OK}
    assert {"MONOCHROME1", "MONOCHROME2"} <= {e["photometric_interpretation"] for e in OK}
    assert any(e["presentation_lut_shape"] == "INVERSE"
               and e["photometric_interpretation"] == "MONOCHROME2" for e in OK)
    assert {"window", "voi-lut", "none"} <= {e["voi"] for e in OK}
    assert any(e["pixel_representation"] == 1 for e in OK)
    assert {e["expected_reason"] for e in ENTRIES if e["expected_status"] == "skipped"} >= {
        "not-frontal", "not-chest", "unsupported-sop-class", "multi-frame"}
    assert {e["expected_reason"] for e in ENTRIES if e["expected_status"] == "error"} >= {
        "truncated-pixel-data", "too-large", "not-dicom"}


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e["transfer_syntax"]],
                         ids=ids([e for e in ENTRIES if e["transfer_syntax"]]))
def test_headers_match_the_manifest_and_identities_are_fake(entry):
    ds = pydicom.dcmread(SAMPLE_DICOMS / entry["file"], stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == entry["transfer_syntax"]
    assert ds.SOPInstanceUID == entry["sop_instance_uid"]
    assert ds.SOPClassUID == entry["sop_class_uid"]
    assert ds.StudyInstanceUID == entry["study_instance_uid"]
    assert ds.PhotometricInterpretation == entry["photometric_interpretation"]
    assert ds.get("PresentationLUTShape") == entry["presentation_lut_shape"]
    assert int(ds.BitsStored) == entry["bits_stored"]
    assert str(ds.PatientName).startswith("ZZTEST^")
    assert ds.PatientID.startswith("PACSAI-FAKE-")
    assert not ds.get("PatientBirthDate")


def test_non_dicom_sample_is_not_dicom():
    entry = next(e for e in ENTRIES if e["expected_reason"] == "not-dicom")
    with pytest.raises(pydicom.errors.InvalidDicomError):
        read(entry)


# --- every classifiable sample decodes, whatever its encoding ---------------------------------

@pytest.mark.parametrize("entry", OK, ids=ids(OK))
def test_ok_samples_pass_the_filter_and_decode(entry):
    ds = read(entry)
    assert skip_reason(ds) is None
    display = display_array(ds)
    assert display.dtype == np.float32
    assert display.shape == (entry["rows"], entry["columns"])
    assert 0.0 <= display.min() and display.max() <= 1.0
    assert display.std() > 0.1, "a radiograph, not a flat field"


def test_lossless_variants_of_one_film_give_the_same_model_input():
    # Same source, different storage (plain, implicit VR, VOI LUT, ...): no shared data needed.
    by_source: dict[str, list[dict]] = {}
    for entry in WITH_SOURCE:
        if not entry["lossy"]:
            by_source.setdefault(entry["source"], []).append(entry)
    groups = [group for group in by_source.values() if len(group) > 1]
    assert groups, "the set has several lossless variants of at least one film"
    for group in groups:
        inputs = [to_model_input(display_array(read(e))) for e in group]
        for entry, model_input in zip(group[1:], inputs[1:]):
            difference = np.abs(model_input - inputs[0]).mean()
            assert difference < LOSSLESS_TOLERANCE, (group[0]["file"], entry["file"], difference)


# --- the model sees the source picture --------------------------------------------------------

@pytest.mark.shared_data
@pytest.mark.parametrize("entry", WITH_SOURCE, ids=ids(WITH_SOURCE))
def test_model_input_agrees_with_the_source_jpeg(entry, originals):
    from_dicom = to_model_input(display_array(read(entry)))
    with Image.open(originals / entry["source"]) as picture:
        from_jpeg = to_model_input(np.asarray(picture.convert("L")))
    difference = float(np.abs(from_dicom - from_jpeg).mean())
    tolerance = LOSSY_TOLERANCE if entry["lossy"] else LOSSLESS_TOLERANCE
    assert difference < tolerance, f"{entry['file']}: MAD {difference:.4f} >= {tolerance}"
    # and as the service makes it, from a film decoded smaller (issue 16; measured 0.0005-0.0040)
    if entry["expected_status"] == "ok":
        picture = dataset_display_image(read(entry))
        from_service = to_model_input(picture.values, picture.box)
        difference = float(np.abs(from_service - from_jpeg).mean())
        assert difference < tolerance, f"{entry['file']} (service): MAD {difference:.4f}"
    # The metric can fail: the same film with the wrong polarity is far outside it.
    assert float(np.abs(from_dicom - (1.0 - from_jpeg)).mean()) > 0.3


@pytest.mark.shared_data
def test_different_films_are_far_apart_under_the_same_metric(originals):
    # Guards the tolerance's meaning: it is far below the distance between two real films.
    first, second = sorted((originals / "train" / "NORMAL").glob("*.jpeg"))[:2]
    inputs = []
    for path in (first, second):
        with Image.open(path) as picture:
            inputs.append(to_model_input(np.asarray(picture.convert("L"))))
    assert float(np.abs(inputs[0] - inputs[1]).mean()) > 10 * LOSSY_TOLERANCE


# --- regeneration is deterministic ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.real_peer
@pytest.mark.timeout(300)
def test_regenerating_gives_identical_files(tmp_path, originals):
    require_tool("dcmcjpeg")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "make_sample_dicoms.py"),
         "--originals", str(originals), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    for committed in SAMPLE_DICOMS.iterdir():
        regenerated = tmp_path / committed.name
        assert regenerated.read_bytes() == committed.read_bytes(), (
            f"{committed.name} differs: rerun scripts/make_sample_dicoms.py and commit")
