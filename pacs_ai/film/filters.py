"""Which instances the model was made for: frontal chest radiographs, one grey frame.

`skip_reason(ds, policy)` reads only the header. It answers None for an image to classify,
else "<code>: <detail>"; `screen(ds, policy)` answers the same and whether the header gave a
usable patient age (the service counts films classified without one). A skip means "valid, but
not for this model" and is recorded as skipped; broken pixel data is a different thing, found
later by `pacs_ai.film.pixels`, and is an error. Skip codes, checked in this order:

    unsupported-sop-class, unsupported-modality, multi-frame, colour, not-monochrome,
    not-chest, not-frontal, outside-intended-age, unknown-age

The last two are the model's intended population (`pacs_ai.model.intended_use`): no [filters] keys,
start-up sets them from the model file and [model] min_age_years/max_age_years/unknown_age.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID

from pacs_ai.config import UNKNOWN_AGE_SKIP, FilterPolicy
from pacs_ai.dicom_constants import COLOUR_PHOTOMETRICS, MONOCHROME
from pacs_ai.model.intended_use import (PatientAge, in_range, outside_reason, patient_age,
                                        unknown_age_reason)


@dataclass(frozen=True)
class Screening:
    """What the header filter found: the skip reason (None: classify), and whether the header
    gave a usable patient age (None: not looked at, the film was skipped before the age).
    `age`: that age, for a [shadow] model's own age range (pacs_ai.classify.shadow)."""

    reason: str | None
    age_known: bool | None
    age: PatientAge | None = None


def screen(ds: Dataset, policy: FilterPolicy = FilterPolicy()) -> Screening:
    """The filters in order; the age last, read once for both the check and the count."""
    for check in (_sop_class, _modality, _frames, _colour, _monochrome, _body_part, _view):
        reason = check(ds, policy)
        if reason is not None:
            return Screening(reason, None)
    age = patient_age(ds)  # None: no usable age (unreadable values are logged by code)
    if age is None:
        return screen_without_age(policy)
    if policy.intended_age_years is None or in_range(age.years, policy.intended_age_years):
        return Screening(None, True, age)
    return Screening(outside_reason(age, policy.intended_age_years), True, age)


def screen_without_age(policy: FilterPolicy) -> Screening:
    """A film with no usable age, or a PNG/JPEG (no header at all): classified, or skipped as
    unknown-age when [model] unknown_age = "skip"."""
    if policy.unknown_age == UNKNOWN_AGE_SKIP:
        return Screening(unknown_age_reason(policy.intended_age_years), False)
    return Screening(None, False)


def skip_reason(ds: Dataset, policy: FilterPolicy = FilterPolicy()) -> str | None:
    """None when the model may classify this instance, else a reason 'code: detail'."""
    return screen(ds, policy).reason


def _sop_class(ds: Dataset, policy: FilterPolicy) -> str | None:
    uid = str(ds.get("SOPClassUID", "")).strip()
    if not policy.sop_class_uids or uid in policy.sop_class_uids:
        return None
    accepted = ", ".join(UID(u).name for u in policy.sop_class_uids)
    return f"unsupported-sop-class: SOP Class is {_uid_label(uid)}, not one of: {accepted}"


def _modality(ds: Dataset, policy: FilterPolicy) -> str | None:
    modality = _upper(ds.get("Modality"))
    if not policy.modalities or modality in policy.modalities:
        return None
    return (f"unsupported-modality: Modality is {modality or '(none)'}, not one of "
            f"{', '.join(policy.modalities)}")


def _frames(ds: Dataset, policy: FilterPolicy) -> str | None:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return None  # a nonsense value is a broken header; pacs_ai.film.pixels reports it
    if frames > 1:
        return f"multi-frame: {frames} frames; the model reads single radiographs"
    return None


def _colour(ds: Dataset, policy: FilterPolicy) -> str | None:
    try:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        samples = 1  # a broken header; pacs_ai.film.pixels reports it
    photometric = _upper(ds.get("PhotometricInterpretation"))
    if samples > 1 or photometric in COLOUR_PHOTOMETRICS:
        return (f"colour: Photometric Interpretation {photometric or '(none)'} with {samples} "
                "sample(s) per pixel; the model reads grey radiographs")
    return None


def _monochrome(ds: Dataset, policy: FilterPolicy) -> str | None:
    photometric = _upper(ds.get("PhotometricInterpretation"))
    if photometric in MONOCHROME:
        return None
    return (f"not-monochrome: Photometric Interpretation is {photometric or '(none)'}, not "
            "MONOCHROME1 or MONOCHROME2")


def _body_part(ds: Dataset, policy: FilterPolicy) -> str | None:
    if not policy.body_parts and not policy.anatomic_region_codes:
        return None
    body_part = _upper(ds.get("BodyPartExamined"))
    region_codes = _code_values(ds.get("AnatomicRegionSequence"))
    if body_part in policy.body_parts or any(c in policy.anatomic_region_codes
                                             for c in region_codes):
        return None
    if not body_part and not region_codes:
        if policy.allow_missing_body_part:
            return None
        return ("not-chest: no Body Part Examined or Anatomic Region Sequence; set the filter "
                "allow_missing_body_part = true to classify such images")
    described = body_part or "/".join(region_codes)
    return f"not-chest: body part is {described}, not one of {', '.join(policy.body_parts)}"


def _view(ds: Dataset, policy: FilterPolicy) -> str | None:
    if not policy.view_positions and not policy.view_codes:
        return None
    position = _upper(ds.get("ViewPosition"))
    view_codes = _code_values(ds.get("ViewCodeSequence"))
    if position in policy.view_positions or any(c in policy.view_codes for c in view_codes):
        return None
    if not position and not view_codes:
        if policy.allow_missing_view_position:
            return None
        return ("not-frontal: no View Position or View Code Sequence; set the filter "
                "allow_missing_view_position = true to classify such images")
    described = position or "/".join(view_codes)
    return f"not-frontal: view is {described}, not one of {', '.join(policy.view_positions)}"


def _code_values(sequence: Any) -> list[str]:
    """Code Values of every item of a code sequence, upper-cased."""
    return [_upper(item.get("CodeValue")) for item in (sequence or []) if item.get("CodeValue")]


def _upper(value: Any) -> str:
    return "" if value is None else str(value).strip().upper()


def _uid_label(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return f"{name} ({uid})" if name and name != uid else (uid or "(none)")
