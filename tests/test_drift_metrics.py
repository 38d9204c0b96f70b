"""Drift watch (issue 24 item 3): what /metrics tells Prometheus about a model's results and
about the films that arrive, with no patient data: pacs_ai_model_results_total per model and
role, pacs_ai_ood_score per model, pacs_ai_arrivals_total with bounded labels, the models'
thresholds and the site's [drift] band as gauges."""

from __future__ import annotations

import dataclasses
import random
import string
import threading

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes, JPEG2000Lossless, RLELossless

from pacs_ai.config import DEFAULT_MAX_PIXELS, DriftConfig, FilterPolicy, parse_config
from pacs_ai.film.film_input import prepare
from pacs_ai.model.model import PneumoniaModel
from pacs_ai.ops import metrics
from pacs_ai.receive import arrivals
from testbed.dicom_peers import synthetic_radiograph, wait_until
from testbed.job_queue import all_jobs
from testbed.listener import Listener
from testbed.tiny_models import export_untrained_tiny_ensemble
from tests.test_worker import received_backlog, worker_for


def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the registry, as /metrics gives it (the text format, parsed)."""
    from prometheus_client import generate_latest

    text = generate_latest(metrics.REGISTRY).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def delta(before: dict, after: dict, metric: str, **labels: str) -> float:
    key = (metric, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


# --- a model's results --------------------------------------------------------------------------

def test_the_worker_counts_each_films_result_and_score_per_model_and_role(tmp_path):
    """Six films; the abstention threshold between the third and fourth score, so some abstain
    and some get a finding. The counts agree with what the job store recorded, the abstained
    jobs keep the model's name, and the score histogram holds every film's score."""
    spool, store = received_backlog(tmp_path, 6, first_seed=900)
    path = export_untrained_tiny_ensemble(tmp_path / "ens.pt", ood_threshold=1.0)
    model = PneumoniaModel.load(path)
    inputs = np.stack([prepare(spool.resolve(job.image_file), FilterPolicy(),
                               DEFAULT_MAX_PIXELS).model_input for job in all_jobs(store)])
    _, scores = model.assess(inputs)
    ordered = np.sort(scores)
    model.info = dataclasses.replace(model.info, ood_threshold=float(ordered[2] + ordered[3]) / 2)
    labels = {"name": model.info.name, "version": model.info.version, "role": "live"}
    before = samples()
    stop = threading.Event()
    worker = worker_for(spool, store, model, stop)
    worker.start()
    try:
        assert wait_until(lambda: store.job_counts()["pending"] == 0
                          and store.job_counts()["classifying"] == 0, 60), store.job_counts()
    finally:
        stop.set()
        worker.join(timeout=10)
    after = samples()
    jobs = all_jobs(store)
    abstained = [job for job in jobs if (job.reason or "").startswith("out-of-distribution:")]
    found = {finding: sum(job.finding == finding for job in jobs)
             for finding in ("pneumonia", "normal")}
    assert 0 < len(abstained) < 6 and sum(found.values()) == 6 - len(abstained)
    assert delta(before, after, "pacs_ai_model_results_total", result="abstained",
                 **labels) == len(abstained)
    for finding, count in found.items():
        assert delta(before, after, "pacs_ai_model_results_total", result=finding,
                     **labels) == count
    assert {job.model for job in abstained} == {model.info.label}  # the queue page's per model
    assert delta(before, after, "pacs_ai_ood_score_count", **labels) == 6
    assert delta(before, after, "pacs_ai_ood_score_sum", **labels) == pytest.approx(
        float(scores.sum()), rel=1e-4)
    for bound in (*metrics.OOD_SCORE_BUCKETS, float("inf")):  # the films scoring at most it
        le = "+Inf" if bound == float("inf") else repr(bound)
        assert delta(before, after, "pacs_ai_ood_score_bucket", le=le, **labels) == \
            sum(float(score) <= bound for score in scores), bound
    store.close()


def test_ood_score_buckets_resolve_both_kinds_of_score():
    """A gate's probability (threshold 0.3-0.6) and the Mahalanobis score (threshold near 2)
    each get buckets around their threshold; the histogram's old bounds are all kept."""
    buckets = metrics.OOD_SCORE_BUCKETS
    assert list(buckets) == sorted(set(buckets))
    assert sum(0 < b < 1 for b in buckets) >= 10
    assert {0.3, 0.4, 0.5, 0.6} <= set(buckets)
    assert {0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0} <= set(buckets)  # before issue 24
    assert sum(1.0 < b <= 3.0 for b in buckets) >= 3


