"""The pneumonia SR: content tree, UIDs, copied patient/study data, and the real checkers.

Sources are small synthetic CR and DX datasets made here (CR without Imager Pixel Spacing,
MONOCHROME1 and MONOCHROME2, with pixel data and read back with stop_before_pixels).
"""

from __future__ import annotations

import copy
import io
import json
import math
import re
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacs_ai.model.model import ModelInfo, PneumoniaModel
from pacs_ai.report.report import (ReportSourceError, build_report, report_summary,
                                   threshold_parameter)
from pacs_ai.report.uids import report_series_uid, report_uid, tracking_uid
from testbed.environment import require_tool
from tests.dicom_tools import DSRDUMP_NO_UTF8_VR_CHECK, run_dciodvfy, run_dsrdump

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SR_CLASS_OF_KIND = {"comprehensive3d": COMPREHENSIVE_3D_SR, "comprehensive": COMPREHENSIVE_SR}
SR_READER_OF_KIND = {"comprehensive3d": hd.sr.Comprehensive3DSR,
                     "comprehensive": hd.sr.ComprehensiveSR}

MODEL = ModelInfo(name="pacs-ai-pneumonia", version="1.4.2", threshold=0.42,
                  output_kind="logit", metadata={})
PROBABILITY_PRESENT = 0.87
PROBABILITY_ABSENT = 0.08


