"""Shadow mode (issue 24 item 1): a candidate model assesses the films the live model assesses,
on the same model input, and only the job store hears of it.

In-process: the worker over a real spool and queue with real model files (an ensemble with an
out-of-distribution score live; a contract-1 file, without gate or map, and a gated ensemble
as shadows). Real peers: DCMTK storescu -> `pacs-ai serve` with a [shadow] model -> Orthanc,
one report per film at Orthanc, none from the shadow, and the shadow's results in the queue."""

from __future__ import annotations

import dataclasses
import io
import json
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pacs_ai.classify.helper_processes import HelperPool
from pacs_ai.classify.shadow import ShadowBatch, ShadowRunner, load_shadow_model
from pacs_ai.classify.worker import ClassificationWorker
from pacs_ai.config import (DEFAULT_MAX_PIXELS, ConfigError, FilterPolicy, WorkersConfig,
                            default_config, default_model_path, load_config)
from pacs_ai.errors import UserError
from pacs_ai.film.film_input import prepare
from pacs_ai.model.model import PneumoniaModel
from pacs_ai.model.site_threshold import file_sha256
from pacs_ai.ops import metrics
from pacs_ai.queue.job_records import JobState
from pacs_ai.queue.shadow_records import Assessment, ShadowStatus
from testbed.dicom_peers import ServiceProcess, pacs_ai_cli, wait_until, write_service_config
from testbed.environment import SAMPLE_DICOMS
from testbed.job_queue import all_jobs
from tests.test_heatmap import torch_module_copy
from tests.test_worker import received_backlog

pytestmark = pytest.mark.timeout(600)

OLD_VERSION = "0.0.1-contract-1"


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """live: a tiny ensemble with an out-of-distribution score; old: the tiny model written as
    a contract-1 file (format pacs-ai-model/1, no gate, no map) under its own version; gated:
    an ensemble that abstains on every film."""
    from testbed.tiny_models import export_untrained_tiny_ensemble
    from training.export import export_model

    folder = tmp_path_factory.mktemp("shadow-models")
    tiny = PneumoniaModel.load(tiny_model)
    metadata = dict(tiny.info.metadata, format="pacs-ai-model/1", version=OLD_VERSION)
    return {"live": export_untrained_tiny_ensemble(folder / "live.pt", ood_threshold=1e9),
            "old": export_model(torch_module_copy(tiny), folder / "old.pt", metadata),
            "gated": export_untrained_tiny_ensemble(folder / "gated.pt", ood_threshold=1e-9)}


def worker_with_shadow(spool, store, live: PneumoniaModel, shadow: ShadowRunner,
                       stop: threading.Event) -> ClassificationWorker:
    config = dataclasses.replace(default_config(spool.root.parent),
                                 workers=WorkersConfig(processes=0, batch_size=3))
    return ClassificationWorker("worker-test", config, spool, store, live, stop,
                                threading.Event(), lambda job: None, HelperPool(0),
                                shadow=shadow)


def run_backlog(tmp_path, live: PneumoniaModel, shadow_model: PneumoniaModel, films: int = 6,
                adjust=None):
    """Films received (`adjust`: received_backlog's), then a worker with a shadow until every
    job is settled and every film has its shadow row; returns the store."""
    spool, store = received_backlog(tmp_path, films, adjust=adjust)
    stop = threading.Event()
    shadow = ShadowRunner(shadow_model, live, store)
    worker = worker_with_shadow(spool, store, live, shadow, stop)
    shadow.start()
    worker.start()
    try:
        settled = wait_until(lambda: store.job_counts()["pending"] == 0
                             and store.job_counts()["classifying"] == 0, 120)
        assert settled, store.job_counts()
    finally:
        stop.set()
        worker.join(timeout=30)
        shadow.finish()
        shadow.join(timeout=30)
    assert not worker.is_alive() and not shadow.is_alive()
    return spool, store