def test_model_gauges_name_the_role_and_thresholds_and_the_results_start_at_zero(tmp_path):
    """So that increase() sees a model's first film, its result counters exist at 0."""
    model = PneumoniaModel.load(export_untrained_tiny_ensemble(tmp_path / "ens.pt",
                                                               ood_threshold=3.25,
                                                               threshold=0.42))
    candidate = dataclasses.replace(model.info, version="9.9.9-candidate", ood_threshold=None)
    metrics.set_models([(model.info, metrics.ROLE_LIVE), (candidate, metrics.ROLE_SHADOW)])
    now = samples()
    live = {"name": model.info.name, "version": model.info.version, "role": "live"}
    shadow = {"name": model.info.name, "version": "9.9.9-candidate", "role": "shadow"}
    assert now[("pacs_ai_model_info", tuple(sorted(live.items())))] == 1
    assert now[("pacs_ai_model_info", tuple(sorted(shadow.items())))] == 1
    threshold = tuple(sorted({**live, "kind": "finding"}.items()))
    assert now[("pacs_ai_model_threshold", threshold)] == pytest.approx(0.42)
    assert now[("pacs_ai_model_threshold",
                tuple(sorted({**live, "kind": "abstention"}.items())))] == 3.25
    assert ("pacs_ai_model_threshold",
            tuple(sorted({**shadow, "kind": "abstention"}.items()))) not in now
    for result in ("pneumonia", "normal", "abstained"):
        key = ("pacs_ai_model_results_total", tuple(sorted({**shadow, "result": result}.items())))
        assert key in now
    metrics.set_models([(model.info, metrics.ROLE_LIVE)])  # the candidate withdrawn
    assert ("pacs_ai_model_info", tuple(sorted(shadow.items()))) not in samples()


def test_the_drift_band_is_read_from_the_config_and_exported(tmp_path):
    config = parse_config({"drift": {"expected_positive_rate": [0.12, 0.34],
                                     "max_abstention_rate": 0.07, "min_films": 30,
                                     "days": 14}}, base_dir=tmp_path)
    assert config.drift == DriftConfig((0.12, 0.34), 0.07, 30, 14)
    metrics.set_drift_band(config.drift)
    now = samples()
    assert now[("pacs_ai_drift_expected_positive_rate", (("bound", "low"),))] == 0.12
    assert now[("pacs_ai_drift_expected_positive_rate", (("bound", "high"),))] == 0.34
    assert now[("pacs_ai_drift_max_abstention_rate", ())] == 0.07
    assert now[("pacs_ai_drift_min_films", ())] == 30
    default = parse_config({}, base_dir=tmp_path).drift
    low, high = default.expected_positive_rate
    assert 0 < low < high < 1 and 0 < default.max_abstention_rate < 1


# --- what arrives -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, label", [
    ("GE Healthcare", "ge"), ("GE MEDICAL SYSTEMS", "ge"), ("FUJIFILM Corporation", "fujifilm"),
    ("Carestream Health", "carestream"), ("KODAK", "kodak"), ("Philips Medical Systems", "philips"),
    ("SIEMENS", "siemens"), ("Konica Minolta", "konica-minolta"), ("DRGEM", "drgem"),
    ("Agfa-Gevaert", "agfa"), ("  samsung electronics ", "samsung"),
    ("GEMINI Imaging", "other"),  # "ge" only as a word
    ("Hospital Workshop", "other"), ("", "none"), (None, "none"), ("   ", "none"),
])
def test_manufacturer_is_one_of_a_bounded_set(text, label):
    assert arrivals.manufacturer_label(text) == label