def make_source(kind: str = "CR", *, photometric: str = "MONOCHROME1",
                with_pixels: bool = True) -> Dataset:
    """A small but complete-enough chest CR or DX image (DX For Presentation or For Processing)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = {"CR": CR_STORAGE, "DX": DX_PRESENTATION, "DX-PROC": DX_PROCESSING}[kind]
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR" if kind == "CR" else "DX"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PAT-0001"
    ds.PatientBirthDate = "19600203"
    ds.PatientSex = "F"
    ds.PatientAge = "064Y"
    ds.StudyDate = "20240105"
    ds.StudyTime = "083012"
    ds.StudyID = "S1"
    ds.AccessionNumber = "ACC-77"
    ds.ReferringPhysicianName = "Who^Doctor"
    ds.StudyDescription = "XR CHEST PA"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 7
    ds.Manufacturer = "Example Imaging"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if kind == "CR":
        ds.PatientOrientation = ""  # Type 2C, often empty on CR; no Imager Pixel Spacing
        ds.PixelSpacing = [0.2, 0.2]
    else:
        ds.PatientOrientation = ["L", "F"]
        ds.ImagerPixelSpacing = [0.148, 0.15]
        ds.PresentationIntentType = "FOR PRESENTATION" if kind == "DX" else "FOR PROCESSING"
    ds.Rows = 32
    ds.Columns = 24
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if with_pixels:
        ramp = np.arange(32 * 24, dtype=np.uint16).reshape(32, 24) * 5
        ds.PixelData = ramp.tobytes()
    return ds


def items_named(sequence, code_value: str, scheme: str) -> list[Dataset]:
    """Content items anywhere below ``sequence`` whose concept name is (code_value, scheme)."""
    found = []
    for item in sequence:
        names = item.get("ConceptNameCodeSequence")
        if names and names[0].CodeValue == code_value and names[0].CodingSchemeDesignator == scheme:
            found.append(item)
        found += items_named(item.get("ContentSequence", []), code_value, scheme)
    return found


def only_item(sr: Dataset, code_value: str, scheme: str) -> Dataset:
    found = items_named(sr.ContentSequence, code_value, scheme)
    assert len(found) == 1, f"expected one ({code_value}, {scheme}) item, found {len(found)}"
    return found[0]


def code_of(item: Dataset) -> tuple[str, str, str]:
    code = item.ConceptCodeSequence[0]
    return code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning


@pytest.mark.parametrize("sr_kind", ["comprehensive3d", "comprehensive"])
@pytest.mark.parametrize("kind,photometric", [("CR", "MONOCHROME1"), ("DX", "MONOCHROME2"),
                                              ("DX-PROC", "MONOCHROME1")])
@pytest.mark.parametrize("probability,expected", [(PROBABILITY_PRESENT, "Present"),
                                                  (PROBABILITY_ABSENT, "Absent")])
def test_content_tree(kind, photometric, sr_kind, probability, expected):
    source = make_source(kind, photometric=photometric)
    sr = build_report(source, probability, MODEL, sr_kind=sr_kind)

    # Document level: class, own series in the same study, flags, description.
    assert sr.SOPClassUID == SR_CLASS_OF_KIND[sr_kind]
    assert sr.file_meta.MediaStorageSOPClassUID == sr.SOPClassUID
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SOPInstanceUID == report_uid(source.SOPInstanceUID, MODEL.name, MODEL.version,
                                           None if sr_kind == "comprehensive3d" else sr_kind)
    assert sr.SeriesInstanceUID == report_series_uid(source.StudyInstanceUID, MODEL.name,
                                                     MODEL.version)
    assert sr.VerificationFlag == "UNVERIFIED"
    assert "VerifyingObserverSequence" not in sr
    assert sr.SeriesDescription == "pacs-ai pneumonia (AI, not verified)"
    assert sr.InstanceNumber == source.InstanceNumber

    # Patient and study attributes copied from the source.
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                    "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                    "ReferringPhysicianName", "StudyDescription", "SpecificCharacterSet"):
        assert sr[keyword].value == source[keyword].value, keyword

    # The source is the evidence of this procedure.
    evidence = sr.CurrentRequestedProcedureEvidenceSequence
    assert len(evidence) == 1 and evidence[0].StudyInstanceUID == source.StudyInstanceUID
    referenced = evidence[0].ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert referenced.ReferencedSOPSequence[0].ReferencedSOPClassUID == source.SOPClassUID

    # Root: TID 1500 Imaging Measurement Report, procedure Plain chest X-ray.
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
    assert code_of(only_item(sr, "121058", "DCM")) == ("399208008", "SCT", "Plain chest X-ray")

    # Image library holds the source image.
    library = only_item(sr, "111028", "DCM")
    images = [item for item in items_named(library.ContentSequence, "260753009", "SCT")
              if item.ValueType == "IMAGE"]
    assert len(images) == 1
    assert images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert images[0].ReferencedSOPSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    rows = items_named(images[0].ContentSequence, "110910", "DCM")
    assert float(rows[0].MeasuredValueSequence[0].NumericValue) == source.Rows
    spacing = items_named(images[0].ContentSequence, "111026", "DCM")
    assert len(spacing) == (0 if kind == "CR" else 1)  # CR carries no Imager Pixel Spacing

    # One measurement group (TID 1501) with tracking, algorithm, site, finding, probability.
    groups = items_named(sr.ContentSequence, "125007", "DCM")
    assert len(groups) == 1
    group = groups[0]
    assert group.ContentTemplateSequence[0].TemplateIdentifier == "1501"
    in_group = group.ContentSequence
    assert items_named(in_group, "112039", "DCM")[0].TextValue
    assert items_named(in_group, "112040", "DCM")[0].UID == tracking_uid(
        source.SOPInstanceUID, MODEL.name, MODEL.version)
    assert items_named(in_group, "111001", "DCM")[0].TextValue == MODEL.name
    assert items_named(in_group, "111003", "DCM")[0].TextValue == MODEL.version
    assert [item.TextValue for item in items_named(in_group, "111002", "DCM")] == [
        threshold_parameter(MODEL.threshold)] == ["threshold=0.42"]
    assert code_of(items_named(in_group, "363698007", "SCT")[0]) == ("39607008", "SCT", "Lung")
    evaluation = items_named(in_group, "233604007", "SCT")
    assert len(evaluation) == 1
    assert evaluation[0].ValueType == "CODE"
    expected_code = ("52101004", "SCT", "Present") if expected == "Present" else (
        "272519000", "SCT", "Absent")
    assert code_of(evaluation[0]) == expected_code
    numbers = [item for item in in_group if item.ValueType == "NUM"]
    assert len(numbers) == 1, "the probability must be the group's one numeric measurement"
    measured = numbers[0].MeasuredValueSequence[0]
    assert numbers[0].ConceptNameCodeSequence[0].CodeValue == "122157"
    assert math.isclose(float(measured.NumericValue), probability)
    unit = measured.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")
    group_sources = [item for item in in_group if item.ValueType == "IMAGE"]
    assert [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in group_sources] \
        == [source.SOPInstanceUID]

    # highdicom reads it back as a TID 1500 report with the same finding.
    parsed = SR_READER_OF_KIND[sr_kind].from_dataset(sr)
    parsed_groups = parsed.content.get_image_measurement_groups()
    assert len(parsed_groups) == 1
    evaluations = parsed_groups[0].get_qualitative_evaluations()
    assert [e.value.meaning for e in evaluations] == [expected]


@pytest.mark.parametrize("probability", [0.0, 0.2, 0.41999, 0.42, 0.42001, 0.9, 1.0])
def test_finding_matches_model_threshold_rule(probability):
    """The report's finding is exactly what PneumoniaModel.finding says (>= threshold)."""
    model = PneumoniaModel(module=None, info=MODEL, path=Path("unused.pt"))
    summary = report_summary(build_report(make_source("DX"), probability, MODEL))
    assert summary["finding"] == model.finding(probability)
    assert summary["probability"] == pytest.approx(probability)


