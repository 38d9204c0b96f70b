"""The durable job queue and the spool's durable writes (real SQLite files, real folders)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from pacs_ai.errors import UserError
from pacs_ai.finding import Finding
from pacs_ai.queue.job_records import (DeliveryObject, DeliveryState, JobState, NewInstance, Stage,
                                       accepts_resend, retry_can_fix)
from pacs_ai.queue.jobs import JobStore
from pacs_ai.queue.spool import Spool, SpoolFullError, uid_filename
from testbed.job_queue import all_jobs


def instance(uid: str) -> NewInstance:
    return NewInstance(sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                       study_instance_uid="1.2.3", calling_ae_title="MODALITY")


@pytest.fixture
def spool(tmp_path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    return spool


@pytest.fixture
def store(spool) -> JobStore:
    store = JobStore.open(spool.db_path)
    yield store
    store.close()


def admit(store: JobStore, spool: Spool, uid: str, data: bytes = b"dicom") -> bool:
    def place() -> str:
        target = spool.image_path(uid)
        spool.write_durably(target, data)
        return spool.relative(target)
    return store.admit(instance(uid), place)


def test_queue_uses_wal_and_full_sync(store):
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_same_instance_twice_is_one_job_and_the_file_is_not_rewritten(store, spool):
    assert admit(store, spool, "1.2.3.4", b"first")
    assert not admit(store, spool, "1.2.3.4", b"second")
    assert store.job_counts()["pending"] == 1
    assert spool.image_path("1.2.3.4").read_bytes() == b"first"
    assert list(spool.incoming.iterdir()) == []


def test_concurrent_admissions_of_one_instance_make_one_job(store, spool):
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(admit(store, spool, "9.9")))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(results) == [False] * 7 + [True]
    assert len(all_jobs(store)) == 1


def test_job_life_to_done_with_two_destinations(store, spool):
    admit(store, spool, "1.1")
    [job] = store.claim(10)
    assert job.state == "pending" and store.job_counts()["classifying"] == 1
    assert store.claim(10) == []  # claimed jobs are not handed out twice
    state = store.mark_reported(job.id, probability=0.8, finding="pneumonia", report_uid="2.25.1",
                                report_file="outbox/2.25.1.dcm", classify_ms=12.0,
                                destinations=["a", "b"])
    assert state == "delivering"
    now = time.time()
    assert [d.destination for d in store.due_deliveries("a", now, 10)] == ["a"]
    assert store.delivery_succeeded(job.id, "a") is None  # b still open
    finished = store.delivery_succeeded(job.id, "b")
    assert finished is not None and finished.state == "done"
    assert finished.probability == 0.8 and finished.report_uid == "2.25.1"
    assert store.delivery_counts() == {"a": {"pending": 0, "done": 1, "failed": 0},
                                       "b": {"pending": 0, "done": 1, "failed": 0}}


def test_no_destination_means_done_at_once(store, spool):
    admit(store, spool, "1.1")
    [job] = store.claim(1)
    assert store.mark_reported(job.id, probability=0.1, finding="normal", report_uid="2.25.2",
                               report_file="outbox/x.dcm", classify_ms=1.0,
                               destinations=[]) == "done"


def test_backoff_schedule_failure_and_retry(store, spool):
    admit(store, spool, "1.1")
    [job] = store.claim(1)
    store.mark_reported(job.id, probability=0.5, finding="pneumonia", report_uid="2.25.3",
                        report_file="outbox/y.dcm", classify_ms=1.0, destinations=["pacs"])
    later = time.time() + 100
    assert store.delivery_failed(job.id, "pacs", "connection refused", retry_at=later) is None
    assert store.due_deliveries("pacs", time.time(), 10) == []
    assert store.next_attempt_at("pacs") == pytest.approx(later)
    [(report_uid, name, attempts, _, error)] = store.retrying_deliveries()
    assert (report_uid, name, attempts, error) == ("2.25.3", "pacs", 1, "connection refused")
    settled = store.delivery_failed(job.id, "pacs", "association rejected", retry_at=None)
    assert settled.state == "failed" and settled.stage == "deliver"
    assert "pacs" in settled.reason and "association rejected" in settled.reason
    assert [j.id for j in store.latest_failures()] == [job.id]

    assert store.requeue_failed() == (1, 1)
    [delivery] = store.due_deliveries("pacs", time.time(), 10)
    assert delivery.attempts == 0 and delivery.report_uid == "2.25.3"
    assert store.job_counts()["delivering"] == 1


def test_a_destination_seen_working_releases_only_deliveries_it_could_not_be_reached_for(
        store, spool):
    """Issue 23 item 6: deliveries waiting out a backoff because the PACS could not be reached
    are due at once when it is seen working; one it refused keeps its backoff, and another
    destination's are left alone."""
    from pacs_ai.deliver.transport import unreachable

    errors = {"1.1": "connection-failed: PACS@pacs:104", "1.2": "association-lost",
              "1.3": "tls-certificate: unknown CA (PACS@pacs:104)",
              "1.4": "refused: status 0xA700 (out of resources)"}
    later = time.time() + 600
    wake = threading.Event()
    store.notify_on_work(wake)
    for index, (uid, error) in enumerate(errors.items()):
        admit(store, spool, uid)
        [job] = store.claim(1)
        store.mark_reported(job.id, probability=0.5, finding="pneumonia",
                            report_uid=f"2.25.{index}", report_file=f"outbox/{index}.dcm",
                            classify_ms=1.0, destinations=["pacs", "other"])
        store.delivery_failed(job.id, "pacs", error, retry_at=later)
        store.delivery_failed(job.id, "other", "connection-failed: OTHER@other:104",
                              retry_at=later)
    wake.clear()
    assert store.release_waiting("pacs", unreachable) == 3
    assert wake.is_set()  # the senders look at once
    due = store.due_deliveries("pacs", time.time(), 10)
    assert sorted(d.sop_instance_uid for d in due) == ["1.1", "1.2", "1.3"]
    assert store.next_attempt_at("pacs") <= time.time()
    assert store.due_deliveries("other", time.time(), 10) == []
    assert store.release_waiting("pacs", unreachable) == 0  # nothing left waiting for it


