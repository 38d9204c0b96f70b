"""The DICOM Structured Report pacs-ai sends back: one SR per classified chest radiograph.

Content (TID 1500 Imaging Measurement Report, as the IHE AI Results profile uses it)::

    Imaging Measurement Report (TID 1500)
      Language, observer = the algorithm as a device (TID 1001/1004)
      Procedure reported = Plain chest X-ray (SCT 399208008)
      Image Library (TID 1600): the source image with its descriptors
      Imaging Measurements
        Measurement Group (TID 1501)
          Tracking Identifier + Tracking Unique Identifier
          Finding Site = Lung (SCT 39607008)
          Algorithm Name / Version / Parameters ("threshold=<t>", and
            "intended_age_years=<min>-<max>" when an age range is in force)
          Probability (DCM 122157) = p, unit UCUM "1"     <- the model output, 0..1
          Pneumonia (SCT 233604007) = Present (SCT 52101004) | Absent (SCT 272519000)
          Source = the source image
        Measurement Group (TID 1410), only for a finding of pneumonia from a model with a
        saliency map (pacs_ai.model.heatmap):
          Tracking Identifier "pacs-ai pneumonia region" + its own Tracking Unique Identifier
          Image Region = SCOORD POLYLINE (closed) in the source image's pixel coordinates,
            selected from the source image: the region the map says drove the score
          Finding = Pneumonia, Finding Site = Lung, Algorithm, Probability, Pneumonia = Present

Why DCM 122157 "Probability" for the number: it is the DICOM concept for a probability as such
(the finding is already named by the qualitative evaluation next to it, and by the group), and
unlike "Probability of cancer" (DCM 111047) it claims no disease. UCUM "1" is the unit of a pure
number (DICOM CID 7181 "no units").

Present means ``probability >= model.threshold``, the same rule as
:meth:`pacs_ai.model.model.PneumoniaModel.finding`.

Patient and study attributes come from the source (highdicom copies them from the evidence); the
SR keeps the source's Study Instance UID, gets its own series (one per study and model version)
and deterministic UIDs (:mod:`pacs_ai.report.uids`), and says VerificationFlag UNVERIFIED: nobody
accountable has checked it.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import highdicom as hd
import structlog
from highdicom.sr import (AlgorithmIdentification, CodeContentItem, CodedConcept,
                          ContainerContentItem, ContentSequence,
                          DeviceObserverIdentifyingAttributes, FindingSite, ImageContentItem,
                          ImageRegion, Measurement, MeasurementReport,
                          MeasurementsAndQualitativeEvaluations, NumContentItem, ObservationContext,
                          ObserverContext, PlanarROIMeasurementsAndQualitativeEvaluations,
                          QualitativeEvaluation, RelationshipTypeValues,
                          SourceImageForMeasurementGroup, SourceImageForRegion, TextContentItem,
                          TrackingIdentifier, UIDRefContentItem)
from pydicom import Dataset, config
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM, validate_value

import pacs_ai
from pacs_ai.dicom_constants import CR_IMAGE_STORAGE, DEFAULT_SR_KIND, SOP_CLASS_NAMES, SR_KINDS
from pacs_ai.model.intended_use import format_age_range
from pacs_ai.model.model import ModelInfo
from pacs_ai.report.highdicom_tables import use_lazy_module_table
from pacs_ai.report.uids import (device_observer_uid, region_tracking_uid, report_series_uid,
                                 report_uid, tracking_uid)

use_lazy_module_table()  # about 80 MB less per process that builds reports (see the module)

log = structlog.get_logger()

# --- Codes (the meanings are those DICOM PS3.16 gives) ---------------------------------------
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
LUNG = Code("39607008", "SCT", "Lung")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
PROBABILITY = Code("122157", "DCM", "Probability")
UNITLESS = Code("1", "UCUM", "no units")
SOURCE = Code("260753009", "SCT", "Source")  # concept name highdicom gives library images

# --- What a report is made from ---------------------------------------------------------------
# the SR kinds (SR_KINDS) and the source SOP classes (SOP_CLASS_NAMES): pacs_ai.dicom_constants
REQUIRED_SOURCE_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                              "SeriesInstanceUID", "Rows", "Columns")
# Type 2 attributes highdicom reads from the evidence; an empty value is valid, absence is not.
TYPE2_PATIENT_STUDY_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                                  "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                                  "ReferringPhysicianName")
VALID_PATIENT_SEX = {"M", "F", "O"}

# --- The SR's own series and equipment ----------------------------------------------------------
DEFAULT_MANUFACTURER = "pacs-ai"
SERIES_DESCRIPTION = "pacs-ai pneumonia (AI, not verified)"
# High, so viewers sort the AI series after the acquired images.
DEFAULT_SERIES_NUMBER = 9901
TRACKING_IDENTIFIER = "pacs-ai pneumonia finding"
REGION_TRACKING_IDENTIFIER = "pacs-ai pneumonia region"


class ReportSourceError(ValueError):
    """The source dataset cannot be reported on (missing attribute, unsupported SOP class)."""


def threshold_parameter(threshold: float) -> str:
    """The Algorithm Parameters text that records the decision threshold."""
    return f"threshold={threshold:.6g}"


def algorithm_parameters(model: ModelInfo) -> list[str]:
    """The settings the finding was made with, as the service applied them (the site's
    [model] overrides included): the threshold, and the age range films were checked against
    (none when no range is in force)."""
    parameters = [threshold_parameter(model.threshold)]
    if model.intended_age_years is not None:
        parameters.append(f"intended_age_years={format_age_range(model.intended_age_years)}")
    return parameters


def site_settings_part(model: ModelInfo) -> str | None:
    """The report UID's extra part when the site's [model] settings differ from the model
    file's own: a report made at another threshold or age range may carry another finding, so
    it must not reuse the UID of one made at the file's settings (None keeps the UIDs of
    reports made at the file's own settings unchanged)."""
    from pacs_ai.model.model import ModelContractError, validate_metadata

    try:
        own = validate_metadata(model.metadata)
    except ModelContractError:  # no file metadata to compare with (a hand-made ModelInfo)
        return None
    if algorithm_parameters(own) == algorithm_parameters(model):
        return None
    return "site:" + ";".join(algorithm_parameters(model))