def test_uids_are_deterministic_and_differ_across_model_versions():
    source = make_source("CR")
    first = build_report(source, 0.6, MODEL)
    again = build_report(copy.deepcopy(source), 0.6, MODEL)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (
        again.SOPInstanceUID, again.SeriesInstanceUID)

    newer = ModelInfo(name=MODEL.name, version="1.5.0", threshold=MODEL.threshold,
                      output_kind="logit", metadata={})
    by_newer = build_report(source, 0.6, newer)
    assert by_newer.SOPInstanceUID != first.SOPInstanceUID
    assert by_newer.SeriesInstanceUID != first.SeriesInstanceUID

    other_model = ModelInfo(name="other-model", version=MODEL.version,
                            threshold=MODEL.threshold, output_kind="logit", metadata={})
    assert build_report(source, 0.6, other_model).SOPInstanceUID != first.SOPInstanceUID

    # Another image of the same study: a different report in the same AI series.
    sibling = make_source("CR")
    sibling.StudyInstanceUID = source.StudyInstanceUID
    by_sibling = build_report(sibling, 0.6, MODEL)
    assert by_sibling.SOPInstanceUID != first.SOPInstanceUID
    assert by_sibling.SeriesInstanceUID == first.SeriesInstanceUID

    for uid in (first.SOPInstanceUID, first.SeriesInstanceUID, by_newer.SOPInstanceUID,
                report_uid("1.2.3", "m" * 60, "v" * 60)):
        assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", uid), uid
        assert len(uid) <= 64


def test_stop_before_pixels_source_gives_the_same_report(tmp_path):
    source = make_source("CR", photometric="MONOCHROME1")
    path = tmp_path / "source.dcm"
    source.save_as(path, enforce_file_format=True)
    header_only = pydicom.dcmread(path, stop_before_pixels=True)
    assert "PixelData" not in header_only
    full = pydicom.dcmread(path)
    before = copy.deepcopy(full)

    from_header = build_report(header_only, 0.55, MODEL)
    from_full = build_report(full, 0.55, MODEL)
    assert report_summary(from_header) == report_summary(from_full)
    assert full == before, "build_report must not modify the source"
    assert "PixelData" not in from_full