def test_failed_classification_is_requeued_as_pending(store, spool):
    admit(store, spool, "1.1")
    admit(store, spool, "1.2")
    first, second = store.claim(2)
    store.mark_failed(first.id, "classify", "decode-failed: truncated")
    store.mark_skipped(second.id, "not-chest: body part is KNEE")
    assert store.requeue_failed() == (1, 0)
    counts = store.job_counts()
    assert counts["pending"] == 1 and counts["skipped"] == 1  # skips are final


def test_requeue_puts_only_still_classifying_jobs_back_and_wakes_workers(store, spool):
    for n in range(3):
        admit(store, spool, f"1.{n}")
    reported, interrupted, untouched = store.claim(3)
    store.mark_reported(reported.id, probability=0.9, finding="pneumonia", report_uid="2.1",
                        report_file="outbox/2.1.dcm", classify_ms=1.0, destinations=["PACS"])
    store.mark_failed(untouched.id, "classify", "decode-failed: truncated")
    wake = threading.Event()
    store.notify_on_work(wake)
    assert store.requeue([reported.id, interrupted.id, untouched.id]) == 1
    assert wake.is_set()
    assert store.find("1.0").state == "delivering"
    assert store.find("1.1").state == "pending"
    assert store.find("1.2").state == "failed"
    assert [job.id for job in store.claim(10)] == [interrupted.id]
    assert store.requeue([]) == 0