def test_the_shadow_assesses_what_the_live_model_assesses_and_reports_nothing(tmp_path, models):
    live = PneumoniaModel.load(models["live"])
    # the live model abstains on about half of these films: its threshold at their median score
    spool, store = received_backlog(tmp_path / "probe", 6)
    inputs = np.stack([prepare(spool.resolve(job.image_file), FilterPolicy(),
                               DEFAULT_MAX_PIXELS).model_input for job in all_jobs(store)])
    store.close()
    scores = live.assess(inputs)[1]
    live.info = dataclasses.replace(live.info, ood_threshold=float(np.median(scores)))
    old = PneumoniaModel.load(models["old"])
    assert old.info.metadata["format"] == "pacs-ai-model/1" and not old.has_saliency

    def counted(result: str) -> float:
        return metrics.REGISTRY.get_sample_value("pacs_ai_model_results_total", {
            "name": "tiny-test-model", "version": OLD_VERSION, "role": "shadow",
            "result": result}) or 0.0
    before = {result: counted(result) for result in ("pneumonia", "normal", "abstained")}

    spool, store = run_backlog(tmp_path, live, old)
    jobs = {job.id: job for job in all_jobs(store)}
    results = {result.job_id: result for result in store.shadow_results()}
    assert set(results) == set(jobs)  # every film the live model assessed, once
    reported = [job for job in jobs.values() if job.state == JobState.DONE]
    abstained = [job for job in jobs.values() if job.state == JobState.SKIPPED]
    assert reported and abstained, [job.state for job in jobs.values()]
    # only the live model's reports are in the outbox
    assert len(list(spool.outbox.iterdir())) == len(reported)
    assert all(job.model == live.info.label for job in reported)
    for job_id, result in results.items():
        job = jobs[job_id]
        assert result.status == ShadowStatus.ASSESSED and result.reason is None
        assert (result.model_name, result.model_version) == ("tiny-test-model", OLD_VERSION)
        assert result.model_sha256 == file_sha256(models["old"])
        assert result.live_model_sha256 == file_sha256(models["live"])
        assert result.live_threshold == live.info.threshold
        # the live side is what the live model did with the film
        if job.state == JobState.DONE:
            assert result.live.probability == job.probability
            assert (result.live.abstained, result.live.finding) == (False, job.finding)
        else:
            assert job.reason.startswith("out-of-distribution")
            assert result.live.abstained is True and result.live.finding is None
            assert result.live.ood_score > live.info.ood_threshold
        # a contract-1 shadow has no gate: it never abstains and has no score
        assert result.shadow.abstained is False and result.shadow.ood_score is None
        assert result.shadow.finding == ("pneumonia" if result.shadow.probability
                                         >= old.info.threshold else "normal")
        assert result.sop_instance_uid == job.sop_instance_uid
        assert result.received_at == job.received_at
    # counted for the drift watch under its own role
    for outcome in ("pneumonia", "normal"):
        assert counted(outcome) - before[outcome] == sum(
            r.shadow.finding == outcome for r in results.values())
    assert counted("abstained") == before["abstained"]
    # on the same model input as the live model's: the shadow's probabilities are what the old
    # file gives for the films' model input computed here
    fresh = PneumoniaModel.load(models["old"]).predict(inputs)
    by_uid = {result.sop_instance_uid: result.shadow.probability for result in results.values()}
    ordered = [by_uid[job.sop_instance_uid] for job in sorted(jobs.values(), key=lambda j: j.id)]
    assert np.allclose(ordered, fresh, rtol=1e-5, atol=1e-7)
    store.close()


def test_a_gated_shadow_abstains_on_its_own(tmp_path, models):
    live = PneumoniaModel.load(models["live"])
    gated = PneumoniaModel.load(models["gated"])
    spool, store = run_backlog(tmp_path, live, gated, films=3)
    results = store.shadow_results()
    assert len(results) == 3
    assert store.job_counts()["done"] == 3  # the live model reported all three
    for result in results:
        assert result.live.abstained is False and result.live.finding is not None
        assert result.shadow.abstained is True and result.shadow.finding is None
        assert result.shadow.ood_score > gated.info.ood_threshold
        assert 0.0 <= result.shadow.probability <= 1.0  # kept for the comparison
    store.close()