def test_report_survives_a_file_round_trip(tmp_path):
    source = make_source("DX", photometric="MONOCHROME2")
    sr = build_report(source, PROBABILITY_PRESENT, MODEL, institution_name="General Hospital")
    path = tmp_path / "report.dcm"
    sr.save_as(path, enforce_file_format=True)
    read_back = pydicom.dcmread(path)
    summary = report_summary(read_back)
    assert summary == report_summary(sr)
    assert summary["finding"] == "pneumonia"
    assert summary["source_sop_instance_uid"] == source.SOPInstanceUID
    assert summary["algorithm_name"] == MODEL.name
    assert summary["algorithm_version"] == MODEL.version
    assert read_back.InstitutionName == "General Hospital"
    assert read_back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def hostile_source() -> Dataset:
    """A source missing Type 2 patient/study attributes and with values DICOM does not allow,
    as a careless modality sends them (pydicom keeps such values when reading)."""
    source = make_source("CR")
    for keyword in ("PatientBirthDate", "StudyID", "AccessionNumber", "ReferringPhysicianName",
                    "StudyTime", "InstanceNumber", "SpecificCharacterSet"):
        delattr(source, keyword)
    source.PatientSex = "X"  # valid CS, but not one of M/F/O
    raw = {  # keyword: (VR, bytes as received)
        "StudyDate": ("DA", b"5.1.2024"),
        "PatientSize": ("DS", b"1,75"),
        "StudyDescription": ("LO", b"X" * 70),  # LO allows 64 characters
        "PatientWeight": ("DS", b"7" * 20),  # DS allows 16
        "LargestImagePixelValue": ("US", b"\x01\x02\x03"),  # 3 bytes: cannot be decoded
    }
    for keyword, (vr, value) in raw.items():
        tag = Tag(keyword)
        source[tag] = RawDataElement(tag, vr, len(value), value, 0, True, True)
    return source


def test_missing_and_invalid_patient_study_values_are_left_empty():
    source = hostile_source()
    sr = build_report(source, 0.3, MODEL)
    for keyword in ("PatientBirthDate", "StudyID", "AccessionNumber", "ReferringPhysicianName",
                    "StudyTime", "PatientSex", "StudyDate"):
        assert keyword in sr and sr[keyword].value in (None, ""), keyword
    for keyword in ("PatientSize", "PatientWeight", "StudyDescription",
                    "LargestImagePixelValue"):
        assert keyword not in sr, keyword
    assert sr.PatientName == source.PatientName
    assert sr.PatientID == source.PatientID
    assert sr.InstanceNumber == 1
    assert source.PatientSex == "X", "the source itself must stay untouched"


@pytest.mark.parametrize("change,message", [
    (lambda ds: setattr(ds, "SOPClassUID", CT_STORAGE), "not a CR or DX image"),
    (lambda ds: delattr(ds, "SOPInstanceUID"), "SOPInstanceUID"),
    (lambda ds: delattr(ds, "StudyInstanceUID"), "StudyInstanceUID"),
    (lambda ds: delattr(ds, "Rows"), "Rows"),
])
def test_unusable_source_is_a_clear_error(change, message):
    source = make_source("DX")
    change(source)
    with pytest.raises(ReportSourceError, match=message):
        build_report(source, 0.5, MODEL)


@pytest.mark.parametrize("probability", [-0.01, 1.01, float("nan"), float("inf")])
def test_probability_outside_unit_interval_is_rejected(probability):
    with pytest.raises(ValueError, match="not in"):
        build_report(make_source("DX"), probability, MODEL)


def test_unknown_sr_kind_is_rejected():
    with pytest.raises(ValueError, match="comprehensive3d"):
        build_report(make_source("DX"), 0.5, MODEL, sr_kind="basic")


def test_numpy_probabilities_are_accepted():
    sr = build_report(make_source("DX"), np.float32(0.75), MODEL)
    assert report_summary(sr)["probability"] == pytest.approx(0.75)


# --- Real checkers: dicom3tools dciodvfy and DCMTK dsrdump ---------------------------------------

REAL_PEER_CASES = [
    pytest.param(kind, photometric, sr_kind, probability,
                 id=f"{kind}-{photometric}-{sr_kind}-p{probability}")
    for kind, photometric in [("CR", "MONOCHROME1"), ("DX", "MONOCHROME2"),
                              ("DX-PROC", "MONOCHROME1")]
    for sr_kind in ("comprehensive3d", "comprehensive")
    for probability in (PROBABILITY_PRESENT, PROBABILITY_ABSENT)
]