def test_a_full_database_fails_the_write_and_leaves_the_store_usable(store, spool):
    """SQLITE_FULL for real (the file capped with max_page_count): the write raises, nothing is
    left mid-transaction, and writes work again once there is room."""
    from pacs_ai.classify.worker import is_temporary_storage_error
    admit(store, spool, "1.0")
    (job,) = store.claim(1)
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(Exception) as full:
        store.mark_reported(job.id, probability=0.5, finding="normal", report_uid="2.9",
                            report_file="outbox/" + "x" * 20000, classify_ms=1.0,
                            destinations=["PACS"])
    assert is_temporary_storage_error(full.value), full.value
    assert not store._db.in_transaction
    assert store.find("1.0").state == "classifying"
    store._db.execute("PRAGMA max_page_count = 1073741823")
    assert store.requeue([job.id]) == 1
    assert store.find("1.0").state == "pending"


def test_interrupted_jobs_go_back_to_pending_after_a_crash(spool):
    """A real second process claims jobs and is killed mid-classification."""
    store = JobStore.open(spool.db_path)
    for n in range(3):
        admit(store, spool, f"1.{n}")
    store.close()
    script = ("import sys, os; from pacs_ai.queue.jobs import JobStore; "
              "s = JobStore.open(sys.argv[1]); s.claim(2); os._exit(9)")
    subprocess.run([sys.executable, "-c", script, str(spool.db_path)], timeout=60)
    reopened = JobStore.open(spool.db_path)
    assert reopened.job_counts()["classifying"] == 2
    assert reopened.reset_interrupted() == 2
    assert reopened.job_counts()["pending"] == 3
    assert len(reopened.claim(10)) == 3
    reopened.close()


def test_deliveries_to_a_removed_destination_are_failed_with_reason(store, spool):
    admit(store, spool, "1.1")
    [job] = store.claim(1)
    store.mark_reported(job.id, probability=0.5, finding="pneumonia", report_uid="2.25.4",
                        report_file="outbox/z.dcm", classify_ms=1.0, destinations=["old", "kept"])
    assert store.abandon_unknown_destinations(["kept"]) == 1
    assert store.delivery_succeeded(job.id, "kept").state == "failed"
    assert "destination-removed" in store.latest_failures()[0].reason
    assert store.abandon_unknown_destinations([]) == 0


def test_the_stored_vocabulary_is_the_one_queues_already_hold(store, spool):
    """Issue 18 item 4: states, stages and delivery objects are enums whose values are the
    strings a queue written before them holds (and `pacs-ai status`, the queue page and the
    metrics show); rows written with those plain strings are read and settled as before."""
    assert [*JobState] == ["pending", "classifying", "delivering", "done", "skipped", "failed"]
    assert [*Stage] == ["classify", "report", "deliver"]
    assert [*DeliveryState] == ["pending", "done", "failed"]
    assert [*DeliveryObject] == ["report", "heatmap"]
    admit(store, spool, "1.1")
    admit(store, spool, "1.2")
    now = time.time()
    with store._lock:  # as an older pacs-ai wrote them: plain strings
        store._db.execute("UPDATE jobs SET state = 'failed', stage = 'deliver', "
                          "report_file = 'outbox/r.dcm' WHERE sop_instance_uid = '1.1'")
        store._db.execute("UPDATE jobs SET state = 'failed', stage = 'classify' "
                          "WHERE sop_instance_uid = '1.2'")
        store._db.execute("INSERT INTO deliveries (job_id, destination, state, next_attempt_at, "
                          "object) SELECT id, 'pacs', 'failed', ?, 'report' FROM jobs "
                          "WHERE sop_instance_uid = '1.1'", (now,))
    delivery_failed, classify_failed = store.find("1.1"), store.find("1.2")
    assert not accepts_resend(delivery_failed) and accepts_resend(classify_failed)
    assert store.job_counts() == {"pending": 0, "classifying": 0, "delivering": 0, "done": 0,
                                  "skipped": 0, "failed": 2}
    assert store.delivery_counts() == {"pacs": {"pending": 0, "done": 0, "failed": 1}}
    assert store.requeue_failed() == (2, 1)
    assert (store.find("1.1").state, store.find("1.2").state) == ("delivering", "pending")
    [due] = store.due_deliveries("pacs", now + 1, 10)
    assert due.object == DeliveryObject.REPORT
    assert store.delivery_succeeded(due.job_id, "pacs").state == JobState.DONE