def build_report(
    source: Dataset,
    probability: float,
    model: ModelInfo,
    *,
    sr_kind: str = DEFAULT_SR_KIND,
    manufacturer: str = DEFAULT_MANUFACTURER,
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
    series_number: int = DEFAULT_SERIES_NUMBER,
    region: Any = None,
) -> Dataset:
    """The SR (a pydicom Dataset with file_meta, ready to save or C-STORE) for one source image.

    ``source`` may have been read with ``stop_before_pixels``; it is not modified.
    ``region``: a closed polygon [K, 2] of (column, row) points in the source's pixel
    coordinates (pacs_ai.model.heatmap), reported as a TID 1410 group when the finding is pneumonia;
    None (or a normal finding) gives the report exactly as without it.
    Raises :class:`ReportSourceError` for a source that lacks what a report needs, and
    ``ValueError`` for a probability outside [0, 1] or an unknown ``sr_kind``.
    """
    _check_arguments(probability, sr_kind)
    return build_report_from_header(
        source_header(source), probability, model, sr_kind=sr_kind, manufacturer=manufacturer,
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        series_number=series_number, region=region)


def _check_arguments(probability: float, sr_kind: str) -> None:
    if sr_kind not in SR_KINDS:
        raise ValueError(f"sr_kind {sr_kind!r} is not one of {', '.join(sorted(SR_KINDS))}")
    probability = float(probability)
    if not (math.isfinite(probability) and 0.0 <= probability <= 1.0):
        raise ValueError(f"probability {probability!r} is not in [0, 1]")


