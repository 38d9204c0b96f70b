"""The patient population a model is for: reading a film's patient age, the age range, and the
site's overrides of the model's own range and threshold.

A model file may state ``"intended_use": {"age_years": [min, max]}``
(:attr:`pacs_ai.model.model.ModelInfo.intended_age_years`). A patient is in range when
``min <= age < max + 1``, age in years with its fraction: [1, 5] takes 1 year to 5 years 11
months. The film's age comes from Patient's Age (0010,1010), else from Patient's Birth Date
(0010,0030) and the Study Date, else the Acquisition Date, else the Content Date. A value that
cannot be read counts as absent (logged with a reason code, never the value). A film without
any age is classified by default, so the model's out-of-distribution gate alone decides for it
(many films carry none); a site may skip such films instead with ``[model] unknown_age =
"skip"`` (`unknown-age` reason). Either way the worker counts the films classified without an
age (the job queue's age_known, `pacs-ai status`, a metric, the per-film log line).

The check itself is the `outside-intended-age` filter in :mod:`pacs_ai.film.filters`; start-up puts
the effective range into the filter policy (:meth:`pacs_ai.config.FilterPolicy.with_intended_age`).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
from dataclasses import dataclass

import structlog
from pydicom.dataset import Dataset

from pacs_ai.config import MAX_AGE_YEARS, UNKNOWN_AGE_CLASSIFY, UNKNOWN_AGE_SKIP
from pacs_ai.errors import UserError
from pacs_ai.model.model import ModelInfo

log = structlog.get_logger()

DAYS_PER_YEAR = 365.2425
# Age String: nnnD, nnnW, nnnM or nnnY. Devices also send "54Y" or "54y"; those are read too.
AGE_STRING = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
DATE = re.compile(r"^\s*(\d{4})(\d{2})(\d{2})\s*$")
UNIT_NAMES = {"D": ("day", "days"), "W": ("week", "weeks"), "M": ("month", "months"),
              "Y": ("year", "years")}
UNIT_YEARS = {"D": 1 / DAYS_PER_YEAR, "W": 7 / DAYS_PER_YEAR, "M": 1 / 12, "Y": 1.0}
# Reference dates for an age from the birth date, in order of preference.
REFERENCE_DATES = ("StudyDate", "AcquisitionDate", "ContentDate")


@dataclass(frozen=True)
class PatientAge:
    years: float  # with its fraction: 6 months is 0.5
    text: str  # for the skip reason: "54 years", "6 months", "10 days"
    source: str  # "PatientAge" or "PatientBirthDate+StudyDate" (and the like)


def patient_age(ds: Dataset) -> PatientAge | None:
    """The patient's age at the time of the film, or None when the header does not say.

    Values that are present but unusable are logged as `patient_age_unreadable` with their
    reason codes (e.g. patient-age-malformed, birth-date-after-study-date), not their values.
    """
    problems: list[str] = []
    age = _from_age_string(ds, problems)
    if age is None:
        age = _from_birth_date(ds, problems)
    if problems:
        log.info("patient_age_unreadable", reasons=problems, age_found=age is not None,
                 age_source=age.source if age is not None else None,
                 sop_instance_uid=_text(ds, "SOPInstanceUID"))
    return age


def in_range(age_years: float, age_range: tuple[float, float]) -> bool:
    """min <= age < max + 1: [1, 5] holds 1 year to 5 years 11 months."""
    low, high = age_range
    return low <= age_years < high + 1


def format_age_range(age_range: tuple[float, float]) -> str:
    """'1-5' (years), as the skip reason, the logs and the report state it."""
    return "-".join(_number(value) for value in age_range)


def outside_reason(age: PatientAge, age_range: tuple[float, float]) -> str:
    return (f"outside-intended-age: {age.text}; the model is for "
            f"{format_age_range(age_range)}")


def unknown_age_reason(age_range: tuple[float, float] | None) -> str:
    """The skip reason of a film without a usable age under [model] unknown_age = "skip"."""
    model_range = (f"; the model is for {format_age_range(age_range)}"
                   if age_range is not None else "")
    return ("unknown-age: no usable patient age in the header (Patient's Age, or Birth Date "
            f"with a Study, Acquisition or Content Date){model_range}; [model] unknown_age = "
            '"skip"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _text(ds: Dataset, keyword: str) -> str | None:
    """The element's value as text, None when absent or empty; raises ValueError when the
    element itself cannot be read or holds several values."""
    try:
        value = ds.get(keyword)
    except Exception as error:  # a raw element pydicom cannot decode
        raise ValueError(f"unreadable {keyword}") from error
    if value is None or value == "":
        return None
    if not isinstance(value, (str, bytes)) and not hasattr(value, "isoformat"):
        raise ValueError(f"{keyword} is not a single value")
    text = value.isoformat().replace("-", "") if hasattr(value, "isoformat") else (
        value.decode("ascii", "replace") if isinstance(value, bytes) else value)
    return text.strip() or None


def _from_age_string(ds: Dataset, problems: list[str]) -> PatientAge | None:
    try:
        raw = _text(ds, "PatientAge")
    except ValueError:
        problems.append("patient-age-malformed")
        return None
    if raw is None:
        return None
    match = AGE_STRING.match(raw)
    if match is None:
        problems.append("patient-age-malformed")
        return None
    count, unit = int(match.group(1)), match.group(2).upper()
    years = count * UNIT_YEARS[unit]
    if years > MAX_AGE_YEARS:
        problems.append("patient-age-implausible")
        return None
    singular, plural = UNIT_NAMES[unit]
    return PatientAge(years, f"{count} {singular if count == 1 else plural}", "PatientAge")


def _date(ds: Dataset, keyword: str, code: str, problems: list[str]) -> datetime.date | None:
    try:
        raw = _text(ds, keyword)
    except ValueError:
        problems.append(f"{code}-malformed")
        return None
    if raw is None:
        return None
    match = DATE.match(raw)
    try:
        if match is None:
            raise ValueError(raw)
        return datetime.date(*(int(part) for part in match.groups()))
    except ValueError:
        problems.append(f"{code}-malformed")
        return None


def _from_birth_date(ds: Dataset, problems: list[str]) -> PatientAge | None:
    birth = _date(ds, "PatientBirthDate", "birth-date", problems)
    if birth is None:
        return None
    for keyword in REFERENCE_DATES:
        code = re.sub(r"(?<!^)(?=[A-Z])", "-", keyword).lower()  # StudyDate -> study-date
        reference = _date(ds, keyword, code, problems)
        if reference is None:
            continue
        if reference < birth:
            problems.append(f"birth-date-after-{code}")
            return None
        age = age_between(birth, reference)
        if age.years > MAX_AGE_YEARS:
            problems.append("birth-date-implausible")
            return None
        return dataclasses.replace(age, source=f"PatientBirthDate+{keyword}")
    problems.append("birth-date-without-film-date")
    return None


def age_between(birth: datetime.date, on: datetime.date) -> PatientAge:
    """Age on a date: completed years plus the fraction of the current year of life; the text
    in completed years (months under a year, days under a month)."""
    years = on.year - birth.year - (on < _anniversary(birth, on.year))
    last_birthday = _anniversary(birth, birth.year + years)
    next_birthday = _anniversary(birth, birth.year + years + 1)
    fraction = (on - last_birthday).days / (next_birthday - last_birthday).days
    if years >= 1:
        text = f"{years} year{'s' if years != 1 else ''}"
    else:
        months = (on.year - birth.year) * 12 + on.month - birth.month - (on.day < birth.day)
        if months >= 1:
            text = f"{months} month{'s' if months != 1 else ''}"
        else:
            days = (on - birth).days
            text = f"{days} day{'s' if days != 1 else ''}"
    return PatientAge(years + fraction, text, "PatientBirthDate")


def _anniversary(birth: datetime.date, year: int) -> datetime.date:
    try:
        return birth.replace(year=year)
    except ValueError:  # born on 29 February: the birthday is 28 February in other years
        return birth.replace(year=year, day=28)


# --- the site's settings over the model's own -------------------------------------------------

def site_model_info(info: ModelInfo, *, threshold: float | None = None,
                    min_age_years: float | None = None,
                    max_age_years: float | None = None,
                    ood_threshold: float | None = None, table: str = "[model]") -> ModelInfo:
    """The model info the service works with: the file's threshold and age range, each replaced
    where the site's config table (``table``, named in errors: [model] or [shadow]) sets it.
    Raises UserError when the result is no range.

    One bound alone overrides only that bound; with no range in the model file, a missing
    minimum is 0 and a missing maximum is MAX_AGE_YEARS.
    """
    effective = info
    if ood_threshold is not None:
        if info.ood_threshold is None:
            raise UserError(f"{table} ood_threshold is set, but the model file has no "
                            "out-of-distribution score to compare it with: remove the key")
        if info.metadata.get("ood", {}).get("score") == "gate" and not 0 < ood_threshold <= 1:
            # a gate's score is a probability (1: never abstain); a value set for an older
            # model's distance score (about 2) would let every film through unnoticed
            raise UserError(f"{table} ood_threshold {ood_threshold:g} is outside (0, 1], the range "
                            f"of {info.label}'s gate score; it was set for another model's "
                            "score: remove it, or set 1 to never abstain")
        effective = dataclasses.replace(effective, ood_threshold=float(ood_threshold))
    if threshold is not None:
        effective = dataclasses.replace(effective, threshold=float(threshold))
    if min_age_years is not None or max_age_years is not None:
        model_low, model_high = info.intended_age_years or (0.0, float(MAX_AGE_YEARS))
        low = float(min_age_years) if min_age_years is not None else model_low
        high = float(max_age_years) if max_age_years is not None else model_high
        if low > high:
            raise UserError(
                f"[model] min_age_years/max_age_years give the age range {_number(low)}-"
                f"{_number(high)} (the model file's is "
                f"{_describe_range(info.intended_age_years)}); the minimum must not be above "
                "the maximum: set both keys")
        effective = dataclasses.replace(effective, intended_age_years=(low, high))
    return effective


def _describe_range(age_range: tuple[float, float] | None) -> str:
    return format_age_range(age_range) if age_range is not None else "not stated"


def log_site_model_info(model: ModelInfo, effective: ModelInfo,
                        unknown_age: str = UNKNOWN_AGE_CLASSIFY) -> None:
    """The start-up lines saying which threshold and age range are in force, what happens to
    films without an age ([model] unknown_age), and why."""
    if effective.intended_age_years is None:
        log.warning("intended_age_unchecked",
                    detail="the model file states no intended_use age_years and [model] sets "
                           "no min_age_years/max_age_years: films of every age are classified")
    elif effective.intended_age_years == model.intended_age_years:
        log.info("intended_age", age_years=format_age_range(effective.intended_age_years),
                 source="model file")
    else:
        log.warning("intended_age_overridden",
                    age_years=format_age_range(effective.intended_age_years),
                    model_age_years=_describe_range(model.intended_age_years),
                    source="[model] min_age_years/max_age_years")
    if effective.ood_threshold is None:
        log.info("abstention_off", detail="the model file has no out-of-distribution score: "
                                          "it never abstains")
    elif effective.ood_threshold != model.ood_threshold:
        log.warning("ood_threshold_overridden", ood_threshold=effective.ood_threshold,
                    model_ood_threshold=model.ood_threshold, source="[model] ood_threshold")
    else:
        log.info("abstention", ood_threshold=effective.ood_threshold, source="model file")
    if not math.isclose(effective.threshold, model.threshold, rel_tol=0, abs_tol=1e-12):
        log.warning("threshold_overridden", threshold=effective.threshold,
                    model_threshold=model.threshold, source="[model] threshold")
    _log_unknown_age(effective, unknown_age)


def _log_unknown_age(effective: ModelInfo, unknown_age: str) -> None:
    if unknown_age == UNKNOWN_AGE_SKIP:
        log.info("unknown_age", action=unknown_age,
                 detail="films without a usable patient age are skipped (reason unknown-age)")
    elif effective.ood_threshold is not None:
        log.info("unknown_age", action=unknown_age,
                 detail="films without a usable patient age are classified: the "
                        "out-of-distribution gate alone decides for them")
    else:  # nothing but the other header filters stands between such a film and a report
        log.warning("unknown_age", action=unknown_age,
                    detail="films without a usable patient age are classified, and the model "
                           "file has no out-of-distribution score to abstain on those it was "
                           'not made for: consider [model] unknown_age = "skip"')