def test_a_busy_shadow_drops_films_and_says_so(tmp_path, models):
    """More films than its queue holds: the worker does not wait; the films the shadow misses
    are recorded as busy, and those it took are assessed."""
    spool, store = received_backlog(tmp_path, 3)
    live = PneumoniaModel.load(models["live"])
    runner = ShadowRunner(PneumoniaModel.load(models["old"]), live, store, queue_films=2)
    job_ids = [job.id for job in all_jobs(store)]
    film = np.random.default_rng(0).random((1, 1, 200, 200), dtype=np.float32)
    seen = Assessment(0.25, None, False, "normal")
    runner.submit(ShadowBatch(job_ids[:2], np.concatenate([film, film]), [seen, seen],
                              [None, None]))
    runner.submit(ShadowBatch(job_ids[2:], film, [seen], [None]))  # the queue is full: not taken
    runner.start()
    runner.finish()
    runner.join(timeout=30)
    statuses = {result.job_id: result for result in store.shadow_results()}
    assert [statuses[i].status for i in job_ids] == ["assessed", "assessed", "busy"]
    busy = statuses[job_ids[2]]
    assert busy.shadow == Assessment(None, None, None, None) and "queue was full" in busy.reason
    assert busy.live == seen  # what the live model did is kept all the same
    store.close()


def test_a_film_assessed_again_replaces_its_row(tmp_path, models):
    spool, store = received_backlog(tmp_path, 1)
    live = PneumoniaModel.load(models["live"])
    film = np.random.default_rng(1).random((1, 1, 200, 200), dtype=np.float32)
    [job] = all_jobs(store)
    for probability in (0.2, 0.7):
        runner = ShadowRunner(PneumoniaModel.load(models["old"]), live, store)
        runner.submit(ShadowBatch([job.id], film, [Assessment(probability, None, False,
                                                              live.finding(probability))],
                                  [None]))
        runner.start()
        runner.finish()
        runner.join(timeout=30)
    [result] = store.shadow_results()
    assert result.live.probability == 0.7
    store.close()


# --- the shadow model's own intended age range -------------------------------------------------

# Patient's Age of each film received: in the shadow's 1-5 range, outside it (both in the live
# model's 0-10), no usable age, and outside both (the live model skips it)
AGED_FILMS = ("003Y", "008Y", "004Y", None, "006M", "012Y")


def give_age(index: int, dataset: pydicom.Dataset) -> None:
    """Film `index` gets AGED_FILMS[index] as its only age (None: no age at all)."""
    del dataset.PatientBirthDate
    if AGED_FILMS[index] is not None:
        dataset.PatientAge = AGED_FILMS[index]


def aged_models(folder: Path) -> tuple[Path, Path]:
    """live: the tiny model for 0-10 years at threshold 1 (normal, nearly always); shadow: the
    same network for 1-5 years at threshold 0 (pneumonia, always). Every film both assess is a
    normal -> pneumonia flip, so a film counted that should not be shows in the figures."""
    from testbed.tiny_models import export_untrained_tiny_model

    return (export_untrained_tiny_model(folder / "live-0-10.pt", threshold=1.0,
                                        intended_use={"age_years": [0, 10]}),
            export_untrained_tiny_model(folder / "candidate-1-5.pt", threshold=0.0,
                                        intended_use={"age_years": [1, 5]}))


def run_aged_backlog(tmp_path: Path):
    """AGED_FILMS through a worker with the aged models: (spool, store, live file, shadow
    file)."""
    live_path, shadow_path = aged_models(tmp_path)
    live, shadow = PneumoniaModel.load(live_path), PneumoniaModel.load(shadow_path)
    spool, store = run_backlog(tmp_path, live, shadow, films=len(AGED_FILMS), adjust=give_age)
    return spool, store, live_path, shadow_path