def build_report_from_header(
    header: Dataset,
    probability: float,
    model: ModelInfo,
    *,
    sr_kind: str = DEFAULT_SR_KIND,
    manufacturer: str = DEFAULT_MANUFACTURER,
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
    series_number: int = DEFAULT_SERIES_NUMBER,
    region: Any = None,
) -> Dataset:
    """build_report from the source's checked header (source_header's copy, which the helper
    keeps from the film's one read); the same report, attribute for attribute."""
    _check_arguments(probability, sr_kind)
    sr_class_uid = SR_KINDS[sr_kind]
    probability = float(probability)
    source_uid = str(header.SOPInstanceUID)
    content = _measurement_report(header, probability, model, manufacturer, region)

    sr = _sr_document(
        sr_class_uid,
        header,
        content,
        series_instance_uid=report_series_uid(header.StudyInstanceUID, model.name, model.version),
        series_number=series_number,
        sop_instance_uid=report_uid(source_uid, model.name, model.version,
                                    None if sr_kind == DEFAULT_SR_KIND else sr_kind,
                                    site_settings_part(model)),
        instance_number=instance_number(header),
        manufacturer=manufacturer,
        manufacturer_model_name=model.name,
        software_versions=[f"pacs-ai {pacs_ai.__version__}", f"model {model.version}"],
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        series_description=SERIES_DESCRIPTION,
    )
    log.debug("report_built", sr_sop_instance_uid=sr.SOPInstanceUID,
              source_sop_instance_uid=source_uid, sr_kind=sr_kind)
    return sr


def _sr_document(sop_class_uid: str, header: Dataset, content: MeasurementReport, *,
                 institution_name: str | None, institutional_department_name: str | None,
                 **attributes: Any) -> hd.SOPClass:
    """The SR document around `content`: what highdicom's ComprehensiveSR/Comprehensive3DSR
    constructors make of these arguments, attribute for attribute.

    Why not call those constructors: per report they deep-copy and re-validate the content
    tree that highdicom's own builders made a moment before, and search it for the images it
    references, which here is always the one source image. That was 20 of the 43 ms a report
    cost (docs/benchmarks.md). tests/test_report.py builds each report both ways and checks
    the two are equal; a highdicom upgrade that changes its documents fails that test.
    """
    document = hd.SOPClass(
        study_instance_uid=header.StudyInstanceUID,
        sop_class_uid=sop_class_uid,
        modality="SR",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **patient_and_study(header),
        specific_character_set=header.get("SpecificCharacterSet"),
        **attributes,
    )
    if institution_name is not None:
        document.InstitutionName = institution_name
        if institutional_department_name is not None:
            document.InstitutionalDepartmentName = institutional_department_name
    document.CompletionFlag = "COMPLETE"
    document.VerificationFlag = "UNVERIFIED"  # nobody accountable has checked it
    document.PreliminaryFlag = "PRELIMINARY"
    for tag, element in content[0].items():  # the root container's attributes
        document[tag] = element
    document.CurrentRequestedProcedureEvidenceSequence = [_evidence_reference(header)]
    document.PerformedProcedureCodeSequence = []
    document.ReferencedPerformedProcedureStepSequence = []
    document.copy_patient_and_study_information(header)
    # the source's acquisition equipment, then highdicom as the processing equipment
    document._add_contributing_equipment(None, header)
    return document


def _evidence_reference(header: Dataset) -> Dataset:
    """The Current Requested Procedure Evidence item naming the one source image."""
    instance = Dataset()
    instance.ReferencedSOPClassUID = header.SOPClassUID
    instance.ReferencedSOPInstanceUID = header.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = header.SeriesInstanceUID
    series.ReferencedSOPSequence = [instance]
    study = Dataset()
    study.StudyInstanceUID = header.StudyInstanceUID
    study.ReferencedSeriesSequence = [series]
    return study