@pytest.mark.real_peer
@pytest.mark.parametrize("kind,photometric,sr_kind,probability", REAL_PEER_CASES)
def test_dciodvfy_finds_no_errors(kind, photometric, sr_kind, probability):
    sr = build_report(make_source(kind, photometric=photometric), probability, MODEL,
                      sr_kind=sr_kind, institution_name="General Hospital")
    result = run_dciodvfy(sr)
    print(result.report())
    expected_iod = "Comprehensive3DSR" if sr_kind == "comprehensive3d" else "ComprehensiveSR"
    assert expected_iod in result.stdout + result.stderr, result.output
    assert result.errors == [], result.output


@pytest.mark.real_peer
def test_dciodvfy_finds_no_errors_for_a_hostile_source():
    result = run_dciodvfy(build_report(hostile_source(), 0.3, MODEL))
    print(result.report())
    assert result.errors == [], result.output


@pytest.mark.real_peer
def test_dciodvfy_wrapper_reports_errors():
    """The wrapper must see dciodvfy's errors, or the clean results above would mean nothing."""
    sr = build_report(make_source("DX"), 0.5, MODEL)
    del sr.CompletionFlag
    result = run_dciodvfy(sr)
    assert any("CompletionFlag" in line for line in result.errors), result.output


@pytest.mark.real_peer
@pytest.mark.parametrize("kind,photometric,sr_kind,probability", REAL_PEER_CASES)
def test_dsrdump_reads_the_content_tree(kind, photometric, sr_kind, probability, tmp_path):
    source = make_source(kind, photometric=photometric)
    path = tmp_path / "report.dcm"
    build_report(source, probability, MODEL, sr_kind=sr_kind).save_as(
        path, enforce_file_format=True)
    result = run_dsrdump(path)
    print(result.report())
    assert result.returncode == 0, result.output
    assert result.errors == [] and result.warnings == [], result.output
    dump = result.stdout
    assert "Verification Flag   : UNVERIFIED" in dump
    assert 'CONTAINER:(126000,DCM,"Imaging Measurement Report")' in dump
    assert "TID 1500" in dump and "TID 1501" in dump
    assert '(121058,DCM,"Procedure reported")=(399208008,SCT,"Plain chest X-ray")' in dump
    assert '(363698007,SCT,"Finding Site")=(39607008,SCT,"Lung")' in dump
    finding = '(52101004,SCT,"Present")' if probability >= MODEL.threshold else \
        '(272519000,SCT,"Absent")'
    assert f'CODE:(233604007,SCT,"Pneumonia")={finding}' in dump
    assert f'NUM:(122157,DCM,"Probability")="{probability}" (1,UCUM,"no units")' in dump
    assert f'(111003,DCM,"Algorithm Version")="{MODEL.version}"' in dump
    assert dump.count(source.SOPInstanceUID) == 2  # image library + measurement group source


@pytest.mark.real_peer
@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
def test_dsrdump_reads_non_ascii_patient_names(charset):
    source = make_source("DX")
    source.SpecificCharacterSet = charset
    source.PatientName = "Müller^Zoë"
    sr = build_report(source, 0.5, MODEL)
    assert sr.SpecificCharacterSet == charset
    assert sr.PatientName == "Müller^Zoë"
    result = run_dsrdump(sr, options=())
    # DCMTK 3.6.7's VR checker cannot check UTF-8 and says so; any other warning is a finding.
    expected_warnings = [DSRDUMP_NO_UTF8_VR_CHECK] if charset == "ISO_IR 192" else []
    assert result.returncode == 0 and result.errors == [], result.output
    assert result.warnings == expected_warnings, result.output
    # dsrdump prints names in the file's own character set; the wrapper decodes as UTF-8.
    shown = "Müller^Zoë" if charset == "ISO_IR 192" else "M\ufffdller^Zo\ufffd"
    assert shown in result.stdout, result.output
    assert run_dciodvfy(sr).errors == []


