"""Intended use enforced (issue 13, item 1) and the site's [model] overrides (item 3's threshold).

Films outside the model's age range are skipped with `outside-intended-age: <age>; the model is
for <min>-<max>`; the age comes from every encoding a header can carry, and films without a
usable age are classified. Then the same through the model file, the config, the report, the
offline `pacs-ai classify`, and the live listener.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import structlog
from pydicom.dataset import Dataset

from pacs_ai.config import ConfigError, FilterPolicy, load_config, parse_config
from pacs_ai.dicom_constants import CR_IMAGE_STORAGE
from pacs_ai.errors import UserError
from pacs_ai.film.filters import Screening, screen, skip_reason
from pacs_ai.model.intended_use import (age_between, format_age_range, log_site_model_info,
                                        patient_age, site_model_info)
from pacs_ai.model.model import ModelContractError, ModelInfo, validate_metadata
from training.export import build_metadata

# Malformed ages and dates are what these tests send; pydicom warns about each (its logger is
# silenced in the service, pacs_ai.ops.logs).
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")

PEDIATRIC = FilterPolicy(intended_age_years=(1, 5))
INTENDED_USE = {"age_years": [1, 5], "views": ["PA", "AP"]}


def chest_pa(**attributes) -> Dataset:
    """Header of a frontal CR chest film with no age at all, plus `attributes`."""
    ds = Dataset()
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Modality = "CR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


# --- every age encoding ---------------------------------------------------------------------

@pytest.mark.parametrize(("attributes", "expected"), [
    # Patient's Age (0010,1010), nnnD / nnnW / nnnM / nnnY
    ({"PatientAge": "054Y"}, "outside-intended-age: 54 years; the model is for 1-5"),
    ({"PatientAge": "006Y"}, "outside-intended-age: 6 years; the model is for 1-5"),
    ({"PatientAge": "005Y"}, None),
    ({"PatientAge": "001Y"}, None),  # the lower boundary: 1 year is in
    ({"PatientAge": "000Y"}, "outside-intended-age: 0 years; the model is for 1-5"),
    ({"PatientAge": "071M"}, None),  # 5 years 11 months: in
    ({"PatientAge": "072M"}, "outside-intended-age: 72 months; the model is for 1-5"),
    ({"PatientAge": "012M"}, None),
    ({"PatientAge": "011M"}, "outside-intended-age: 11 months; the model is for 1-5"),
    ({"PatientAge": "006M"}, "outside-intended-age: 6 months; the model is for 1-5"),
    ({"PatientAge": "003W"}, "outside-intended-age: 3 weeks; the model is for 1-5"),
    ({"PatientAge": "060W"}, None),  # 1.15 years
    ({"PatientAge": "010D"}, "outside-intended-age: 10 days; the model is for 1-5"),
    ({"PatientAge": "001D"}, "outside-intended-age: 1 day; the model is for 1-5"),
    ({"PatientAge": "54Y"}, "outside-intended-age: 54 years; the model is for 1-5"),  # unpadded
    ({"PatientAge": "054y "}, "outside-intended-age: 54 years; the model is for 1-5"),
    # Birth Date with Study Date, else Acquisition Date, else Content Date
    ({"PatientBirthDate": "19700101", "StudyDate": "20240301"},
     "outside-intended-age: 54 years; the model is for 1-5"),
    ({"PatientBirthDate": "20200615", "StudyDate": "20240301"}, None),  # 3 years 8 months
    ({"PatientBirthDate": "20230301", "StudyDate": "20240301"}, None),  # 1st birthday: in
    ({"PatientBirthDate": "20230302", "StudyDate": "20240301"},
     "outside-intended-age: 11 months; the model is for 1-5"),  # a day short of 1 year
    ({"PatientBirthDate": "20180302", "StudyDate": "20240301"}, None),  # 5 y 11 m 30 d: in
    ({"PatientBirthDate": "20180301", "StudyDate": "20240301"},
     "outside-intended-age: 6 years; the model is for 1-5"),  # 6th birthday: out
    ({"PatientBirthDate": "20230901", "StudyDate": "20240301"},
     "outside-intended-age: 6 months; the model is for 1-5"),
    ({"PatientBirthDate": "20240220", "StudyDate": "20240301"},
     "outside-intended-age: 10 days; the model is for 1-5"),
    ({"PatientBirthDate": "19700101", "AcquisitionDate": "20240301"},
     "outside-intended-age: 54 years; the model is for 1-5"),
    ({"PatientBirthDate": "19700101", "ContentDate": "20240301"},
     "outside-intended-age: 54 years; the model is for 1-5"),
    ({"PatientBirthDate": "20200101", "StudyDate": "20240301",
      "AcquisitionDate": "20300301"}, None),  # the Study Date comes first
    # Patient's Age comes before the birth date
    ({"PatientAge": "003Y", "PatientBirthDate": "19700101", "StudyDate": "20240301"}, None),
    # missing: classified
    ({}, None),
    ({"PatientAge": "", "PatientBirthDate": ""}, None),
    ({"PatientBirthDate": "19700101"}, None),  # no date of the film
])
def test_every_age_encoding(attributes, expected):
    assert skip_reason(chest_pa(**attributes), PEDIATRIC) == expected


@pytest.mark.parametrize(("attributes", "codes"), [
    ({"PatientAge": "54"}, ["patient-age-malformed"]),
    ({"PatientAge": "fifty"}, ["patient-age-malformed"]),
    ({"PatientAge": "054X"}, ["patient-age-malformed"]),
    ({"PatientAge": "0054Y"}, ["patient-age-malformed"]),
    ({"PatientAge": "999Y"}, ["patient-age-implausible"]),
    ({"PatientBirthDate": "19700230", "StudyDate": "20240301"}, ["birth-date-malformed"]),
    ({"PatientBirthDate": "1970-01-01", "StudyDate": "20240301"}, ["birth-date-malformed"]),
    ({"PatientBirthDate": "19700101", "StudyDate": "2024"}, ["study-date-malformed",
                                                            "birth-date-without-film-date"]),
    ({"PatientBirthDate": "20250101", "StudyDate": "20240301"},
     ["birth-date-after-study-date"]),
    ({"PatientBirthDate": "18000101", "StudyDate": "20240301"}, ["birth-date-implausible"]),
    ({"PatientBirthDate": "19700101"}, ["birth-date-without-film-date"]),
])
def test_malformed_values_count_as_no_age_and_are_logged_by_code_only(attributes, codes):
    ds = chest_pa(**attributes)
    with structlog.testing.capture_logs() as logs:
        assert skip_reason(ds, PEDIATRIC) is None, "no usable age: classified"
    [event] = [e for e in logs if e["event"] == "patient_age_unreadable"]
    assert event["reasons"] == codes
    assert event["sop_instance_uid"] == "1.2.3.4"
    logged = json.dumps(logs)
    for value in attributes.values():
        assert value not in logged, "no patient data in the logs"


def test_a_malformed_value_falls_back_to_the_next_source():
    # a malformed Patient's Age: the birth date decides
    ds = chest_pa(PatientAge="54", PatientBirthDate="19700101", StudyDate="20240301")
    with structlog.testing.capture_logs() as logs:
        assert skip_reason(ds, PEDIATRIC) == ("outside-intended-age: 54 years; the model is "
                                              "for 1-5")
    assert [e["reasons"] for e in logs if e["event"] == "patient_age_unreadable"] == [
        ["patient-age-malformed"]]
    # a malformed Study Date: the Acquisition Date decides
    ds = chest_pa(PatientBirthDate="19700101", StudyDate="2024-03-01",
                  AcquisitionDate="20240301")
    assert patient_age(ds).source == "PatientBirthDate+AcquisitionDate"


def test_ages_in_years_with_their_fraction():
    assert patient_age(chest_pa(PatientAge="006M")).years == 0.5
    assert patient_age(chest_pa(PatientAge="071M")).years == pytest.approx(5.9167, abs=1e-4)
    import datetime
    leap = age_between(datetime.date(2020, 2, 29), datetime.date(2021, 2, 28))
    assert leap.years == 1.0 and leap.text == "1 year"
    assert age_between(datetime.date(2020, 1, 1), datetime.date(2020, 2, 1)).text == "1 month"


def test_without_an_age_range_there_is_no_age_check():
    assert skip_reason(chest_pa(PatientAge="054Y")) is None
    assert skip_reason(chest_pa(PatientAge="054Y"), FilterPolicy()) is None


def test_other_reasons_come_before_the_age():
    reason = skip_reason(chest_pa(PatientAge="054Y", ViewPosition="LL"), PEDIATRIC)
    assert reason.startswith("not-frontal:")


def test_fractional_and_wide_ranges():
    assert format_age_range((0.5, 17)) == "0.5-17"
    policy = FilterPolicy(intended_age_years=(0.5, 17))
    assert skip_reason(chest_pa(PatientAge="006M"), policy) is None
    assert skip_reason(chest_pa(PatientAge="017Y"), policy) is None
    assert skip_reason(chest_pa(PatientAge="018Y"), policy) == (
        "outside-intended-age: 18 years; the model is for 0.5-17")


# --- films without an age: counted, classified or skipped (issue 22 item 4) ----------------------

PEDIATRIC_SKIP = FilterPolicy(intended_age_years=(1, 5), unknown_age="skip")
UNKNOWN_AGE_REASON = ("unknown-age: no usable patient age in the header (Patient's Age, or Birth "
                      "Date with a Study, Acquisition or Content Date); the model is for 1-5; "
                      '[model] unknown_age = "skip"')


@pytest.mark.parametrize(("attributes", "policy", "expected"), [
    # an age in range: classified, whatever unknown_age says
    ({"PatientAge": "003Y"}, PEDIATRIC, Screening(None, True)),
    ({"PatientAge": "003Y"}, PEDIATRIC_SKIP, Screening(None, True)),
    ({"PatientBirthDate": "20210115", "StudyDate": "20240301"}, PEDIATRIC_SKIP,
     Screening(None, True)),
    # out of range: the age decides, not unknown_age
    ({"PatientAge": "054Y"}, PEDIATRIC_SKIP,
     Screening("outside-intended-age: 54 years; the model is for 1-5", True)),
    # absent: classified by default, skipped with unknown_age = "skip"
    ({}, PEDIATRIC, Screening(None, False)),
    ({}, PEDIATRIC_SKIP, Screening(UNKNOWN_AGE_REASON, False)),
    ({"PatientAge": "", "PatientBirthDate": ""}, PEDIATRIC_SKIP,
     Screening(UNKNOWN_AGE_REASON, False)),
    ({"PatientBirthDate": "20210115"}, PEDIATRIC_SKIP,  # no date of the film
     Screening(UNKNOWN_AGE_REASON, False)),
    # present but unparseable: no usable age, so the same as absent
    ({"PatientAge": "fifty"}, PEDIATRIC, Screening(None, False)),
    ({"PatientAge": "fifty"}, PEDIATRIC_SKIP, Screening(UNKNOWN_AGE_REASON, False)),
    ({"PatientBirthDate": "2021-01-15", "StudyDate": "20240301"}, PEDIATRIC_SKIP,
     Screening(UNKNOWN_AGE_REASON, False)),
    # an earlier filter decides first: the age is not looked at
    ({"ViewPosition": "LL"}, PEDIATRIC_SKIP,
     Screening("not-frontal: view is LL, not one of PA, AP", None)),
    # no age range in force: an age is still counted, and "skip" still skips films without one
    ({"PatientAge": "054Y"}, FilterPolicy(), Screening(None, True)),
    ({}, FilterPolicy(), Screening(None, False)),
    ({}, FilterPolicy(unknown_age="skip"), Screening(
        "unknown-age: no usable patient age in the header (Patient's Age, or Birth Date with a "
        'Study, Acquisition or Content Date); [model] unknown_age = "skip"', False)),
])
def test_films_without_a_usable_age_are_classified_or_skipped_and_told_apart(attributes, policy,
                                                                            expected):
    ds = chest_pa(**attributes)
    screening = screen(ds, policy)
    assert (screening.reason, screening.age_known) == (expected.reason, expected.age_known)
    # the age read comes with it (a [shadow] model's own range is checked on it)
    assert screening.age == (patient_age(ds) if expected.age_known else None)
    assert skip_reason(ds, policy) == expected.reason


def test_an_unparseable_age_skipped_is_logged_by_code_only():
    with structlog.testing.capture_logs() as logs:
        assert skip_reason(chest_pa(PatientAge="fifty"), PEDIATRIC_SKIP) == UNKNOWN_AGE_REASON
    assert [e["reasons"] for e in logs if e["event"] == "patient_age_unreadable"] == [
        ["patient-age-malformed"]]
    assert "fifty" not in json.dumps(logs)


def test_unknown_age_is_a_policy_setting_kept_with_the_age_range():
    with pytest.raises(ValueError, match="unknown_age"):
        FilterPolicy(unknown_age="ignore")
    assert "unknown_age" not in FilterPolicy.field_names()  # [model]'s, not a [filters] key
    skipping = FilterPolicy().with_intended_age((1, 5), "skip")
    assert (skipping.intended_age_years, skipping.unknown_age) == ((1.0, 5.0), "skip")
    assert skipping.with_intended_age((1, 17)).unknown_age == "skip"  # kept unless given
    assert FilterPolicy().with_intended_age((1, 5)).unknown_age == "classify"


def test_a_picture_has_no_age_so_it_is_classified_or_skipped_alike(tmp_path):
    """PNG/JPEG (the offline commands): no header, so no age."""
    import numpy as np
    from PIL import Image

    from pacs_ai.film.film_input import prepare

    path = tmp_path / "film.png"
    Image.fromarray(np.full((240, 220), 90, np.uint8)).save(path)
    classified = prepare(path, PEDIATRIC, 10**8)
    assert (classified.status, classified.age_known) == ("ok", False)
    assert classified.model_input is not None
    skipped = prepare(path, PEDIATRIC_SKIP, 10**8)
    assert (skipped.status, skipped.reason) == ("skipped", UNKNOWN_AGE_REASON)
    assert skipped.model_input is None


# --- the model file -----------------------------------------------------------------------------

def metadata(**changes):
    data = build_metadata(name="t", version="1", threshold=0.4, threshold_rule="test")
    data.update(changes)
    return data


def test_the_model_file_states_its_intended_use():
    info = validate_metadata(metadata(intended_use=INTENDED_USE))
    assert info.intended_age_years == (1.0, 5.0)
    assert info.intended_views == ("PA", "AP")
    info = validate_metadata(metadata())  # older files: no intended use, no age check
    assert info.intended_age_years is None and info.intended_views is None
    info = validate_metadata(metadata(intended_use={"views": ["PA"]}))
    assert info.intended_age_years is None and info.intended_views == ("PA",)


@pytest.mark.parametrize("intended_use", [
    [1, 5], {"age_years": [5, 1]}, {"age_years": [1]}, {"age_years": "1-5"},
    {"age_years": [-1, 5]}, {"age_years": [1, 500]}, {"age_years": [True, 5]},
    {"views": "PA"}, {"views": [1]},
])
def test_a_wrong_intended_use_is_refused(intended_use):
    with pytest.raises(ModelContractError, match="intended_use"):
        validate_metadata(metadata(intended_use=intended_use))


# --- the config ---------------------------------------------------------------------------------

def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pacs-ai.toml"
    path.write_text(text)
    return path


def test_model_overrides_are_read(tmp_path):
    config = load_config(write(tmp_path, "[model]\nthreshold = 0.3\nmin_age_years = 0\n"
                                         "max_age_years = 17.5\n"))
    assert (config.model.threshold, config.model.min_age_years,
            config.model.max_age_years) == (0.3, 0.0, 17.5)
    config = parse_config({}, base_dir=tmp_path)
    assert (config.model.threshold, config.model.min_age_years,
            config.model.max_age_years) == (None, None, None)
    assert config.model.unknown_age == "classify"
    assert load_config(write(tmp_path, '[model]\nunknown_age = "skip"\n')).model.unknown_age \
        == "skip"


@pytest.mark.parametrize(("text", "named"), [
    ("[model]\nthreshold = 1.5\n", "[model] threshold"),
    ("[model]\nthreshold = -0.1\n", "[model] threshold"),
    ("[model]\nthreshold = \"0.3\"\n", "[model] threshold"),
    ("[model]\nthreshold = true\n", "[model] threshold"),
    ("[model]\nmin_age_years = -1\n", "[model] min_age_years"),
    ("[model]\nmax_age_years = 200\n", "[model] max_age_years"),
    ("[model]\nmax_age_years = \"5\"\n", "[model] max_age_years"),
    ("[model]\nmin_age_years = 6\nmax_age_years = 5\n", "[model] min_age_years"),
    ("[model]\nmin_age = 6\n", "unknown key 'min_age'"),
    ("[filters]\nintended_age_years = [1, 5]\n", "unknown key 'intended_age_years'"),
    ("[model]\nunknown_age = \"ignore\"\n", "[model] unknown_age: 'ignore' is not one of "
                                             "'classify', 'skip'"),
    ("[model]\nunknown_age = false\n", "[model] unknown_age: expected a quoted string"),
    ("[filters]\nunknown_age = \"skip\"\n", "unknown key 'unknown_age'"),
])
def test_bad_model_overrides_name_the_key(tmp_path, text, named):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert named in str(caught.value) and str(path) in str(caught.value)


def test_serve_stops_on_a_wrong_unknown_age_with_one_line_naming_the_key(tmp_path):
    from testbed.dicom_peers import pacs_ai_cli

    path = write(tmp_path, '[model]\nunknown_age = "ask"\n')
    result = pacs_ai_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"pacs-ai serve: error: {path}: [model] unknown_age: 'ask' is not one of 'classify', "
        "'skip'"]


# --- the site's settings over the model's own ---------------------------------------------------

PEDIATRIC_MODEL = ModelInfo(name="m", version="1", threshold=0.5, output_kind="logit",
                            metadata={}, intended_age_years=(1.0, 5.0))
UNSTATED_MODEL = ModelInfo(name="m", version="1", threshold=0.5, output_kind="logit",
                           metadata={})


@pytest.mark.parametrize(("model", "overrides", "expected"), [
    (PEDIATRIC_MODEL, {}, (1.0, 5.0)),
    (PEDIATRIC_MODEL, {"min_age_years": 0, "max_age_years": 17}, (0.0, 17.0)),  # widened
    (PEDIATRIC_MODEL, {"max_age_years": 3}, (1.0, 3.0)),  # narrowed, one bound
    (PEDIATRIC_MODEL, {"min_age_years": 2}, (2.0, 5.0)),
    (UNSTATED_MODEL, {}, None),
    (UNSTATED_MODEL, {"max_age_years": 17}, (0.0, 17.0)),
    (UNSTATED_MODEL, {"min_age_years": 18}, (18.0, 150.0)),
])
def test_the_config_overrides_the_age_range(model, overrides, expected):
    assert site_model_info(model, **overrides).intended_age_years == expected


def test_an_override_that_leaves_no_range_stops_start_up():
    with pytest.raises(UserError, match="min_age_years"):
        site_model_info(PEDIATRIC_MODEL, min_age_years=8)


def test_start_up_logs_the_ranges_and_thresholds_in_force():
    with structlog.testing.capture_logs() as logs:
        log_site_model_info(UNSTATED_MODEL, UNSTATED_MODEL)
        log_site_model_info(PEDIATRIC_MODEL, PEDIATRIC_MODEL)
        log_site_model_info(PEDIATRIC_MODEL, site_model_info(
            PEDIATRIC_MODEL, threshold=0.3, max_age_years=17))
    events = {e["event"]: e for e in logs}
    assert "no intended_use" in events["intended_age_unchecked"]["detail"]
    assert events["intended_age"]["age_years"] == "1-5"
    assert events["intended_age_overridden"]["age_years"] == "1-17"
    assert events["intended_age_overridden"]["model_age_years"] == "1-5"
    assert (events["threshold_overridden"]["threshold"],
            events["threshold_overridden"]["model_threshold"]) == (0.3, 0.5)
    assert [e["event"] for e in logs].count("threshold_overridden") == 1


def test_start_up_logs_what_happens_to_films_without_an_age():
    import dataclasses

    gated = dataclasses.replace(PEDIATRIC_MODEL, ood_threshold=2.0)
    with structlog.testing.capture_logs() as logs:
        log_site_model_info(gated, gated)
        log_site_model_info(PEDIATRIC_MODEL, PEDIATRIC_MODEL)
        log_site_model_info(PEDIATRIC_MODEL, PEDIATRIC_MODEL, "skip")
    events = [(e["action"], e["log_level"], e["detail"]) for e in logs
              if e["event"] == "unknown_age"]
    assert [event[:2] for event in events] == [("classify", "info"), ("classify", "warning"),
                                               ("skip", "info")]
    assert "out-of-distribution gate alone decides" in events[0][2]
    assert 'consider [model] unknown_age = "skip"' in events[1][2]


# --- the report and the finding -----------------------------------------------------------------

def report_source() -> Dataset:
    from tests.test_report import make_source

    return make_source("DX")


def test_the_threshold_override_changes_the_finding_and_the_report_states_it():
    from pacs_ai.report.report import build_report, report_summary

    source = report_source()
    own = build_report(source, 0.4, PEDIATRIC_MODEL)
    site = site_model_info(PEDIATRIC_MODEL, threshold=0.3, min_age_years=0, max_age_years=17)
    overridden = build_report(source, 0.4, site)
    assert report_summary(own)["finding"] == "normal"
    assert report_summary(overridden)["finding"] == "pneumonia"
    assert report_summary(own)["algorithm_parameters"] == ["threshold=0.5",
                                                           "intended_age_years=1-5"]
    assert report_summary(overridden)["algorithm_parameters"] == ["threshold=0.3",
                                                                  "intended_age_years=0-17"]
    unstated = build_report(source, 0.4, UNSTATED_MODEL)
    assert report_summary(unstated)["algorithm_parameters"] == ["threshold=0.5"]


@pytest.mark.real_peer
def test_the_report_with_an_age_range_passes_dciodvfy_and_dsrdump(tmp_path):
    from pacs_ai.report.report import build_report
    from tests.dicom_tools import run_dciodvfy, run_dsrdump

    sr = build_report(report_source(), 0.4, PEDIATRIC_MODEL)
    result = run_dciodvfy(sr)
    assert result.errors == [], result.output
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    dump = run_dsrdump(path)
    assert dump.errors == [] and dump.warnings == [], dump.output
    assert '(111002,DCM,"Algorithm Parameters")="intended_age_years=1-5"' in dump.stdout


# --- offline `pacs-ai classify` ------------------------------------------------------------------

@pytest.fixture(scope="module")
def pediatric_model(tmp_path_factory) -> Path:
    """The tiny test model stating ages 1-5, with threshold 1.0: every finding is normal unless
    the config lowers the threshold."""
    from testbed.tiny_models import export_untrained_tiny_model

    return export_untrained_tiny_model(tmp_path_factory.mktemp("model") / "pediatric.pt",
                                       threshold=1.0, intended_use=INTENDED_USE)


def aged_films() -> dict[str, Dataset]:
    """An adult (Patient's Age), a child (birth date), and a film without any age."""
    from testbed.dicom_peers import synthetic_radiograph

    adult = synthetic_radiograph(seed=11)
    adult.PatientAge = "054Y"
    adult.PatientBirthDate = "19700101"
    adult.StudyDate = "20240301"
    child = synthetic_radiograph(seed=12)
    child.PatientBirthDate = "20210115"
    child.StudyDate = "20240301"
    unknown = synthetic_radiograph(seed=13)
    unknown.PatientBirthDate = ""
    return {"adult": adult, "child": child, "unknown": unknown}


@pytest.mark.slow
def test_classify_skips_films_outside_the_age_range(tmp_path, pediatric_model):
    from testbed.dicom_peers import pacs_ai_cli

    for name, ds in aged_films().items():
        ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
    result = pacs_ai_cli("classify", "--model", str(pediatric_model), str(tmp_path),
                         timeout=300)
    assert result.returncode == 0, result.stderr
    results = {Path(r["path"]).stem: r for r in map(json.loads, result.stdout.splitlines())}
    assert results["adult"]["status"] == "skipped"
    assert results["adult"]["reason"] == "outside-intended-age: 54 years; the model is for 1-5"
    assert results["adult"]["probability"] is None and results["adult"]["finding"] is None
    assert results["child"]["status"] == "ok" and results["unknown"]["status"] == "ok"
    # the age check could apply to the child's film, not to the one without an age
    assert (results["child"]["age_known"], results["unknown"]["age_known"]) == (True, False)
    assert "age_known" not in results["adult"]  # skipped: not classified
    assert "Traceback" not in result.stderr
    model_card = pacs_ai_cli("model", "--model", str(pediatric_model))
    assert "ages 1-5 years" in model_card.stdout


# --- the live listener --------------------------------------------------------------------------

@pytest.mark.slow
def test_an_adult_film_sent_to_the_listener_is_skipped_and_not_reported(tmp_path,
                                                                        pediatric_model):
    """modality -> pacs-ai serve -> PACS: the adult film is skipped with its reason and no report
    is sent for it; the child's report carries the site's threshold (0, so pneumonia, where the
    model's own 1.0 would say normal) and the age range in its Algorithm Parameters."""
    from pacs_ai.model.site_threshold import file_sha256
    from pacs_ai.report.report import report_summary
    from testbed.dicom_peers import (RecordingPacs, ServiceProcess, SimulatedModality, pacs_ai_cli,
                                     wait_until, write_service_config)

    films = aged_films()
    with RecordingPacs() as pacs:
        config = write_service_config(
            tmp_path, model=pediatric_model, destinations=[pacs.destination()],
            tables={"model": {"threshold": 0.0, "threshold_model_version": "0.0.0-test",
                              "threshold_model_sha256": file_sha256(pediatric_model)},
                    "workers": {"processes": 0}})
        with ServiceProcess(config, tmp_path / "serve.log") as service:
            results = SimulatedModality(service.port).send(
                [films["adult"], films["child"], films["unknown"]])
            assert [r.status for r in results] == [0x0000] * 3
            assert pacs.wait_for(2, timeout=120), service.log_path.read_text()[-3000:]
            assert wait_until(lambda: json.loads(pacs_ai_cli(
                "status", "--config", str(config), "--json").stdout)["backlog"] == 0, 60)
            status = json.loads(pacs_ai_cli("status", "--config", str(config), "--json").stdout)
            time.sleep(1.0)  # a report for the adult would arrive now
            assert service.terminate() == 0
            events = service.events()

    summaries = {s["source_sop_instance_uid"]: s for s in map(report_summary, pacs.snapshot())}
    assert set(summaries) == {films["child"].SOPInstanceUID, films["unknown"].SOPInstanceUID}
    for summary in summaries.values():
        assert summary["finding"] == "pneumonia"
        assert summary["algorithm_parameters"] == ["threshold=0", "intended_age_years=1-5"]
    [skipped] = status["skipped"]
    assert skipped["sop_instance_uid"] == films["adult"].SOPInstanceUID
    assert skipped["reason"] == "outside-intended-age: 54 years; the model is for 1-5"
    assert status["jobs"]["skipped"] == 1 and status["jobs"]["done"] == 2

    by_name = {}
    for event in events:
        by_name.setdefault(event["event"], []).append(event)
    assert by_name["intended_age"][0]["age_years"] == "1-5"
    assert by_name["threshold_overridden"][0]["threshold"] == 0.0
    assert by_name["threshold_overridden"][0]["model_threshold"] == 1.0
    [started] = by_name["service_started"]
    assert started["threshold"] == 0.0 and started["intended_age_years"] == "1-5"
    [skip_event] = by_name["instance_skipped"]
    assert skip_event["reason"].startswith("outside-intended-age: 54 years")
    log_text = (tmp_path / "serve.log").read_text()
    assert "19700101" not in log_text and "20210115" not in log_text


def test_a_widened_range_classifies_the_adult_in_process(tmp_path, pediatric_model):
    """The service in this process: [model] max_age_years = 99 lets the adult film through,
    and the worker's filter policy holds the site's range."""
    from pacs_ai.service import Service
    from testbed.dicom_peers import SimulatedModality, wait_until, write_service_config

    config = load_config(write_service_config(
        tmp_path, model=pediatric_model,
        tables={"model": {"max_age_years": 99}, "workers": {"processes": 0}}))
    service = Service(config).start()
    try:
        assert service.model.info.intended_age_years == (1.0, 99.0)
        assert service.workers[0].filters.intended_age_years == (1.0, 99.0)
        films = aged_films()
        results = SimulatedModality(service.port).send([films["adult"]])
        assert [r.status for r in results] == [0]
        assert wait_until(lambda: service.store.backlog() == 0, 60)
        job = service.store.find(films["adult"].SOPInstanceUID)
        assert (job.state, job.finding) == ("done", "normal"), (job.state, job.reason)
    finally:
        service.stop()


def test_a_report_made_at_the_sites_settings_gets_its_own_uid(tmp_path):
    """Same film, same model version: at the file's own settings the report UID is the one
    reports always had; at a site threshold or age range (which may change the finding) it is
    another, so one UID never names two different reports."""
    from pacs_ai.model.model import PneumoniaModel
    from pacs_ai.report.report import build_report
    from pacs_ai.report.uids import report_uid
    from testbed.tiny_models import export_untrained_tiny_model

    model = PneumoniaModel.load(export_untrained_tiny_model(
        tmp_path / "children.pt", intended_use={"age_years": [1, 5]})).info
    source = report_source()
    own = build_report(source, 0.4, model)
    assert own.SOPInstanceUID == report_uid(source.SOPInstanceUID, model.name, model.version)
    assert build_report(source, 0.4, site_model_info(model)).SOPInstanceUID == own.SOPInstanceUID
    lower = build_report(source, 0.4, site_model_info(model, threshold=0.3))
    wider = build_report(source, 0.4, site_model_info(model, max_age_years=17))
    assert len({own.SOPInstanceUID, lower.SOPInstanceUID, wider.SOPInstanceUID}) == 3


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def _serve_and_send_by_storescu(tmp_path: Path, model: Path, model_table: dict,
                                films: list[Dataset], reports: int) -> dict:
    """storescu (DCMTK) -> `pacs-ai serve` (metrics on) -> a recording PACS: what status (text
    and JSON), the metrics, the log and the PACS show once the films are settled."""
    from testbed.dicom_peers import (RecordingPacs, ServiceProcess, free_port, pacs_ai_cli,
                                     wait_until, write_service_config)
    from testbed.real_peers import storescu

    folder = tmp_path / "films"
    folder.mkdir(parents=True)
    paths = []
    for index, ds in enumerate(films):
        paths.append(folder / f"{index}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    metrics_port = free_port()
    with RecordingPacs() as pacs:
        config = write_service_config(
            tmp_path, model=model, destinations=[pacs.destination()],
            tables={"model": model_table, "workers": {"processes": 0},
                    "metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port}})
        with ServiceProcess(config, tmp_path / "serve.log") as service:
            sent = storescu(service.port, paths, called_ae="PACS_AI")
            assert len(sent.acknowledged) == len(films), sent.output
            status = lambda: json.loads(pacs_ai_cli(  # noqa: E731
                "status", "--config", str(config), "--json").stdout)
            assert wait_until(lambda: status()["backlog"] == 0
                              and sum(status()["jobs"].values()) == len(films), 120), \
                service.log_path.read_text()[-3000:]
            assert pacs.wait_for(reports, timeout=60)
            result = {"status": status(), "metrics": _scrape(metrics_port),
                      "text": pacs_ai_cli("status", "--config", str(config)).stdout}
            time.sleep(1.0)  # a report too many would arrive now
            assert service.terminate() == 0
            result["events"] = service.events()
    from pacs_ai.report.report import report_summary

    result["reported"] = {report_summary(ds)["source_sop_instance_uid"]
                          for ds in pacs.snapshot()}
    result["log"] = (tmp_path / "serve.log").read_text()
    return result


@pytest.mark.real_peer
@pytest.mark.slow
def test_a_film_without_an_age_is_counted_and_the_skip_setting_skips_it(tmp_path,
                                                                       pediatric_model):
    """Issue 22 item 4, end to end with DCMTK's storescu as the modality: by default the film
    without an age is classified, reported, and counted in `pacs-ai status` (text and JSON),
    pacs_ai_classified_without_age_total and its log line (age_known=false), the child's film
    as one with an age; with [model] unknown_age = "skip" the same film is skipped as
    unknown-age with no report, and nothing is counted as classified without an age."""
    films = aged_films()
    child, unknown = str(films["child"].SOPInstanceUID), str(films["unknown"].SOPInstanceUID)
    sent = [films["adult"], films["child"], films["unknown"]]
    without_age = ("pacs_ai_classified_without_age_total", ())
    skipped_unknown = ("pacs_ai_skipped_total", (("reason", "unknown-age"),))

    default = _serve_and_send_by_storescu(tmp_path / "classify", pediatric_model, {}, sent,
                                          reports=2)
    assert default["reported"] == {child, unknown}
    assert default["status"]["classified_ages"] == {"known": 1, "unknown": 1,
                                                    "not_recorded": 0}
    assert default["status"]["unknown_age"] == "classify"
    assert ('no age:   1 of 2 classified films had no usable patient age ([model] unknown_age '
            '= "classify")') in default["text"]
    assert default["metrics"][without_age] == 1
    assert default["metrics"].get(skipped_unknown, 0) == 0
    classified = {e["sop_instance_uid"]: e for e in default["events"]
                  if e["event"] == "instance_classified"}
    assert (classified[unknown]["age_known"], classified[child]["age_known"]) == (False, True)
    [start] = [e for e in default["events"] if e["event"] == "unknown_age"]
    assert start["action"] == "classify" and start["level"] == "warning"  # no gate in this model

    skip = _serve_and_send_by_storescu(tmp_path / "skip", pediatric_model,
                                       {"unknown_age": "skip"}, sent, reports=1)
    assert skip["reported"] == {child}
    assert skip["status"]["classified_ages"] == {"known": 1, "unknown": 0, "not_recorded": 0}
    assert skip["status"]["jobs"]["skipped"] == 2
    reasons = {entry["sop_instance_uid"]: entry["reason"] for entry in skip["status"]["skipped"]}
    assert reasons[unknown] == UNKNOWN_AGE_REASON
    assert f"{unknown}  {UNKNOWN_AGE_REASON}" in skip["text"]
    assert skip["metrics"][skipped_unknown] == 1
    assert skip["metrics"][without_age] == 0
    [start] = [e for e in skip["events"] if e["event"] == "unknown_age"]
    assert start["action"] == "skip"
    [skipped_event] = [e for e in skip["events"] if e["event"] == "instance_skipped"
                       and e["sop_instance_uid"] == unknown]
    assert skipped_event["reason"] == UNKNOWN_AGE_REASON
    for run in (default, skip):  # no patient data in the log: no birth date, not the child's age
        assert "20210115" not in run["log"] and "19700101" not in run["log"]
        assert "3 years" not in run["log"]
    assert not {"age", "patient_age", "age_years"} & set(classified[child])