def test_a_film_outside_the_shadows_own_age_range_is_recorded_not_assessed(tmp_path):
    """The shadow (1-5 years) beside a live model for 0-10 years: a film of 8 years or 6 months
    gets no shadow assessment, `outside-intended-age` with the age and the range; a film of 3
    or 4 years, and one without an age, are assessed; a film of 12 years never reaches it."""
    def not_assessed() -> float:
        return metrics.REGISTRY.get_sample_value("pacs_ai_shadow_not_assessed_total",
                                                 {"reason": "outside-intended-age"}) or 0.0
    before = not_assessed()
    spool, store, live_path, shadow_path = run_aged_backlog(tmp_path)
    jobs = sorted(all_jobs(store), key=lambda job: job.id)
    by_age = dict(zip(AGED_FILMS, jobs))
    assert by_age["012Y"].state == JobState.SKIPPED
    assert by_age["012Y"].reason.startswith("outside-intended-age: 12 years")
    assert all(job.state == JobState.DONE for age, job in by_age.items() if age != "012Y")
    results = {result.job_id: result for result in store.shadow_results()}
    assert by_age["012Y"].id not in results  # the live model skipped it: the shadow never saw it
    assert len(results) == 5
    for age in ("003Y", "004Y", None):
        result = results[by_age[age].id]
        assert result.status == ShadowStatus.ASSESSED and result.reason is None
        assert result.shadow.finding == "pneumonia" and 0.0 <= result.shadow.probability <= 1.0
    for age, text in (("008Y", "8 years"), ("006M", "6 months")):
        result = results[by_age[age].id]
        assert result.status == ShadowStatus.OUTSIDE_INTENDED_AGE
        assert result.reason == f"outside-intended-age: {text}; the model is for 1-5"
        # no assessment at all: nothing that could be counted as a finding
        assert result.shadow == Assessment(None, None, None, None)
        # what the live model made of it is kept
        assert result.live.finding == by_age[age].finding and result.live.probability is not None
    assert not_assessed() - before == 2
    store.close()


def test_a_shadow_without_an_age_range_assesses_every_film_it_gets(tmp_path, models):
    """The age check is the shadow file's own: a file that states no range takes all ages."""
    live_path, _ = aged_models(tmp_path)
    live = PneumoniaModel.load(live_path)
    old = PneumoniaModel.load(models["old"])
    assert old.info.intended_age_years is None
    spool, store = run_backlog(tmp_path, live, old, films=len(AGED_FILMS), adjust=give_age)
    statuses = [result.status for result in store.shadow_results()]
    assert statuses == [ShadowStatus.ASSESSED] * 5
    store.close()


def test_start_up_names_both_ranges_once_where_they_differ(tmp_path):
    import structlog

    from pacs_ai.classify.shadow import log_shadow_model
    from pacs_ai.config import ShadowConfig

    _, shadow_path = aged_models(tmp_path)
    shadow = PneumoniaModel.load(shadow_path)
    with structlog.testing.capture_logs() as logs:
        log_shadow_model(shadow, ShadowConfig(model=shadow_path), (0.0, 10.0))
        log_shadow_model(shadow, ShadowConfig(model=shadow_path), None)
        log_shadow_model(shadow, ShadowConfig(model=shadow_path), (1.0, 5.0))
    differs = [event for event in logs if event["event"] == "shadow_age_range_differs"]
    assert [(e["shadow_age_years"], e["live_age_years"]) for e in differs] == [
        ("1-5", "0-10"), ("1-5", "every age")]
    assert [e["intended_age_years"] for e in logs if e["event"] == "shadow_model"] == ["1-5"] * 3


# --- the config ------------------------------------------------------------------------------

def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pacs-ai.toml"
    path.write_text(text)
    return path


def test_shadow_config_and_its_bound_threshold(tmp_path, models):
    old = PneumoniaModel.load(models["old"])
    config = load_config(write(tmp_path, f'[shadow]\nmodel = "{models["old"]}"\nthreshold = 0.2\n'
                                         f'threshold_model_version = "{OLD_VERSION}"\n'
                                         f'threshold_model_sha256 = "{old.sha256}"\n'))
    shadow = load_shadow_model(config)
    assert shadow.info.threshold == 0.2 and shadow.info.version == OLD_VERSION
    assert load_shadow_model(load_config(write(tmp_path, "[model]\n"))) is None
    # a shadow threshold chosen for another file stops start-up like [model]'s
    live = PneumoniaModel.load(models["live"])
    config = load_config(write(tmp_path, f'[shadow]\nmodel = "{models["old"]}"\nthreshold = 0.2\n'
                                         'threshold_model_version = "0.0.0-test"\n'
                                         f'threshold_model_sha256 = "{live.sha256}"\n'))
    with pytest.raises(UserError) as error:
        load_shadow_model(config)
    assert str(error.value).startswith("[shadow] threshold 0.2 was chosen for model version "
                                       "0.0.0-test")
    assert f"the model file is tiny-test-model {OLD_VERSION}" in str(error.value)