@pytest.mark.real_peer
def test_dsrdump_wrapper_reports_content_tree_errors():
    """A broken tree (a NUM item without its value) must show in the wrapper's errors."""
    require_tool("dsrdump")
    sr = build_report(make_source("DX"), 0.5, MODEL)
    group = items_named(sr.ContentSequence, "125007", "DCM")[0]
    number = next(item for item in group.ContentSequence if item.ValueType == "NUM")
    del number.MeasuredValueSequence
    result = run_dsrdump(sr)
    assert result.returncode != 0 or result.errors or result.warnings, result.output


# --- highdicom's module table, parsed per module (pacs_ai.report.highdicom_tables) -----------------------

TIME_KEYWORDS = ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime",
                 "ContributionDateTime")


def without_times(sr: Dataset) -> str:
    """The report as text with the build's clock readings blanked."""
    sr = copy.deepcopy(sr)

    def blank(dataset: Dataset, element) -> None:
        if element.keyword in TIME_KEYWORDS:
            element.value = ""

    sr.walk(blank)
    return str(sr)


@pytest.mark.parametrize("sr_kind", ["comprehensive3d", "comprehensive"])
def test_reports_built_with_the_lazy_module_table_equal_highdicoms_own(sr_kind):
    from pacs_ai.report import highdicom_tables

    sources = [make_source("CR"), make_source("DX", photometric="MONOCHROME2"),
               hostile_source()]
    try:
        highdicom_tables.use_lazy_module_table()
        lazy = [build_report(source, 0.7, MODEL, sr_kind=sr_kind) for source in sources]
        highdicom_tables.use_full_module_table()
        full = [build_report(source, 0.7, MODEL, sr_kind=sr_kind) for source in sources]
    finally:
        highdicom_tables.use_lazy_module_table()
    for lazy_report, full_report in zip(lazy, full):
        assert without_times(lazy_report) == without_times(full_report)