def test_reported_jobs_keep_whether_their_film_had_an_age(store, spool):
    """Issue 22 item 4: the queue counts classified films by whether the header gave a usable
    patient age; films not classified are not counted."""
    for uid in ("1.1", "1.2", "1.3", "1.4"):
        admit(store, spool, uid)
    jobs = {job.sop_instance_uid: job for job in store.claim(4)}
    store.mark_reported(jobs["1.1"].id, probability=0.9, finding="pneumonia", report_uid="2.1",
                        report_file="outbox/2.1.dcm", classify_ms=5, destinations=[],
                        age_known=True)
    store.mark_reported(jobs["1.2"].id, probability=0.1, finding="normal", report_uid="2.2",
                        report_file="outbox/2.2.dcm", classify_ms=5, destinations=["pacs"],
                        age_known=False)
    store.mark_skipped(jobs["1.3"].id, "unknown-age: no usable patient age in the header")
    store.mark_failed(jobs["1.4"].id, Stage.CLASSIFY, "decode-failed: broken")
    assert store.age_counts() == {"known": 1, "unknown": 1, "not_recorded": 0}
    # read back as the vocabulary's own types, not the plain strings SQLite holds (issue 25)
    reported, failed = store.find("1.1"), store.find("1.4")
    assert type(reported.state) is JobState and type(reported.finding) is Finding
    assert reported.finding is Finding.PNEUMONIA and store.find("1.2").finding is Finding.NORMAL
    assert type(failed.stage) is Stage and failed.stage is Stage.CLASSIFY
    assert (store.find("1.1").age_known, store.find("1.2").age_known) == (True, False)
    assert store.find("1.3").age_known is None


