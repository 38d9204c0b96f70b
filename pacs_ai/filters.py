"""Which instances the model was made for: frontal chest radiographs, one grey frame.

`skip_reason(ds, policy)` reads only the header. It answers None for an image to classify,
else "<code>: <detail>"; `screen(ds, policy)` answers the same and whether the header gave a
usable patient age (the service counts films classified without one). A skip means "valid, but
not for this model" and is recorded as skipped; broken pixel data is a different thing, found
later by `pacs_ai.pixels`, and is an error. Skip codes, checked in this order:

    unsupported-sop-class, unsupported-modality, multi-frame, colour, not-monochrome,
    not-chest, not-frontal, outside-intended-age, unknown-age

The last two are the model's intended population (`pacs_ai.intended_use`): no [filters] keys,
start-up sets them from the model file and [model] min_age_years/max_age_years/unknown_age.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID

from pacs_ai.dicom_constants import COLOUR_PHOTOMETRICS, FILM_SOP_CLASSES, MONOCHROME
from pacs_ai.intended_use import (UNKNOWN_AGE_CHOICES, UNKNOWN_AGE_CLASSIFY, UNKNOWN_AGE_SKIP,
                                  in_range, outside_reason, patient_age, unknown_age_reason)


def _text_tuple(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"filter {name} must be a list of strings, not {value!r}")
    items = tuple(value)
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"filter {name} must be a list of strings, not {value!r}")
    return tuple(item.strip().upper() for item in items)


@dataclass(frozen=True)
class FilterPolicy:
    """What to classify. Every field but the last is a TOML-friendly type, so a config table
    maps straight onto it: ``FilterPolicy(**config["filters"])``. Lists are accepted and stored
    as tuples; text values are compared case-insensitively. An empty tuple means "no
    restriction". The last two, `intended_age_years` and `unknown_age`, come from the model and
    [model], not from [filters]: see :meth:`with_intended_age`."""

    # SOP Class UIDs to classify: CR Image, DX For Presentation, DX For Processing.
    sop_class_uids: tuple[str, ...] = FILM_SOP_CLASSES
    # Modality (0008,0060) values to classify.
    modalities: tuple[str, ...] = ("CR", "DX")
    # Body Part Examined (0018,0015) values meaning chest. "CHEST" is the DICOM term;
    # "THORAX" is what several vendors write.
    body_parts: tuple[str, ...] = ("CHEST", "THORAX")
    # SNOMED CT Code Values in Anatomic Region Sequence (0008,2218) meaning chest:
    # 816094009 "Chest" (current CID 4031) and 51185008 "Thoracic structure" (its older code).
    anatomic_region_codes: tuple[str, ...] = ("816094009", "51185008")
    # Classify an image that has neither Body Part Examined nor Anatomic Region Sequence.
    # Off by default: the model is not applied on a guess.
    allow_missing_body_part: bool = False
    # View Position (0018,5101) values of a frontal film.
    view_positions: tuple[str, ...] = ("PA", "AP")
    # Code Values in View Code Sequence (0054,0220) of a frontal film: SNOMED CT 272479007
    # postero-anterior and 399348003 antero-posterior, and their SNOMED RT forms R-10214, R-10206.
    view_codes: tuple[str, ...] = ("272479007", "399348003", "R-10214", "R-10206")
    # Classify an image that has neither View Position nor View Code Sequence (several CR
    # readers leave both empty). Off by default, as for the body part.
    allow_missing_view_position: bool = False
    # The effective age range of the model in use, [min, max] years (min <= age < max + 1), or
    # None: no age check. Not a [filters] key: start-up sets it from the model file and
    # [model] min_age_years/max_age_years (pacs_ai.intended_use.site_model_info).
    intended_age_years: tuple[float, float] | None = field(default=None,
                                                            metadata={"config": False})
    # A film without a usable age: "classify" (the out-of-distribution gate alone decides) or
    # "skip" (reason unknown-age), with or without an age range. Not a [filters] key either:
    # [model] unknown_age.
    unknown_age: str = field(default=UNKNOWN_AGE_CLASSIFY, metadata={"config": False})

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not item.metadata.get("config", True):
                continue
            if item.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise ValueError(f"filter {item.name} must be true or false, not {value!r}")
            else:
                object.__setattr__(self, item.name, _text_tuple(item.name, value))
        if self.intended_age_years is not None:
            low, high = (float(v) for v in self.intended_age_years)
            object.__setattr__(self, "intended_age_years", (low, high))
        if self.unknown_age not in UNKNOWN_AGE_CHOICES:
            raise ValueError(f"unknown_age must be one of {', '.join(UNKNOWN_AGE_CHOICES)}, "
                             f"not {self.unknown_age!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The [filters] keys."""
        return tuple(item.name for item in fields(cls) if item.metadata.get("config", True))

    def with_intended_age(self, age_years: tuple[float, float] | None,
                          unknown_age: str | None = None) -> "FilterPolicy":
        """This policy with the model's effective age range (ModelInfo.intended_age_years) and,
        when given, [model] unknown_age (else the policy's own)."""
        return dataclasses.replace(self, intended_age_years=age_years,
                                   unknown_age=unknown_age or self.unknown_age)


@dataclass(frozen=True)
class Screening:
    """What the header filter found: the skip reason (None: classify), and whether the header
    gave a usable patient age (None: not looked at, the film was skipped before the age)."""

    reason: str | None
    age_known: bool | None


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
        return Screening(None, True)
    return Screening(outside_reason(age, policy.intended_age_years), True)


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
        return None  # a nonsense value is a broken header; pacs_ai.pixels reports it
    if frames > 1:
        return f"multi-frame: {frames} frames; the model reads single radiographs"
    return None


def _colour(ds: Dataset, policy: FilterPolicy) -> str | None:
    try:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        samples = 1  # a broken header; pacs_ai.pixels reports it
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