def test_a_shadow_ood_threshold_is_bound_like_models(tmp_path, models):
    """[shadow] ood_threshold is a threshold on the shadow file's score: refused for another
    file, or when it says none; used with the file it was chosen for."""
    old, live = PneumoniaModel.load(models["old"]), PneumoniaModel.load(models["live"])
    table = f'[shadow]\nmodel = "{models["live"]}"\nood_threshold = 50\n'
    with pytest.raises(UserError) as error:
        load_shadow_model(load_config(write(tmp_path, table)))
    assert str(error.value).startswith("[shadow] ood_threshold 50 does not say which model file")
    with pytest.raises(UserError) as error:
        load_shadow_model(load_config(write(tmp_path, table + 'threshold_model_version = "x"\n'
                                            f'threshold_model_sha256 = "{old.sha256}"\n')))
    assert str(error.value).startswith("[shadow] ood_threshold 50 was chosen for model version x")
    shadow = load_shadow_model(load_config(write(
        tmp_path, table + f'threshold_model_version = "{live.info.version}"\n'
                          f'threshold_model_sha256 = "{live.sha256}"\n')))
    assert shadow.info.ood_threshold == 50 and shadow.info.threshold == live.info.threshold


def test_a_shadow_ood_threshold_for_a_file_without_a_score_names_the_shadow_table(
        tmp_path, models):
    """The error names the table the key is in: an admin editing [model] for it would look in
    the wrong place."""
    old = PneumoniaModel.load(models["old"])  # contract 1: no out-of-distribution score
    config = load_config(write(tmp_path, f'[shadow]\nmodel = "{models["old"]}"\n'
                                         f'ood_threshold = 50\n'
                                         f'threshold_model_version = "{OLD_VERSION}"\n'
                                         f'threshold_model_sha256 = "{old.sha256}"\n'))
    with pytest.raises(UserError) as error:
        load_shadow_model(config)
    assert str(error.value).startswith("[shadow] ood_threshold is set, but the model file has "
                                       "no out-of-distribution score")


def test_the_model_command_shows_the_shadow_and_checks_its_threshold(tmp_path, models):
    old = PneumoniaModel.load(models["old"])
    config = write(tmp_path, f'[model]\npath = "{models["live"]}"\n[shadow]\nmodel = '
                             f'"{models["old"]}"\nthreshold = 0.2\n'
                             f'threshold_model_version = "{OLD_VERSION}"\n'
                             f'threshold_model_sha256 = "{old.sha256}"\n')
    result = pacs_ai_cli("model", "--config", str(config))
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("shadow:")]
    assert f"tiny-test-model {OLD_VERSION} ({models['old']}, sha256 {old.sha256})" in line
    assert "threshold 0.2000 ([shadow] threshold)" in line
    assert line.endswith("assesses every film the live model assesses, reports none")
    # the same lines under a shadow of another file: refused as the service would
    config.write_text(config.read_text().replace(str(models["old"]), str(models["gated"])))
    refused = pacs_ai_cli("model", "--config", str(config))
    assert refused.returncode == 2 and "[shadow] threshold 0.2 was chosen for" in refused.stderr


def test_the_model_command_names_the_shadows_own_age_range(tmp_path):
    live_path, shadow_path = aged_models(tmp_path)
    config = write(tmp_path, f'[model]\npath = "{live_path}"\n[shadow]\nmodel = "{shadow_path}"\n')
    result = pacs_ai_cli("model", "--config", str(config))
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("shadow:")]
    assert ("intended for 1-5 years: assesses the films the live model assesses within that "
            "range (others recorded outside-intended-age), reports none") in line


@pytest.mark.parametrize("text, message", [
    ("[shadow]\nthreshold = 0.3\nthreshold_for_any_model = true\n",
     "[shadow] threshold: is set but model is not"),
    ('[shadow]\nmodel = "missing.pt"\n', "[shadow] model: file not found"),
    ("[shadow]\nmodle = 1\n", "[shadow]: unknown key 'modle'"),
])
def test_bad_shadow_tables_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    assert message in str(error.value)


# --- real peers: storescu -> pacs-ai serve (with a shadow) -> Orthanc ----------------------------

