"""pacs_ai.film.filters: which headers are classified, and the stable reason codes of the others."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pacs_ai.config import FilterPolicy
from pacs_ai.dicom_constants import (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION_STORAGE,
                                     DX_FOR_PROCESSING_STORAGE)
from pacs_ai.film.filters import skip_reason

# Lower-case or padded code strings are invalid DICOM that real devices send anyway.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR CS")


def chest_pa(**attributes) -> Dataset:
    """Header of a frontal CR chest film, the thing the model was made for."""
    ds = Dataset()
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.Modality = "CR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def code(value: str, scheme: str = "SCT") -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, value
    return item


def code_of(reason: str | None) -> str | None:
    return None if reason is None else reason.split(":")[0]


@pytest.mark.parametrize("attributes", [
    {},
    {"ViewPosition": "AP"},
    {"SOPClassUID": DX_FOR_PRESENTATION_STORAGE, "Modality": "DX"},
    {"SOPClassUID": DX_FOR_PROCESSING_STORAGE, "Modality": "DX"},
    {"PhotometricInterpretation": "MONOCHROME1"},
    {"BodyPartExamined": "thorax", "ViewPosition": "pa "},   # case and padding do not matter
    {"NumberOfFrames": 1},
])
def test_frontal_chest_radiographs_are_classified(attributes):
    assert skip_reason(chest_pa(**attributes)) is None


@pytest.mark.parametrize(("attributes", "expected"), [
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "Modality": "CT"}, "unsupported-sop-class"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "unsupported-sop-class"),  # secondary capture
    ({"Modality": "MG"}, "unsupported-modality"),
    ({"Modality": None}, "unsupported-modality"),
    ({"NumberOfFrames": 2}, "multi-frame"),
    ({"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB"}, "colour"),
    ({"PhotometricInterpretation": "PALETTE COLOR"}, "colour"),
    ({"PhotometricInterpretation": None}, "not-monochrome"),
    ({"BodyPartExamined": "ABDOMEN"}, "not-chest"),
    ({"BodyPartExamined": None}, "not-chest"),
    ({"ViewPosition": "LL"}, "not-frontal"),
    ({"ViewPosition": None}, "not-frontal"),
])
def test_other_images_are_skipped_with_a_stable_code(attributes, expected):
    reason = skip_reason(chest_pa(**attributes))
    assert code_of(reason) == expected
    assert len(reason) > len(expected) + 5, "the reason must say what was found"


def test_a_ct_slice_is_refused_by_sop_class_before_anything_else():
    reason = skip_reason(chest_pa(SOPClassUID="1.2.840.10008.5.1.4.1.1.2", Modality="CT",
                                  NumberOfFrames=3, ViewPosition=None))
    assert code_of(reason) == "unsupported-sop-class"
    assert "CT Image Storage" in reason


def test_anatomic_region_sequence_alone_identifies_the_chest():
    ds = chest_pa(BodyPartExamined=None, AnatomicRegionSequence=Sequence([code("816094009")]))
    assert skip_reason(ds) is None
    ds.AnatomicRegionSequence = Sequence([code("51185008")])  # the older "thoracic structure"
    assert skip_reason(ds) is None
    ds.AnatomicRegionSequence = Sequence([code("818981001")])  # abdomen
    assert code_of(skip_reason(ds)) == "not-chest"


def test_view_code_sequence_alone_identifies_a_frontal_view():
    ds = chest_pa(ViewPosition=None, ViewCodeSequence=Sequence([code("399348003")]))  # AP
    assert skip_reason(ds) is None
    ds.ViewCodeSequence = Sequence([code("R-10214", "SRT")])  # PA, SNOMED RT form
    assert skip_reason(ds) is None
    ds.ViewCodeSequence = Sequence([code("399173006")])  # left lateral
    assert code_of(skip_reason(ds)) == "not-frontal"


def test_missing_body_part_and_view_can_be_allowed():
    ds = chest_pa(BodyPartExamined=None, ViewPosition=None)
    assert "allow_missing_body_part" in skip_reason(ds)
    policy = FilterPolicy(allow_missing_body_part=True)
    assert "allow_missing_view_position" in skip_reason(ds, policy)
    policy = FilterPolicy(allow_missing_body_part=True, allow_missing_view_position=True)
    assert skip_reason(ds, policy) is None
    # Allowing a missing value does not allow a wrong one.
    assert code_of(skip_reason(chest_pa(ViewPosition="LL"), policy)) == "not-frontal"


def test_empty_lists_mean_no_restriction():
    policy = FilterPolicy(sop_class_uids=(), modalities=(), body_parts=(),
                          anatomic_region_codes=(), view_positions=(), view_codes=())
    ds = chest_pa(SOPClassUID="1.2.3", Modality="XA", BodyPartExamined="KNEE",
                  ViewPosition="LL")
    assert skip_reason(ds, policy) is None
    # Single frame and monochrome are not configurable: the model cannot read anything else.
    assert code_of(skip_reason(chest_pa(NumberOfFrames=4), policy)) == "multi-frame"


def test_policy_builds_from_a_toml_table():
    table = tomllib.loads('modalities = ["dx"]\nbody_parts = ["CHEST", "PORT CHEST"]\n'
                          "allow_missing_view_position = true\n")
    policy = FilterPolicy(**table)
    assert policy.modalities == ("DX",) and isinstance(policy.body_parts, tuple)
    assert code_of(skip_reason(chest_pa(), policy)) == "unsupported-modality"
    assert skip_reason(chest_pa(Modality="DX", BodyPartExamined="Port Chest",
                                ViewPosition=None), policy) is None
    hash(policy)  # frozen with tuples: usable as a key, safe to share between threads


@pytest.mark.parametrize(("field", "value"), [
    ("modalities", "CR"), ("modalities", [1, 2]), ("allow_missing_body_part", "yes"),
])
def test_policy_rejects_wrong_types_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FilterPolicy(**{field: value})


def test_every_policy_field_is_a_toml_friendly_type():
    for field in dataclasses.fields(FilterPolicy):
        if field.name not in FilterPolicy.field_names():
            continue  # intended_age_years: from the model and [model], not from [filters]
        default = getattr(FilterPolicy(), field.name)
        assert isinstance(default, (bool, int, str, tuple)), field.name
        if isinstance(default, tuple):
            assert all(isinstance(item, str) for item in default), field.name