def test_building_a_report_never_parses_highdicoms_whole_module_table():
    """In a fresh interpreter: the 80 MB table stays unparsed, a few modules are parsed."""
    import subprocess
    import sys

    program = (
        "import highdicom._standard_utils as su\n"
        "from pacs_ai.report import highdicom_tables\n"
        "from tests.test_report import make_source, MODEL\n"
        "from pacs_ai.report.report import build_report\n"
        "build_report(make_source('CR'), 0.7, MODEL)\n"
        "print(su.get_module_attribute_map is highdicom_tables.lazy_module_table,"
        " highdicom_tables._original_loader.cache_info().currsize,"
        " highdicom_tables.lazy_module_table().parsed_modules)\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    patched, full_table_loads, parsed = result.stdout.splitlines()[-1].split()
    assert patched == "True"
    assert full_table_loads == "0"
    assert 0 < int(parsed) < 100


def test_reports_of_another_sr_class_get_another_uid():
    """Switching [report] sr_kind must not re-use a UID already stored under the other class;
    the default class keeps the UIDs it always had."""
    source = make_source("CR")
    default = build_report(source, 0.7, MODEL, sr_kind="comprehensive3d")
    other = build_report(source, 0.7, MODEL, sr_kind="comprehensive")
    assert default.SOPInstanceUID != other.SOPInstanceUID
    assert default.SOPInstanceUID == report_uid(source.SOPInstanceUID, MODEL.name, MODEL.version)
    assert build_report(source, 0.7, MODEL, sr_kind="comprehensive").SOPInstanceUID == \
        other.SOPInstanceUID


# --- the SR document is what highdicom's own constructors make -----------------------------------

def highdicom_built_report(source: Dataset, probability: float, model: ModelInfo, *,
                           sr_kind: str, institution_name: str | None = None,
                           institutional_department_name: str | None = None) -> Dataset:
    """The same report made the way highdicom documents it: its Comprehensive(3D)SR class
    around the same content tree (report._sr_document stands in for this in the service)."""
    from pacs_ai.report import report

    header = report.source_header(source)
    content = report._measurement_report(header, probability, model, report.DEFAULT_MANUFACTURER)
    source_uid = str(header.SOPInstanceUID)
    return SR_READER_OF_KIND[sr_kind](
        evidence=[header],
        content=content,
        series_instance_uid=report_series_uid(header.StudyInstanceUID, model.name, model.version),
        series_number=report.DEFAULT_SERIES_NUMBER,
        sop_instance_uid=report_uid(source_uid, model.name, model.version,
                                    None if sr_kind == report.DEFAULT_SR_KIND else sr_kind),
        instance_number=report.instance_number(header),
        manufacturer=report.DEFAULT_MANUFACTURER,
        manufacturer_model_name=model.name,
        software_versions=[f"pacs-ai {pacs_ai_version()}", f"model {model.version}"],
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        series_description=report.SERIES_DESCRIPTION,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )


def pacs_ai_version() -> str:
    import pacs_ai

    return pacs_ai.__version__


def encoded_without_times(sr: Dataset) -> bytes:
    """The file bytes with the build's clock readings set to one fixed instant."""
    sr = copy.deepcopy(sr)
    fixed = {"InstanceCreationDate": "20000101", "ContentDate": "20000101",
             "InstanceCreationTime": "000000", "ContentTime": "000000",
             "ContributionDateTime": "20000101000000"}

    def pin(dataset: Dataset, element) -> None:
        if element.keyword in fixed:
            element.value = fixed[element.keyword]

    sr.walk(pin)
    encoded = io.BytesIO()
    sr.save_as(encoded, enforce_file_format=True)
    return encoded.getvalue()


def sources_of_every_shape() -> list[tuple[str, Dataset]]:
    """Synthetic CR/DX sources, a hostile one, non-ASCII names, and every sample DICOM that is
    reported on: the shapes whose reports must match highdicom's."""
    sources = [(f"{kind}-{photometric}", make_source(kind, photometric=photometric))
               for kind, photometric in (("CR", "MONOCHROME1"), ("DX", "MONOCHROME2"),
                                         ("DX-PROC", "MONOCHROME1"))]
    sources.append(("hostile", hostile_source()))
    for charset in ("ISO_IR 100", "ISO_IR 192"):
        source = make_source("DX")
        source.SpecificCharacterSet = charset
        source.PatientName = "Müller^Zoë"
        sources.append((charset, source))
    with_frame = make_source("DX")
    with_frame.FrameOfReferenceUID = generate_uid()
    with_frame.PatientAge = "007Y"
    sources.append(("frame-of-reference", with_frame))
    samples = Path(__file__).resolve().parent.parent / "sample_dicoms"
    manifest = json.loads((samples / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["expected_status"] == "ok":
            sources.append((entry["file"], pydicom.dcmread(samples / entry["file"],
                                                           stop_before_pixels=True)))
    return sources


@pytest.mark.parametrize("sr_kind", ["comprehensive3d", "comprehensive"])
def test_reports_equal_those_highdicoms_sr_classes_build(sr_kind):
    for name, source in sources_of_every_shape():
        for probability in (PROBABILITY_PRESENT, PROBABILITY_ABSENT, 0.123456789):
            ours = build_report(source, probability, MODEL, sr_kind=sr_kind)
            reference = highdicom_built_report(source, probability, MODEL, sr_kind=sr_kind)
            assert type(ours) is not type(reference), "two different builds are compared"
            assert encoded_without_times(ours) == encoded_without_times(reference), name


def test_reports_with_an_institution_equal_highdicoms():
    source = make_source("DX")
    ours = build_report(source, 0.5, MODEL, institution_name="General Hospital",
                        institutional_department_name="Radiology")
    reference = highdicom_built_report(source, 0.5, MODEL, sr_kind="comprehensive3d",
                                       institution_name="General Hospital",
                                       institutional_department_name="Radiology")
    assert encoded_without_times(ours) == encoded_without_times(reference)