def source_header(source: Dataset) -> Dataset:
    """A copy of the source without bulk data, checked and fit to serve as SR evidence.

    highdicom copies the Patient and Study modules from this header into the report, so values
    that are not valid DICOM (wrong VR format, a PatientSex outside M/F/O, impossible dates) are
    removed here rather than copied into an invalid report; absent or removed Type 2 attributes
    become empty ones. Only attribute keywords are logged, never values.
    """
    missing = [keyword for keyword in REQUIRED_SOURCE_ATTRIBUTES if not _has_value(source, keyword)]
    if missing:
        raise ReportSourceError(f"source dataset lacks {', '.join(missing)}")
    if str(source.SOPClassUID) not in SOP_CLASS_NAMES:
        raise ReportSourceError(
            f"source SOP class {source.SOPClassUID} is not a CR or DX image; "
            f"reports are made for {', '.join(SOP_CLASS_NAMES.values())}")

    header = Dataset()
    dropped: list[str] = []
    for tag in source.keys():
        if tag.group >= 0x7F00 or 0x6000 <= tag.group < 0x6100:
            continue  # pixel data, waveforms, overlays: not needed, possibly large
        try:
            element = source[tag]  # decodes a raw element; a malformed one raises
        except Exception:
            dropped.append(str(tag))
            continue
        if element.keyword not in REQUIRED_SOURCE_ATTRIBUTES and not _is_valid_value(element):
            dropped.append(element.keyword or str(tag))
            continue
        header.add(copy.deepcopy(element))

    for keyword in TYPE2_PATIENT_STUDY_ATTRIBUTES:
        if keyword not in header or header[keyword].value is None:
            setattr(header, keyword, "")
    dropped += _empty_values_highdicom_rejects(header)
    if dropped:
        log.warning("source_values_not_copied",  # not valid DICOM
                    attributes=dropped, source_sop_instance_uid=str(source.SOPInstanceUID))
    return header


def _has_value(source: Dataset, keyword: str) -> bool:
    try:
        return keyword in source and source[keyword].value not in (None, "")
    except Exception:  # a malformed raw element
        return False


_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
             "UI", "UR", "UT"}


def _is_valid_value(element: Any) -> bool:
    """Whether a top-level text element's value(s) satisfy its VR (pydicom's validators)."""
    if element.VR not in _TEXT_VRS or element.value is None:
        return True
    values = element.value if isinstance(element.value, (list, tuple, MultiValue)) \
        else [element.value]
    try:
        for value in values:
            if value is not None and value != "":
                validate_value(element.VR, value if isinstance(value, str) else str(value),
                               config.RAISE)
    except ValueError:
        return False
    return True


def _empty_values_highdicom_rejects(header: Dataset) -> list[str]:
    """Empty the VR-valid values highdicom would still refuse (enumerations, real dates)."""
    emptied = []
    if header.PatientSex not in VALID_PATIENT_SEX | {""}:
        header.PatientSex = ""
        emptied.append("PatientSex")
    for keyword, parse in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        raw = header[keyword].value
        if raw in (None, ""):
            continue
        try:
            parse(str(raw))
        except ValueError:
            setattr(header, keyword, "")
            emptied.append(keyword)
    return emptied


def patient_and_study(header: Dataset) -> dict[str, Any]:
    """The source's patient and study attributes as highdicom's SOP class constructors take
    them: every object pacs-ai makes (the SR, the heat-map image) joins the source's study."""
    return {"patient_id": header.PatientID, "patient_name": header.PatientName,
            "patient_birth_date": header.PatientBirthDate, "patient_sex": header.PatientSex,
            "accession_number": header.AccessionNumber, "study_id": header.StudyID,
            "study_date": header.StudyDate, "study_time": header.StudyTime,
            "referring_physician_name": header.get("ReferringPhysicianName")}


def instance_number(header: Dataset) -> int:
    """The source's Instance Number, so the SR of image n sorts as n in the AI series."""
    try:
        number = int(header.get("InstanceNumber") or 1)
    except (TypeError, ValueError):
        return 1
    return number if number >= 1 else 1


def _measurement_report(header: Dataset, probability: float, model: ModelInfo,
                        manufacturer: str, region: Any = None) -> MeasurementReport:
    source_uid = str(header.SOPInstanceUID)
    observer = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(model.name, model.version),
            name=model.name,
            manufacturer_name=manufacturer,
            model_name=model.name,
        ),
    )
    algorithm = AlgorithmIdentification(
        name=model.name, version=model.version,
        parameters=algorithm_parameters(model))
    is_present = probability >= model.threshold
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid(source_uid, model.name, model.version),
            identifier=TRACKING_IDENTIFIER),
        finding_sites=[FindingSite(anatomic_location=LUNG)],
        algorithm_id=algorithm,
        measurements=[Measurement(name=PROBABILITY, value=probability, unit=UNITLESS)],
        qualitative_evaluations=[
            QualitativeEvaluation(name=PNEUMONIA, value=PRESENT if is_present else ABSENT)],
        source_images=[SourceImageForMeasurementGroup(
            referenced_sop_class_uid=header.SOPClassUID,
            referenced_sop_instance_uid=header.SOPInstanceUID)],
    )
    groups: list[Any] = [group]
    if region is not None and is_present:
        groups.append(_region_group(header, probability, model, algorithm, region))
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
    )
    _insert_image_library(report, header)
    return report