def test_a_queue_from_before_age_counts_opens_and_counts_its_films_as_not_recorded(tmp_path):
    """A queue written by the release before (every column but age_known) keeps working: its
    classified films count as not recorded, new ones are counted, and the column is an
    INTEGER like the rest of the schema says."""
    import sqlite3

    path = tmp_path / "jobs.sqlite"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE jobs (id INTEGER PRIMARY KEY, sop_instance_uid TEXT NOT NULL UNIQUE,
            sop_class_uid TEXT NOT NULL, study_instance_uid TEXT, calling_ae_title TEXT,
            image_file TEXT NOT NULL, state TEXT NOT NULL, stage TEXT, reason TEXT,
            probability REAL, finding TEXT, report_uid TEXT, report_file TEXT, classify_ms REAL,
            received_at REAL NOT NULL, updated_at REAL NOT NULL, peer_address TEXT,
            modality TEXT, station_name TEXT, accession_number TEXT, route TEXT, model TEXT);
        INSERT INTO jobs (sop_instance_uid, sop_class_uid, image_file, state, finding,
            received_at, updated_at, model) VALUES ('1.2.3', '1.2.840.10008.5.1.4.1.1.1', '',
            'done', 'normal', 1, 1, 'pacs-ai-pneumonia 1.2.1');
        PRAGMA user_version = 1;""")
    old.close()
    store = JobStore.open(path)
    try:
        assert store.find("1.2.3").age_known is None
        assert store.age_counts() == {"known": 0, "unknown": 0, "not_recorded": 1}
        store.admit(instance("1.2.4"), lambda: "images/b.dcm")
        [job] = store.claim(1)
        store.mark_reported(job.id, probability=0.2, finding="normal", report_uid="2.9",
                            report_file="outbox/2.9.dcm", classify_ms=1, destinations=[],
                            age_known=False)
        assert store.age_counts() == {"known": 0, "unknown": 1, "not_recorded": 1}
    finally:
        store.close()
    check = sqlite3.connect(path)
    types = {row[1]: row[2] for row in check.execute("PRAGMA table_info(jobs)")}
    check.close()
    assert types["age_known"] == "INTEGER"


def test_status_side_refuses_a_missing_queue(tmp_path):
    with pytest.raises(UserError, match="no job queue"):
        JobStore.open(tmp_path / "none.sqlite", create=False)


def test_spool_write_is_atomic_and_leftovers_are_cleaned(spool):
    target = spool.image_path("1.2.840.1")
    spool.write_durably(target, b"x" * 1000)
    assert target.read_bytes() == b"x" * 1000
    (spool.incoming / "crashed.part").write_bytes(b"half")
    spool.prepare()
    assert list(spool.incoming.iterdir()) == []


def test_free_space_floor(spool):
    spool.check_room(10, 0)
    with pytest.raises(SpoolFullError):
        spool.check_room(10, spool.free_bytes() + 1)


def test_hostile_uid_never_becomes_a_path():
    assert uid_filename("1.2.840.10008.1") == "1.2.840.10008.1.dcm"
    for hostile in ("../../etc/passwd", "1.2/3", "", "1." * 40):
        name = uid_filename(hostile)
        assert "/" not in name and name.startswith("x") and name.endswith(".dcm")


def test_second_server_on_one_spool_is_refused(spool):
    spool.lock()
    other = Spool(spool.root)
    with pytest.raises(UserError, match="another pacs-ai serve"):
        other.lock()
    spool.unlock()
    other.lock()
    other.unlock()


def report(store: JobStore, job, report_uid: str) -> str:
    """Mark a claimed job reported, with one delivery to "PACS"."""
    return store.mark_reported(job.id, probability=0.9, finding="pneumonia", report_uid=report_uid,
                               report_file=f"outbox/{report_uid}.dcm", classify_ms=1.0,
                               destinations=["PACS"])


def test_only_claimed_jobs_can_be_failed_or_skipped(store, spool):
    """A batch that breaks after reporting some of its jobs fails only the unreported ones."""
    admit(store, spool, "1.1")
    admit(store, spool, "1.2")
    reported, unreported = store.claim(2)
    report(store, reported, "2.9")
    assert store.mark_failed(reported.id, "classify", "internal-error: boom") is False
    assert store.mark_skipped(reported.id, "not-chest") is False
    assert store.mark_failed(unreported.id, "classify", "internal-error: boom") is True
    assert store.find("1.1").state == "delivering"
    assert store.find("1.2").state == "failed"
    assert store.mark_failed(unreported.id, "classify", "again") is False
    assert store.find("1.2").reason == "internal-error: boom"


def test_a_resent_image_retries_a_job_that_failed_before_its_report(store, spool):
    assert admit(store, spool, "1.5", b"broken")
    [job] = store.claim(1)
    store.mark_failed(job.id, "classify", "truncated-pixel-data: 10 of 100 bytes")
    assert admit(store, spool, "1.5", b"whole")  # the modality sends it again
    again = store.find("1.5")
    assert again.id == job.id and again.state == "pending" and again.reason is None
    assert spool.resolve(again.image_file).read_bytes() == b"whole"
    assert [j.id for j in store.claim(1)] == [job.id]


def test_a_resent_image_leaves_reported_and_delivery_failed_jobs_alone(store, spool):
    admit(store, spool, "1.6")
    admit(store, spool, "1.7")
    reported, undeliverable = store.claim(2)
    report(store, reported, "2.6")
    report(store, undeliverable, "2.7")
    store.delivery_failed(undeliverable.id, "PACS", "association rejected", retry_at=None)
    assert store.find("1.7").state == "failed" and store.find("1.7").stage == "deliver"
    assert not admit(store, spool, "1.6", b"again")
    assert not admit(store, spool, "1.7", b"again")
    assert store.find("1.6").state == "delivering" and store.find("1.7").state == "failed"


def test_a_resent_image_redelivers_only_the_failed_deliveries_of_its_report(store, spool):
    admit(store, spool, "1.1")
    [job] = store.claim(1)
    store.mark_reported(job.id, probability=0.5, finding="pneumonia", report_uid="2.25.7",
                        report_file="outbox/2.25.7.dcm", classify_ms=1.0,
                        destinations=["down", "up"])
    store.delivery_succeeded(job.id, "up")
    assert store.redeliver(job.id) == 0  # still delivering: nothing to do
    settled = store.delivery_failed(job.id, "down", "refused: status 0xA700", retry_at=None)
    assert settled.state == "failed" and settled.stage == "deliver"
    wake = threading.Event()
    store.notify_on_work(wake)
    assert store.redeliver(job.id) == 1
    assert wake.is_set()
    assert store.find("1.1").state == "delivering"
    [again] = store.due_deliveries("down", time.time(), 10)
    assert again.attempts == 0
    assert store.due_deliveries("up", time.time(), 10) == []  # delivered once is enough
    assert store.redeliver(job.id) == 0


def test_delivery_counts_keep_reports_and_heat_map_images_apart(store, spool):
    """`pacs-ai status` counts reports per film; a film's heat-map image is a delivery of its
    own, counted apart."""
    admit(store, spool, "1.1")
    [job] = store.claim(10)
    store.mark_reported(job.id, probability=0.9, finding="pneumonia", report_uid="2.25.1",
                        report_file="outbox/2.25.1.dcm", classify_ms=12.0, destinations=["a"],
                        heatmap_uid="2.25.2", heatmap_file="outbox/2.25.2.dcm")
    one_pending = {"a": {"pending": 1, "done": 0, "failed": 0}}
    assert store.delivery_counts(DeliveryObject.REPORT) == one_pending
    assert store.delivery_counts(DeliveryObject.HEATMAP) == one_pending
    assert store.delivery_counts() == {"a": {"pending": 2, "done": 0, "failed": 0}}


def test_dismissed_failures_stay_failed_and_retry_passes_them_over(store, spool):
    """Issue 23 item 3: an admin dismisses failures no retry can fix. Each job keeps its
    state and reason, no longer counts among the failures that call for an admin
    (failures_since), and `pacs-ai retry` leaves it; a re-send of its image runs it again."""
    for uid in ("1.1", "1.2", "1.3"):
        admit(store, spool, uid)
    oversize, garbage, undelivered = store.claim(3)
    store.mark_failed(oversize.id, Stage.CLASSIFY, "too-large: 60000 x 60000 pixels")
    store.mark_failed(garbage.id, Stage.CLASSIFY, "decode-failed: not a JPEG-LS stream")
    report(store, undelivered, "2.3")
    store.delivery_failed(undelivered.id, "PACS", "connection-failed: PACS", retry_at=None)
    assert store.failures_since(0) == {("classify", "too-large"): 1,
                                       ("classify", "decode-failed"): 1,
                                       ("deliver", "delivery to PACS failed"): 1}

    assert store.dismiss(["1.3", "9.9.9", "12345"]) == ([], ["9.9.9", "12345"])
    assert store.find("1.3").dismissed_at is None  # a mistyped key changes nothing
    dismissed, unknown = store.dismiss(["1.1", str(garbage.id)])  # UID or job number
    assert [job.id for job in dismissed] == [oversize.id, garbage.id] and unknown == []
    assert store.dismiss(["1.1"]) == ([], [])  # once is enough
    kept = store.find("1.1")
    assert (kept.state, kept.stage, kept.reason) == ("failed", "classify",
                                                     "too-large: 60000 x 60000 pixels")
    assert kept.dismissed_at == dismissed[0].dismissed_at and \
        abs(kept.dismissed_at - time.time()) < 60
    assert store.failures_since(0) == {("deliver", "delivery to PACS failed"): 1}
    assert store.dismissed_count() == 2 and store.job_counts()["failed"] == 3

    assert store.requeue_failed() == (1, 1)  # the delivery only
    assert [store.find(uid).state for uid in ("1.1", "1.2", "1.3")] == \
        ["failed", "failed", "delivering"]
    assert admit(store, spool, "1.1", b"corrected")  # the modality sends a good copy
    again = store.find("1.1")
    assert (again.state, again.reason, again.dismissed_at) == ("pending", None, None)
    assert store.dismissed_count() == 1


def test_dismiss_all_takes_every_failed_job_not_dismissed_yet(store, spool):
    for uid in ("1.1", "1.2", "1.3"):
        admit(store, spool, uid)
    first, second, running = store.claim(3)
    store.mark_failed(first.id, Stage.CLASSIFY, "decode-failed: x")
    store.dismiss([first.sop_instance_uid])
    store.mark_failed(second.id, Stage.REPORT, "report-failed: y")
    dismissed, unknown = store.dismiss()
    assert [job.id for job in dismissed] == [second.id] and unknown == []
    assert store.dismiss([running.sop_instance_uid]) == ([], [running.sop_instance_uid])
    assert store.find("1.3").state == "classifying"


def test_a_job_named_twice_is_dismissed_once(store, spool):
    """`pacs-ai dismiss 1 1`, or a job's number and its UID: one job dismissed, listed once
    (was: listed twice and counted as 2 dismissed)."""
    admit(store, spool, "1.1")
    [job] = store.claim(1)
    store.mark_failed(job.id, Stage.CLASSIFY, "decode-failed: x")
    dismissed, unknown = store.dismiss([str(job.id), "1.1", str(job.id)])
    assert [entry.id for entry in dismissed] == [job.id] and unknown == []
    assert store.dismissed_count() == 1


@pytest.mark.parametrize("stage, code, fixable", [
    ("classify", "too-large", False), ("classify", "decode-failed", False),
    ("classify", "truncated-pixel-data", False), ("classify", "bad-pixel-header", False),
    ("classify", "model-failed", True), ("classify", "internal-error", True),
    ("classify", "unreadable", True), ("report", "report-failed", True),
    ("deliver", "delivery to PACS failed", True)])
def test_retry_can_fix_what_is_not_in_the_image(stage, code, fixable):
    assert retry_can_fix(stage, code) is fixable


def test_a_queue_from_before_dismissals_gets_the_column(spool):
    """An older pacs-ai's queue has no dismissed_at; opening adds it as REAL, so the time
    reads back as a number."""
    import sqlite3

    JobStore.open(spool.db_path).close()
    connection = sqlite3.connect(spool.db_path)
    connection.execute("ALTER TABLE jobs DROP COLUMN dismissed_at")
    connection.close()
    store = JobStore.open(spool.db_path)
    try:
        admit(store, spool, "1.1")
        [job] = store.claim(1)
        store.mark_failed(job.id, Stage.CLASSIFY, "too-large: 1 x 1")
        [dismissed], _ = store.dismiss()
        assert isinstance(store.find("1.1").dismissed_at, float)
        assert store._db.execute("SELECT typeof(dismissed_at) FROM jobs").fetchone()[0] == \
            "real"
    finally:
        store.close()


def test_the_heat_map_image_goes_only_to_the_destinations_that_take_images(store, spool):
    """An HL7 or FHIR destination gets a result message made from the report, not the image:
    its only delivery is the report's, and the job is done once the report is delivered."""
    admit(store, spool, "1.1")
    [job] = store.claim(10)
    store.mark_reported(job.id, probability=0.9, finding="pneumonia", report_uid="2.25.1",
                        report_file="outbox/2.25.1.dcm", classify_ms=12.0,
                        destinations=["pacs", "ris"], heatmap_uid="2.25.2",
                        heatmap_file="outbox/2.25.2.dcm", image_destinations=["pacs"])
    assert store.delivery_counts(DeliveryObject.HEATMAP) == {
        "pacs": {"pending": 1, "done": 0, "failed": 0}}
    assert [d.object for d in store.due_deliveries("ris", time.time(), 10)] == ["report"]
    assert store.delivery_succeeded(job.id, "ris") is None  # the PACS's two still open
    store.delivery_succeeded(job.id, "pacs", DeliveryObject.HEATMAP)
    assert store.delivery_succeeded(job.id, "pacs").state == "done"