@pytest.mark.parametrize("spacing, band", [
    (None, "none"), (0.05, "<0.1"), (0.1, "0.1-0.15"), (0.139, "0.1-0.15"), (0.15, "0.15-0.2"),
    (0.2, "0.2-0.3"), (0.3, "0.3-0.5"), (0.5, ">=0.5"), (2.0, ">=0.5"),
])
def test_pixel_spacing_bands(spacing, band):
    assert arrivals.pixel_spacing_band(spacing) == band
    assert band == "none" or band in arrivals.pixel_spacing_labels()


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the junk headers below
def test_arrival_labels_of_a_header_and_of_garbage_stay_bounded():
    header = Dataset()
    header.Manufacturer = "Canon Inc."
    header.Modality = "DX"
    header.PhotometricInterpretation = "MONOCHROME1"
    header.ImagerPixelSpacing = [0.125, 0.16]  # the larger counts
    assert arrivals.arrival_labels(header, JPEG2000Lossless) == {
        "manufacturer": "canon", "modality": "DX", "photometric_interpretation": "MONOCHROME1",
        "transfer_syntax": "JPEG2000Lossless", "pixel_spacing_mm": "0.15-0.2"}
    header.PixelSpacing = [0.3, 0.3]  # Pixel Spacing wins over Imager Pixel Spacing
    assert arrivals.arrival_labels(header, None)["pixel_spacing_mm"] == "0.3-0.5"
    bad = Dataset()
    bad.PixelSpacing = "0.2"  # one value, not two
    assert arrivals.arrival_labels(bad, "1.2.3.4")["pixel_spacing_mm"] == "invalid"
    assert arrivals.arrival_labels(bad, "1.2.3.4")["transfer_syntax"] == "other"

    rng = random.Random(0)
    seen: dict[str, set[str]] = {}
    for _ in range(500):  # free text of every kind: the values stay within a known set
        junk = Dataset()
        word = "".join(rng.choice(string.ascii_letters + " -.") for _ in range(rng.randrange(20)))
        junk.Manufacturer, junk.Modality = word, word[:2].upper() or "CR"
        junk.PhotometricInterpretation = word[:10].upper()
        for key, value in arrivals.arrival_labels(junk, word).items():
            seen.setdefault(key, set()).add(value)
    allowed = {arrivals.NONE, arrivals.OTHER, arrivals.INVALID}
    assert seen["manufacturer"] <= allowed | {name for name, _ in arrivals.MANUFACTURERS}
    assert seen["modality"] <= allowed | set(arrivals.MODALITIES)
    assert seen["photometric_interpretation"] <= allowed | set(
        arrivals.PHOTOMETRIC_INTERPRETATIONS)
    assert seen["transfer_syntax"] <= allowed
    assert {arrivals.transfer_syntax_label(uid) for uid in AllTransferSyntaxes} <= {
        uid.keyword for uid in AllTransferSyntaxes}  # a bounded set: about 40 values


def test_the_listener_counts_each_new_film_by_its_kind_once(tmp_path):
    """Over DICOM: two vendors, two transfer syntaxes; a film sent again and a refused one
    are not arrivals."""
    listener = Listener(tmp_path)
    try:
        fuji = synthetic_radiograph(seed=1, modality="CR")
        fuji.Manufacturer = "FUJIFILM Corporation"
        fuji.PixelSpacing = [0.15, 0.15]
        ge = synthetic_radiograph(seed=2, sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                                  transfer_syntax=RLELossless)
        ge.Manufacturer = "GE Healthcare"
        refused = synthetic_radiograph(seed=3)
        refused.Rows = 60000  # more pixels than max_pixels declares: refused while received
        refused.Columns = 60000
        refused.Manufacturer = "Siemens"
        before = samples()
        results = listener.modality().send([fuji, ge, fuji, refused])
        assert [r.acknowledged for r in results] == [True, True, True, False]
        after = samples()
    finally:
        listener.close()
    fuji_labels = {"manufacturer": "fujifilm", "modality": "CR",
                   "photometric_interpretation": "MONOCHROME2",
                   "transfer_syntax": "ExplicitVRLittleEndian", "pixel_spacing_mm": "0.15-0.2"}
    ge_labels = {"manufacturer": "ge", "modality": "DX",
                 "photometric_interpretation": "MONOCHROME2", "transfer_syntax": "RLELossless",
                 "pixel_spacing_mm": "0.2-0.3"}  # synthetic DX: Imager Pixel Spacing 0.2
    assert delta(before, after, "pacs_ai_arrivals_total", **fuji_labels) == 1  # not twice
    assert delta(before, after, "pacs_ai_arrivals_total", **ge_labels) == 1
    arrived = sum(value - before.get(key, 0.0) for key, value in after.items()
                  if key[0] == "pacs_ai_arrivals_total")
    assert arrived == 2
    assert delta(before, after, "pacs_ai_received_total") == 3  # acknowledged C-STOREs