def _region_group(header: Dataset, probability: float, model: ModelInfo,
                  algorithm: AlgorithmIdentification,
                  region: Any) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410: the region that drove the finding, on the source image."""
    import numpy as np

    points = np.asarray(region, dtype=np.float64)
    rows, columns = float(header.Rows), float(header.Columns)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 4 \
            or not np.array_equal(points[0], points[-1]):
        raise ValueError("region must be a closed polygon [K >= 4, 2] (first point = last)")
    # inside the image's extent (0..Columns, 0..Rows); rounded so the text stays short
    points = np.round(np.clip(points, 0.0, [columns, rows]), 2)
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=region_tracking_uid(str(header.SOPInstanceUID), model.name, model.version),
            identifier=REGION_TRACKING_IDENTIFIER),
        referenced_region=ImageRegion(
            graphic_type="POLYLINE", graphic_data=points,
            source_image=SourceImageForRegion(
                referenced_sop_class_uid=header.SOPClassUID,
                referenced_sop_instance_uid=header.SOPInstanceUID)),
        finding_type=PNEUMONIA,
        finding_sites=[FindingSite(anatomic_location=LUNG)],
        algorithm_id=algorithm,
        measurements=[Measurement(name=PROBABILITY, value=probability, unit=UNITLESS)],
        qualitative_evaluations=[QualitativeEvaluation(name=PNEUMONIA, value=PRESENT)],
    )


def _insert_image_library(report: MeasurementReport, header: Dataset) -> None:
    """Put the TID 1600 Image Library before Imaging Measurements, where TID 1500 orders it.

    Built here, not by highdicom's ``referenced_images``: highdicom requires Imager Pixel Spacing
    and a two-valued Patient Orientation for CR/DX, which CR images (and some DX) do not carry.
    The TID 1603 projection descriptors are optional, so we write those the source has.
    """
    root_items = report[0].ContentSequence
    measurements_index = next(
        index for index, item in enumerate(root_items)
        if item.name == codes.DCM.ImagingMeasurements)
    root_items.insert(measurements_index, image_library(header))


def image_library(header: Dataset) -> ContainerContentItem:
    """TID 1600 Image Library with one group holding the source image (TID 1601-1603)."""
    image = ImageContentItem(
        name=SOURCE,
        referenced_sop_class_uid=header.SOPClassUID,
        referenced_sop_instance_uid=header.SOPInstanceUID,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    image.ContentSequence = ContentSequence(image_descriptors(header))
    group = ContainerContentItem(name=codes.DCM.ImageLibraryGroup,
                                 relationship_type=RelationshipTypeValues.CONTAINS)
    group.ContentSequence = ContentSequence([image])
    library = ContainerContentItem(name=codes.DCM.ImageLibrary,
                                   relationship_type=RelationshipTypeValues.CONTAINS)
    library.ContentSequence = ContentSequence([group])
    return library


def image_descriptors(header: Dataset) -> list[Any]:
    """TID 1602 (modality, size) and TID 1603 (orientation, spacing) items the source supports."""
    acquisition = RelationshipTypeValues.HAS_ACQ_CONTEXT
    pixels = CodedConcept(value="{pixels}", meaning="Pixels", scheme_designator="UCUM")
    modality = (codes.cid29.ComputedRadiography if header.SOPClassUID == CR_IMAGE_STORAGE
                else codes.cid29.DigitalRadiography)
    items: list[Any] = [
        CodeContentItem(name=codes.DCM.Modality, value=modality, relationship_type=acquisition),
    ]
    if header.get("FrameOfReferenceUID"):
        items.append(UIDRefContentItem(name=codes.DCM.FrameOfReferenceUID,
                                       value=header.FrameOfReferenceUID,
                                       relationship_type=acquisition))
    items += [
        NumContentItem(name=codes.DCM.PixelDataRows, value=int(header.Rows), unit=pixels,
                       relationship_type=acquisition),
        NumContentItem(name=codes.DCM.PixelDataColumns, value=int(header.Columns), unit=pixels,
                       relationship_type=acquisition),
    ]
    orientation = header.get("PatientOrientation")
    if orientation is not None and not isinstance(orientation, str) and len(orientation) == 2 \
            and all(orientation):
        items += [
            TextContentItem(name=codes.DCM.PatientOrientationRow, value=str(orientation[0]),
                            relationship_type=acquisition),
            TextContentItem(name=codes.DCM.PatientOrientationColumn, value=str(orientation[1]),
                            relationship_type=acquisition),
        ]
    spacing = header.get("ImagerPixelSpacing")
    if spacing is not None and not isinstance(spacing, (str, float, int)) and len(spacing) == 2:
        items += [
            NumContentItem(name=codes.DCM.HorizontalPixelSpacing, value=float(spacing[1]),
                           unit=codes.UCUM.Millimeter, relationship_type=acquisition),
            NumContentItem(name=codes.DCM.VerticalPixelSpacing, value=float(spacing[0]),
                           unit=codes.UCUM.Millimeter, relationship_type=acquisition),
        ]
    return items


# --- Reading a report back (tests, status, the PACS side of pipeline tests) ---------------------

def report_summary(sr: Dataset) -> dict[str, Any]:
    """What a pacs-ai SR says, read generically from its content tree (works on received SRs).

    Keys: sop_instance_uid, series_instance_uid, study_instance_uid, sop_class_uid,
    source_sop_instance_uid, finding ("pneumonia"/"normal"), probability, algorithm_name,
    algorithm_version, algorithm_parameters, tracking_uid, verification_flag, region.
    """
    items = list(_walk(sr.get("ContentSequence", [])))

    def first(code: Code, attribute: str) -> Any:
        for item in items:
            if _concept_is(item, code) and attribute in item:
                return item
        return None

    evaluation = first(PNEUMONIA, "ConceptCodeSequence")
    finding = None
    if evaluation is not None:
        value = evaluation.ConceptCodeSequence[0]
        finding = {PRESENT.value: "pneumonia", ABSENT.value: "normal"}.get(value.CodeValue)
    measurement = first(PROBABILITY, "MeasuredValueSequence")
    probability = (float(measurement.MeasuredValueSequence[0].NumericValue)
                   if measurement is not None else None)
    source_uids = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                   for item in items if item.get("ValueType") == "IMAGE"]
    tracking = first(codes.DCM.TrackingUniqueIdentifier, "UID")
    regions = [item for item in items if item.get("ValueType") == "SCOORD"]
    region = None
    if regions:
        values = [float(v) for v in regions[0].GraphicData]
        region = [(values[i], values[i + 1]) for i in range(0, len(values), 2)]
    return {
        "sop_instance_uid": str(sr.SOPInstanceUID),
        "series_instance_uid": str(sr.SeriesInstanceUID),
        "study_instance_uid": str(sr.StudyInstanceUID),
        "sop_class_uid": str(sr.SOPClassUID),
        "source_sop_instance_uid": str(source_uids[0]) if source_uids else None,
        "finding": finding,
        "probability": probability,
        "algorithm_name": next(iter(_texts(items, codes.DCM.AlgorithmName)), None),
        "algorithm_version": next(iter(_texts(items, codes.DCM.AlgorithmVersion)), None),
        "algorithm_parameters": _texts(items, codes.DCM.AlgorithmParameters),
        "tracking_uid": str(tracking.UID) if tracking is not None else None,
        "verification_flag": sr.get("VerificationFlag"),
        "region": region,  # [(column, row), ...] of the TID 1410 region, closed; or None
    }


def _walk(sequence: Any):
    for item in sequence:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _concept_is(item: Dataset, code: Code) -> bool:
    names = item.get("ConceptNameCodeSequence")
    return bool(names) and names[0].CodeValue == code.value \
        and names[0].CodingSchemeDesignator == code.scheme_designator


def _texts(items: list[Dataset], code: Code) -> list[str]:
    return [str(item.TextValue) for item in items
            if _concept_is(item, code) and "TextValue" in item]