MANIFEST = json.loads((SAMPLE_DICOMS / "manifest.json").read_text())["files"]
OK_SAMPLES = [entry for entry in MANIFEST if entry["expected_status"] == "ok"]


def shadow_rows(spool_dir: Path) -> list[dict]:
    """shadow_results through a read-only connection while the service runs."""
    import sqlite3

    connection = sqlite3.connect(f"file:{spool_dir / 'jobs.sqlite'}?mode=ro", uri=True,
                                 timeout=30)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in connection.execute(
            "SELECT s.*, j.sop_instance_uid, j.probability AS job_probability, "
            "j.finding AS job_finding, j.state AS job_state FROM shadow_results s "
            "JOIN jobs j ON j.id = s.job_id")]
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        connection.close()


@pytest.mark.real_peer
@pytest.mark.slow
def test_storescu_to_pacs_ai_with_a_shadow_to_orthanc(tmp_path, models):
    """The shipped model live, the contract-1 file in shadow: every sample film gets exactly one
    report at Orthanc, made by the live model; the shadow's results are in the queue, one per
    film, and nowhere else."""
    from pacs_ai.report.report import report_summary
    from testbed.real_peers import (Modality, Orthanc, orthanc_destination, propose_as_stored,
                                    renamed_copy, storescu)

    shipped = PneumoniaModel.load(default_model_path())
    folder = tmp_path / "films"
    folder.mkdir()
    films = [renamed_copy(SAMPLE_DICOMS / entry["file"], folder / f"{index:02d}.dcm")
             for index, entry in enumerate(OK_SAMPLES)]
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in films]
    with Orthanc(tmp_path / "orthanc", modalities=[Modality("PACS_AI", 104)]) as orthanc:
        config = write_service_config(
            tmp_path, model=shipped.path, destinations=[orthanc_destination(orthanc)],
            tables={"shadow": {"model": str(models["old"])},
                    "workers": {"torch_threads": 1}, "log": {"level": "info"}})
        with ServiceProcess(config, tmp_path / "serve.log") as service:
            options = propose_as_stored(films, tmp_path / "as-stored.cfg")
            run = storescu(service.port, films, called_ae="PACS_AI", calling_ae="XRAY_ROOM_1",
                           extra=options)
            assert [status for _, status in run.responses] == ["Success"] * len(films), \
                run.output
            spool = tmp_path / "spool"
            assert wait_until(lambda: len([row for row in shadow_rows(spool)]) == len(films)
                              and all(row["job_state"] == "done" for row in shadow_rows(spool)),
                              300), service.log_path.read_text()[-3000:]

            def reports() -> list[pydicom.Dataset]:
                found = []
                for source in sources:
                    for uid in orthanc.study_sop_instance_uids(str(source.StudyInstanceUID),
                                                               modality="SR"):
                        found.append(pydicom.dcmread(io.BytesIO(
                            orthanc.instance_file(orthanc.find_instance(uid)))))
                return found

            assert wait_until(lambda: len(reports()) >= len(films), 120)
            rows = shadow_rows(spool)
            stored = reports()
            assert service.terminate() == 0
        events = service.events()

    # exactly one report per film, the live model's
    summaries = [report_summary(report) for report in stored]
    assert sorted(s["source_sop_instance_uid"] for s in summaries) == \
        sorted(str(source.SOPInstanceUID) for source in sources)
    assert {(s["algorithm_name"], s["algorithm_version"]) for s in summaries} == \
        {(shipped.info.name, shipped.info.version)}
    # the shadow's results: one per film, assessed, beside the live model's
    assert sorted(row["sop_instance_uid"] for row in rows) == \
        sorted(str(source.SOPInstanceUID) for source in sources)
    for row in rows:
        assert row["status"] == "assessed"
        assert (row["model_version"], row["model_sha256"]) == (OLD_VERSION,
                                                               file_sha256(models["old"]))
        assert (row["live_model_version"], row["live_model_sha256"]) == (
            shipped.info.version, shipped.sha256)
        assert row["live_probability"] == row["job_probability"]
        assert row["live_finding"] == row["job_finding"]
    by_name = {}
    for event in events:
        by_name.setdefault(event["event"], []).append(event)
    [loaded] = by_name["shadow_model"]
    assert loaded["model"] == f"tiny-test-model {OLD_VERSION}"
    assert loaded["format"] == "pacs-ai-model/1"
    assert by_name["service_started"][0]["shadow_model"] == f"tiny-test-model {OLD_VERSION}"
    # nothing was made or sent for the shadow
    assert all(event["model"] == shipped.info.label for event in by_name["instance_classified"])
    assert len(by_name["instance_classified"]) == len(films)
    assert "shadow_model_failed" not in by_name

    # `pacs-ai compare` on what the shadow recorded, with the films' labels as `pacs-ai
    # evaluate` takes them (path,label; matched by the SOP Instance UIDs in the files)
    labels_csv = folder / "labels.csv"
    labels_csv.write_text("path,label\n" + "".join(
        f"{path.name},{entry['class'].lower()}\n" for path, entry in zip(films, OK_SAMPLES)))
    result = pacs_ai_cli("compare", "--config", str(config), "--labels", str(labels_csv),
                         "--json", "--out", str(tmp_path / "compared"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["films"] == len(films) and summary["not_assessed"] == {}
    assert (summary["live"]["version"], summary["shadow"]["version"]) == (shipped.info.version,
                                                                          OLD_VERSION)
    same = sum(row["live_finding"] == row["finding"] for row in rows)  # neither abstains here
    assert summary["agreement"] == pytest.approx(same / len(rows))
    assert summary["flips"]["pneumonia_to_normal"] == sum(
        row["live_finding"] == "pneumonia" and row["finding"] == "normal" for row in rows)
    label_of = {str(source.SOPInstanceUID): entry["class"].lower()
                for source, entry in zip(sources, OK_SAMPLES)}
    labelled = summary["labels"]
    assert labelled["films"] == len(films)
    for side, finding in (("live", "live_finding"), ("shadow", "finding")):
        pneumonia = [row for row in rows if label_of[row["sop_instance_uid"]] == "pneumonia"]
        found = sum(row[finding] == "pneumonia" for row in pneumonia)
        assert labelled[side]["reported"]["sensitivity"] == pytest.approx(found / len(pneumonia))
    assert (tmp_path / "compared" / "scatter.svg").read_text().count("<circle") >= len(films)


def test_the_shadow_thread_runs_at_the_lowest_cpu_priority(tmp_path, models):
    """On a busy machine the shadow yields to the live pipeline (its torch threads inherit
    the thread's nice value on Linux)."""
    spool, store = received_backlog(tmp_path, 1)
    live = PneumoniaModel.load(models["live"])
    runner = ShadowRunner(PneumoniaModel.load(models["old"]), live, store)

    def nice(task: int) -> int:
        stat = Path(f"/proc/self/task/{task}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[16])
    ours = nice(threading.get_native_id())
    runner.start()
    try:
        assert wait_until(lambda: nice(runner.native_id) == 19, 10), nice(runner.native_id)
        assert nice(threading.get_native_id()) == ours  # the rest of the process is as it was
    finally:
        runner.finish()
        runner.join(timeout=30)
        store.close()


def test_the_shadow_waits_while_a_worker_processes_a_batch(tmp_path, models):
    """Under a burst the live reports go first: a batch handed over while a worker is busy is
    assessed only once the workers are idle."""
    from pacs_ai.classify.shadow import LiveActivity

    spool, store = received_backlog(tmp_path, 1)
    [job] = all_jobs(store)
    activity = LiveActivity()
    live = PneumoniaModel.load(models["live"])
    runner = ShadowRunner(PneumoniaModel.load(models["old"]), live, store, activity=activity)
    film = np.random.default_rng(2).random((1, 1, 200, 200), dtype=np.float32)
    runner.start()
    try:
        with activity.busy():  # a worker mid-batch
            runner.submit(ShadowBatch([job.id], film, [Assessment(0.3, None, False, "normal")],
                                      [None]))
            assert not wait_until(lambda: store.shadow_results(), 2.0)
        assert wait_until(lambda: store.shadow_results(), 10.0)
    finally:
        runner.finish()
        runner.join(timeout=30)
    [result] = store.shadow_results()
    assert result.status == "assessed"
    store.close()
