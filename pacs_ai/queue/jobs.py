"""The durable job queue: one SQLite file in the spool (WAL, synchronous=FULL).

A job is one received instance. Its life:
    pending -> classifying -> delivering -> done
                           -> done        (no destination configured)
                           -> skipped     (not a film the model was made for; reason kept)
                           -> failed      (cannot decode, cannot build the report, or a
                                           delivery gave up; reason kept, `pacs-ai retry` requeues,
                                           `pacs-ai dismiss` settles one no retry can fix)
Each job that has a report gets one delivery row per destination and object: the report, and
its heat-map image where one was made (pacs_ai.report.heatmap_image); each goes
    pending (attempts, next_attempt_at) -> done | failed
on its own, so a PACS that refuses the image still stores the report. Both files are in the
outbox before the job is marked reported, in one transaction with both rows.

Jobs left in `classifying` by a crash go back to `pending` at start-up; a job's report UID is
deterministic, so doing it again yields the same report. One SOP Instance UID is one job,
whatever the number of times it is received.

The store is shared by the threads of one process through one connection guarded by a lock;
other processes (`pacs-ai status`, `pacs-ai retry`) open their own connection.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pacs_ai.errors import UserError
from pacs_ai.queue.job_records import (ABSTAINED_REASON_CODE, JOB_COLUMNS, Delivery, DeliveryObject,
                                       DeliveryState, DestinationDeliveries, Job, JobState,
                                       NewInstance, PurgedJob, Stage, accepts_resend)
from pacs_ai.queue.schema import prepare_schema
from pacs_ai.queue.shadow_records import (SHADOW_COLUMNS, ShadowResult, shadow_result_from_row,
                                          shadow_row)


class JobStore:
    def __init__(self, connection: sqlite3.Connection, path: Path):
        self._db = connection
        self.path = path
        self._lock = threading.RLock()
        # Events set whenever there may be new work for the workers or senders; they also
        # poll, so a `pacs-ai retry` from another process is picked up without them.
        self._work_listeners: list[threading.Event] = []

    @classmethod
    def open(cls, path: str | Path, *, create: bool = True, durable: bool = True) -> "JobStore":
        """`durable` False: this connection's commits are not fsynced (SQLite's synchronous
        NORMAL in WAL mode: a power cut may lose its latest ones, never corrupt the queue); for
        what may be lost, the shadow model's results (pacs_ai.classify.shadow), never jobs."""
        path = Path(path)
        if not create and not path.is_file():
            raise UserError(f"no job queue at {path}: the service has not run with this spool "
                            "yet (check [storage] spool_dir and --config)")
        try:
            connection = sqlite3.connect(path, timeout=30, isolation_level=None,
                                         check_same_thread=False)
            connection.execute("PRAGMA busy_timeout = 30000")
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            connection.execute("PRAGMA foreign_keys = ON")
            prepare_schema(connection, path)
        except sqlite3.DatabaseError as error:
            raise UserError(f"cannot open the job queue {path}: {error}") from None
        return cls(connection, path)

    def notify_on_work(self, event: threading.Event) -> None:
        self._work_listeners.append(event)

    def _work_added(self) -> None:
        for event in self._work_listeners:
            event.set()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- transactions ---------------------------------------------------------------------

    def _write(self, body: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `body` in one immediate (write-locked) transaction, committed durably."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = body(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                # SQLITE_FULL and the like may have rolled back already: a second ROLLBACK
                # would hide the real error; a failed COMMIT must not leave one open.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            return result

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, tuple(params)).fetchall()

    # --- receiving ------------------------------------------------------------------------

    def find(self, sop_instance_uid: str) -> Job | None:
        rows = self._read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE sop_instance_uid = ?",
                          (sop_instance_uid,))
        return Job(*rows[0]) if rows else None

    def admit(self, instance: NewInstance, place_file: Callable[[], str]) -> bool:
        """Record a received instance as a pending job.

        `place_file` moves the already-fsynced file into place and returns its spool-relative
        path; it runs only when the instance is new (or a retry, below), inside the store's
        lock, so two associations sending the same instance at once produce one job. Returns
        False for an instance that already has a job (nothing is written then).

        A re-sent instance whose job failed to classify or to build its report is a retry:
        the new bytes replace the kept file and the job is pending again (a modality re-sends
        after a broken transfer). Jobs in any other state stay as they are.
        """
        with self._lock:
            existing = self.find(instance.sop_instance_uid)
            if existing is not None and not accepts_resend(existing):
                return False
            image_file = place_file()
            now = time.time()
            if existing is None:
                self._write(lambda db: db.execute(
                    "INSERT INTO jobs (sop_instance_uid, sop_class_uid, study_instance_uid, "
                    "calling_ae_title, image_file, state, received_at, updated_at, "
                    "peer_address, modality, station_name, accession_number) "
                    f"VALUES (?, ?, ?, ?, ?, '{JobState.PENDING}', ?, ?, ?, ?, ?, ?)",
                    (instance.sop_instance_uid, instance.sop_class_uid,
                     instance.study_instance_uid, instance.calling_ae_title, image_file, now,
                     now, instance.peer_address, instance.modality, instance.station_name,
                     instance.accession_number)))
            else:
                self._write(lambda db: db.execute(
                    f"UPDATE jobs SET state = '{JobState.PENDING}', stage = NULL, reason = NULL, "
                    "dismissed_at = NULL, image_file = ?, sop_class_uid = ?, "
                    "calling_ae_title = ?, received_at = ?, updated_at = ?, peer_address = ?, "
                    "modality = ?, station_name = ?, accession_number = ? WHERE id = ?",
                    (image_file, instance.sop_class_uid, instance.calling_ae_title, now, now,
                     instance.peer_address, instance.modality, instance.station_name,
                     instance.accession_number, existing.id)))
        self._work_added()
        return True

    # --- classifying ----------------------------------------------------------------------

    def reset_interrupted(self) -> int:
        """At start-up: jobs a previous run was classifying go back to pending."""
        return self._write(lambda db: db.execute(
            f"UPDATE jobs SET state = '{JobState.PENDING}', updated_at = ? WHERE state = "
            f"'{JobState.CLASSIFYING}'",
            (time.time(),)).rowcount)

    def claim(self, limit: int) -> list[Job]:
        """Take up to `limit` of the oldest pending jobs for classification."""
        def body(db: sqlite3.Connection) -> list[Job]:
            rows = db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE state = '{JobState.PENDING}' "
                              "ORDER BY id LIMIT ?", (limit,)).fetchall()
            if rows:
                db.executemany(f"UPDATE jobs SET state = '{JobState.CLASSIFYING}', updated_at = ? "
                               "WHERE id = ?",
                               [(time.time(), row[0]) for row in rows])
            return [Job(*row) for row in rows]
        return self._write(body)

    def requeue(self, job_ids: Iterable[int]) -> int:
        """Put claimed jobs that are still `classifying` back to pending (their batch hit a
        temporary problem such as a full disk). Jobs that got further are left alone."""
        ids = list(job_ids)

        def body(db: sqlite3.Connection) -> int:
            now = time.time()
            return sum(db.execute(f"UPDATE jobs SET state = '{JobState.PENDING}', updated_at = ? "
                                  f"WHERE id = ? AND state = '{JobState.CLASSIFYING}'",
                                  (now, job_id)).rowcount for job_id in ids)
        requeued = self._write(body) if ids else 0
        if requeued:
            self._work_added()
        return requeued

    def mark_skipped(self, job_id: int, reason: str, model: str | None = None) -> bool:
        """`model`: the model that decided, where one did (it abstained)."""
        return self._finish(job_id, JobState.SKIPPED, None, reason, model)

    def mark_failed(self, job_id: int, stage: Stage, reason: str) -> bool:
        return self._finish(job_id, JobState.FAILED, stage, reason)

    def _finish(self, job_id: int, state: JobState, stage: Stage | None, reason: str,
                model: str | None = None) -> bool:
        """Settle a claimed job. False (and no change) when it is no longer `classifying`: a
        batch that breaks after reporting some of its jobs must not mark those failed."""
        return self._write(lambda db: db.execute(
            "UPDATE jobs SET state = ?, stage = ?, reason = ?, updated_at = ?, "
            "model = ? "
            f"WHERE id = ? AND state = '{JobState.CLASSIFYING}'",
            (state, stage, reason, time.time(), model, job_id)).rowcount) == 1

    def mark_reported(self, job_id: int, *, probability: float, finding: str, report_uid: str,
                      report_file: str, classify_ms: float, destinations: Iterable[str],
                      route: str | None = None, model: str | None = None,
                      heatmap_uid: str | None = None,
                      heatmap_file: str | None = None,
                      age_known: bool | None = None,
                      image_destinations: Iterable[str] | None = None) -> JobState:
        """The report (and its heat-map image, when `heatmap_file` is given) is in the outbox:
        queue one delivery per destination and object (those of `route`); the image goes to
        those of `image_destinations` (None: all) among them, the DICOM ones (an HL7 or FHIR
        destination gets a result message made from the report, no image). `age_known`:
        whether the film's header gave a usable patient age (counted by `age_counts`).
        Returns the new state: 'delivering', or 'done' when there is no destination."""
        names = list(destinations)
        state = JobState.DELIVERING if names else JobState.DONE
        takes_images = set(names if image_destinations is None else image_destinations)

        def body(db: sqlite3.Connection) -> JobState:
            now = time.time()
            db.execute("UPDATE jobs SET state = ?, stage = NULL, reason = NULL, probability = ?, "
                       "finding = ?, report_uid = ?, report_file = ?, classify_ms = ?, "
                       "updated_at = ?, route = ?, model = ?, age_known = ? WHERE id = ?",
                       (state, probability, finding, report_uid, report_file, classify_ms, now,
                        route, model, None if age_known is None else int(age_known), job_id))
            db.executemany("INSERT OR IGNORE INTO deliveries (job_id, destination, state, "
                           f"next_attempt_at) VALUES (?, ?, '{DeliveryState.PENDING}', ?)",
                           [(job_id, name, now) for name in names])
            if heatmap_file is not None:
                db.executemany("INSERT OR IGNORE INTO deliveries (job_id, destination, state, "
                               "next_attempt_at, object, object_uid, object_file) "
                               f"VALUES (?, ?, '{DeliveryState.PENDING}', ?, "
                               f"'{DeliveryObject.HEATMAP}', ?, ?)",
                               [(job_id, name, now, heatmap_uid, heatmap_file)
                                for name in names if name in takes_images])
            return state
        result = self._write(body)
        if names:
            self._work_added()
        return result

    # --- delivering -----------------------------------------------------------------------

    def due_deliveries(self, destination: str, now: float, limit: int) -> list[Delivery]:
        rows = self._read(
            "SELECT d.job_id, d.destination, d.attempts, d.first_attempt_at, "
            "COALESCE(d.object_file, j.report_file), COALESCE(d.object_uid, j.report_uid), "
            "j.sop_instance_uid, j.received_at, d.object FROM deliveries d "
            "JOIN jobs j ON j.id = d.job_id WHERE d.destination = ? "
            f"AND d.state = '{DeliveryState.PENDING}' AND d.next_attempt_at <= ? "
            "ORDER BY d.next_attempt_at, d.job_id, d.object DESC "
            "LIMIT ?",
            (destination, now, limit))
        return [Delivery(*row) for row in rows]

    def next_attempt_at(self, destination: str) -> float | None:
        rows = self._read("SELECT MIN(next_attempt_at) FROM deliveries "
                          "WHERE destination = ? AND state = "
                          f"'{DeliveryState.PENDING}'", (destination,))
        return rows[0][0]

    def release_waiting(self, destination: str, waiting_on: Callable[[str | None], bool],
                        now: float | None = None) -> int:
        """Make the destination's pending deliveries that wait out a backoff after an error
        `waiting_on(last_error)` accepts due now (the destination was just seen working);
        returns how many, and wakes the senders when any."""
        def body(db: sqlite3.Connection) -> int:
            at = time.time() if now is None else now
            rows = db.execute("SELECT job_id, object, last_error FROM deliveries "
                              f"WHERE destination = ? AND state = '{DeliveryState.PENDING}' "
                              "AND next_attempt_at > ?", (destination, at)).fetchall()
            chosen = [(job_id, object) for job_id, object, error in rows if waiting_on(error)]
            db.executemany("UPDATE deliveries SET next_attempt_at = ? WHERE job_id = ? AND "
                           "destination = ? AND object = ?",
                           [(at, job_id, destination, object) for job_id, object in chosen])
            return len(chosen)
        released = self._write(body)
        if released:
            self._work_added()
        return released

    def delivery_succeeded(self, job_id: int, destination: str,
                           object: str = DeliveryObject.REPORT) -> Job | None:
        """Record a delivery; returns the job when this completed all of its deliveries."""
        def body(db: sqlite3.Connection) -> Job | None:
            now = time.time()
            db.execute(f"UPDATE deliveries SET state = '{DeliveryState.DONE}', "
                       "attempts = attempts + 1, first_attempt_at = COALESCE(first_attempt_at, ?), "
                       "delivered_at = ?, "
                       "last_error = NULL WHERE job_id = ? AND destination = ? AND object = ?",
                       (now, now, job_id, destination, object))
            return self._settle_job(db, job_id, now)
        return self._write(body)

    def delivery_failed(self, job_id: int, destination: str, error: str, *,
                        retry_at: float | None,
                        object: str = DeliveryObject.REPORT) -> Job | None:
        """Record a failed attempt: retried at `retry_at`, or given up for good when None.
        Returns the job when this was its last open delivery."""
        def body(db: sqlite3.Connection) -> Job | None:
            now = time.time()
            state = DeliveryState.PENDING if retry_at is not None else DeliveryState.FAILED
            db.execute("UPDATE deliveries SET state = ?, attempts = attempts + 1, "
                       "first_attempt_at = COALESCE(first_attempt_at, ?), next_attempt_at = ?, "
                       "last_error = ? WHERE job_id = ? AND destination = ? AND object = ?",
                       (state, now, retry_at if retry_at is not None else now, error, job_id,
                        destination, object))
            return self._settle_job(db, job_id, now) if retry_at is None else None
        return self._write(body)

    def _settle_job(self, db: sqlite3.Connection, job_id: int, now: float) -> Job | None:
        """Close a delivering job once none of its deliveries is pending."""
        rows = db.execute("SELECT destination || CASE object "
                          f"WHEN '{DeliveryObject.REPORT}' THEN '' ELSE ' (' || object || ')' END, "
                          "state, last_error FROM deliveries "
                          "WHERE job_id = ? ORDER BY destination, object DESC",
                          (job_id,)).fetchall()
        if any(state == DeliveryState.PENDING for _, state, _ in rows):
            return None
        failed = [(name, error) for name, state, error in rows
                  if state == DeliveryState.FAILED]
        if failed:
            reason = "; ".join(f"delivery to {name} failed: {error}" for name, error in failed)
            db.execute(f"UPDATE jobs SET state = '{JobState.FAILED}', stage = '{Stage.DELIVER}', "
                       "reason = ?, updated_at = ? "
                       f"WHERE id = ? AND state = '{JobState.DELIVERING}'",
                       (reason, now, job_id))
        else:
            db.execute(f"UPDATE jobs SET state = '{JobState.DONE}', stage = NULL, reason = NULL, "
                       "updated_at = ? WHERE id = ? AND state = "
                       f"'{JobState.DELIVERING}'", (now, job_id))
        row = db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job(*row)

    def abandon_unknown_destinations(self, configured: Iterable[str]) -> int:
        """Pending deliveries to a destination no longer in the config can never be made:
        fail them (with the reason) so their jobs settle; `pacs-ai retry` after re-adding the
        destination sends them."""
        names = list(configured)

        def body(db: sqlite3.Connection) -> int:
            marks = ",".join("?" * len(names))
            unknown = f"AND destination NOT IN ({marks})" if names else ""
            rows = db.execute("SELECT job_id, destination FROM deliveries "
                              f"WHERE state = '{DeliveryState.PENDING}' {unknown}",
                              names).fetchall()
            now = time.time()
            for job_id, name in rows:
                db.execute(f"UPDATE deliveries SET state = '{DeliveryState.FAILED}', "
                           "last_error = ? WHERE job_id = ? AND destination = ?",
                           ("destination-removed: no longer in the config", job_id, name))
                self._settle_job(db, job_id, now)
            return len(rows)
        return self._write(body)

    def heatmap_files(self, job_id: int) -> list[str]:
        """The heat-map image files of a job's deliveries (spool-relative; none for most)."""
        return [row[0] for row in self._read(
            "SELECT DISTINCT object_file FROM deliveries WHERE job_id = ? AND object_file IS "
            "NOT NULL", (job_id,))]

    # --- operator commands ----------------------------------------------------------------

    def redeliver(self, job_id: int) -> int:
        """A re-sent image whose report could not be delivered (job failed at stage deliver):
        its failed deliveries start again from the first attempt, as `pacs-ai retry` does for
        all. Returns the number of deliveries requeued (0 when the job is in another state)."""
        def body(db: sqlite3.Connection) -> int:
            now = time.time()
            job = db.execute(f"UPDATE jobs SET state = '{JobState.DELIVERING}', stage = NULL, "
                             "reason = NULL, dismissed_at = NULL, updated_at = ? WHERE id = ? "
                             f"AND state = '{JobState.FAILED}' AND stage = '{Stage.DELIVER}' "
                             "AND report_file IS NOT NULL", (now, job_id)).rowcount
            if not job:
                return 0
            return db.execute(
                f"UPDATE deliveries SET state = '{DeliveryState.PENDING}', attempts = 0, "
                "first_attempt_at = NULL, next_attempt_at = ?, last_error = NULL "
                f"WHERE job_id = ? AND state = '{DeliveryState.FAILED}'",
                (now, job_id)).rowcount
        requeued = self._write(body)
        if requeued:
            self._work_added()
        return requeued

    def purge_files(self, finished_before: float) -> list[PurgedJob]:
        """Failed and skipped jobs settled before `finished_before`: forget their image and
        report files (the caller deletes them) and their failed deliveries, keeping the rows
        as a record. Such a job is no longer retried by `pacs-ai retry`; a re-send of its
        image runs it again from the start (accepts_resend)."""
        def body(db: sqlite3.Connection) -> list[PurgedJob]:
            rows = db.execute(
                "SELECT id, sop_instance_uid, state, image_file, report_file FROM jobs "
                f"WHERE state IN ('{JobState.FAILED}', '{JobState.SKIPPED}') AND updated_at < ? "
                "AND (image_file != '' OR report_file IS NOT NULL)",
                (finished_before,)).fetchall()
            ids = [(row[0],) for row in rows]
            db.executemany("UPDATE jobs SET image_file = '', report_file = NULL WHERE id = ?",
                           ids)
            heatmaps = {job_id: file for job_id, file in db.execute(
                "SELECT job_id, object_file FROM deliveries WHERE object_file IS NOT NULL AND "
                f"job_id IN ({','.join('?' * len(ids))})", [i for (i,) in ids]).fetchall()}
            db.executemany("DELETE FROM deliveries WHERE job_id = ? AND state = "
                           f"'{DeliveryState.FAILED}'", ids)
            return [PurgedJob(sop_instance_uid=uid, state=state,
                              files=tuple(f for f in (image, report, heatmaps.get(job_id)) if f))
                    for job_id, uid, state, image, report in rows]
        return self._write(body)

    def requeue_failed(self) -> tuple[int, int]:
        """`pacs-ai retry`: failed classifications go back to pending, failed deliveries are
        tried again from the start; dismissed jobs are left as they are (dismiss).
        Returns (jobs requeued, deliveries requeued)."""
        def body(db: sqlite3.Connection) -> tuple[int, int]:
            now = time.time()
            deliveries = db.execute(
                f"UPDATE deliveries SET state = '{DeliveryState.PENDING}', attempts = 0, "
                "first_attempt_at = NULL, next_attempt_at = ?, last_error = NULL "
                f"WHERE state = '{DeliveryState.FAILED}' AND job_id NOT IN "
                "(SELECT id FROM jobs WHERE dismissed_at IS NOT NULL)", (now,)).rowcount
            redeliver = db.execute(
                f"UPDATE jobs SET state = '{JobState.DELIVERING}', stage = NULL, reason = NULL, "
                f"updated_at = ? WHERE state = '{JobState.FAILED}' AND report_file IS NOT NULL "
                "AND dismissed_at IS NULL AND id IN (SELECT job_id FROM deliveries WHERE "
                f"state = '{DeliveryState.PENDING}')", (now,)).rowcount
            reclassify = db.execute(
                f"UPDATE jobs SET state = '{JobState.PENDING}', stage = NULL, reason = NULL, "
                f"updated_at = ? WHERE state = '{JobState.FAILED}' AND dismissed_at IS NULL "
                f"AND stage IN ('{Stage.CLASSIFY}', '{Stage.REPORT}') AND image_file != ''",
                (now,)).rowcount  # not those purged
            return redeliver + reclassify, deliveries
        result = self._write(body)
        self._work_added()
        return result

    def dismiss(self, keys: Iterable[str] | None = None) -> tuple[list[Job], list[str]]:
        """`pacs-ai dismiss`: mark failed jobs an admin has seen, so that status no longer
        calls for one; each stays failed, with its reason, and `retry` passes it over. `keys`:
        job numbers or SOP Instance UIDs; None: every failed job not dismissed yet.
        Returns (the jobs dismissed now, the keys that name no failed job); when a key names
        none, nothing is dismissed. A job dismissed before is left as it was."""
        def body(db: sqlite3.Connection) -> tuple[list[Job], list[str]]:
            now = time.time()
            if keys is None:
                rows = db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE state = "
                                  f"'{JobState.FAILED}' AND dismissed_at IS NULL").fetchall()
                unknown: list[str] = []
            else:
                rows, unknown = [], []
                for key in keys:
                    column = "id" if key.isdigit() else "sop_instance_uid"
                    row = db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE {column} = ? AND "
                                     f"state = '{JobState.FAILED}'", (key,)).fetchone()
                    if row is None:
                        unknown.append(key)
                    # a key given twice, or a job's number and its UID, dismiss it once
                    elif Job(*row).dismissed_at is None and row not in rows:
                        rows.append(row)
                if unknown:  # all or nothing: a mistyped key changes nothing
                    return [], unknown
            jobs = [dataclasses.replace(Job(*row), dismissed_at=now) for row in rows]
            db.executemany("UPDATE jobs SET dismissed_at = ? WHERE id = ?",
                           [(now, job.id) for job in jobs])
            return jobs, unknown
        return self._write(body)

    # --- shadow model (pacs_ai.classify.shadow) -------------------------------------------------------

    def record_shadow_results(self, results: Iterable[ShadowResult]) -> int:
        """Write (or replace) shadow results in one transaction; returns how many."""
        rows = [shadow_row(result) for result in results]
        if not rows:
            return 0
        self._write(lambda db: db.executemany(
            f"INSERT OR REPLACE INTO shadow_results ({SHADOW_COLUMNS}) "
            f"VALUES ({', '.join('?' * 20)})", rows))
        return len(rows)

    def shadow_results(self, received_since: float | None = None) -> list[ShadowResult]:
        """Shadow results with their film's SOP Instance UID, accession number and receipt
        time, oldest film first; only films received at or after `received_since`."""
        columns = ", ".join(f"s.{c.strip()}" for c in SHADOW_COLUMNS.split(","))
        rows = self._read(
            f"SELECT {columns}, j.sop_instance_uid, j.accession_number, j.received_at "
            "FROM shadow_results s JOIN jobs j ON j.id = s.job_id WHERE j.received_at >= ? "
            "ORDER BY j.received_at, s.job_id", (received_since or 0.0,))
        return [shadow_result_from_row(row) for row in rows]

    def job_counts(self) -> dict[str, int]:
        counts = {state.value: 0 for state in JobState}
        counts.update(dict(self._read("SELECT state, COUNT(*) FROM jobs GROUP BY state")))
        return counts

    def age_counts(self) -> dict[str, int]:
        """Classified jobs (those with a finding) by whether their header gave a usable patient
        age: known, unknown, and not_recorded (classified by a pacs-ai that did not keep it)."""
        counts = {"known": 0, "unknown": 0, "not_recorded": 0}
        names = {1: "known", 0: "unknown", None: "not_recorded"}
        for age_known, count in self._read("SELECT age_known, COUNT(*) FROM jobs WHERE "
                                           "finding IS NOT NULL GROUP BY age_known"):
            counts[names[age_known]] = count
        return counts

    def route_counts(self) -> dict[str, int]:
        """Reported jobs per route taken ([[routes]] name or 'default'); older jobs without
        one are left out."""
        return dict(self._read("SELECT route, COUNT(*) FROM jobs WHERE route IS NOT NULL "
                               "GROUP BY route ORDER BY route"))

    def delivery_counts(self, object: DeliveryObject | None = None) -> dict[str, dict[str, int]]:
        """Deliveries per destination and state: of one object (reports, heat-map images), or
        of all (a film with a heat-map image has two per destination)."""
        where, parameters = ("", ()) if object is None else ("WHERE object = ? ", (object,))
        result: dict[str, dict[str, int]] = {}
        for name, state, count in self._read(
                f"SELECT destination, state, COUNT(*) FROM deliveries {where}"
                "GROUP BY destination, state", parameters):
            result.setdefault(name, {s.value: 0 for s in DeliveryState})[state] = count
        return result

    def destination_deliveries(self, names: Iterable[str]) -> dict[str, DestinationDeliveries]:
        """Delivery health of each named destination (the configured ones).

        Asked per destination, so each question is an index lookup (deliveries_due,
        deliveries_done) rather than a scan of every delivery ever made: this runs at each
        /metrics scrape and queue page load (bench/queue_page.py: 2.9 s with a subquery per
        failed row on 10 000 jobs before)."""
        result = {}
        for name in names:
            last_success = self._read(
                "SELECT MAX(delivered_at) FROM deliveries WHERE destination = ? "
                f"AND state = '{DeliveryState.DONE}'", (name,))[0][0]
            count, oldest = self._read(
                "SELECT COUNT(*), MIN(j.received_at) FROM deliveries d JOIN jobs j "
                "ON j.id = d.job_id WHERE d.destination = ? AND d.state = "
                f"'{DeliveryState.PENDING}'",
                (name,))[0]
            # Deliveries still open or given up on whose first attempt failed after the last
            # success: the destination has stored nothing since. Ordered: the last error wins.
            since, error = None, None
            for first_attempt_at, last_error in self._read(
                    "SELECT first_attempt_at, last_error FROM deliveries WHERE destination = ? "
                    f"AND state IN ('{DeliveryState.PENDING}', '{DeliveryState.FAILED}') "
                    "AND attempts > 0 AND last_error IS NOT NULL AND first_attempt_at > ? "
                    "ORDER BY next_attempt_at", (name, last_success or 0)):
                since = first_attempt_at if since is None else min(since, first_attempt_at)
                error = last_error
            result[name] = DestinationDeliveries(name, last_success, count, oldest, since,
                                                 error)
        return result

    def failures_since(self, since: float) -> dict[tuple[str | None, str], int]:
        """Jobs that failed at or after `since` (epoch seconds), are still failed and are not
        dismissed, counted by (stage, reason code)."""
        rows = self._read(
            "SELECT stage, TRIM(SUBSTR(reason, 1, INSTR(reason || ':', ':') - 1)), COUNT(*) "
            f"FROM jobs WHERE state = '{JobState.FAILED}' AND dismissed_at IS NULL AND "
            "updated_at >= ? GROUP BY 1, 2", (since,))
        return {(stage, code or ""): count for stage, code, count in rows}

    def daily_results(self, since: float) -> list[tuple[int, str | None, str, int, int, int]]:
        """What the models made of the films received at or after `since` (epoch seconds), per
        UTC day (days since 1970-01-01, by when the film was received) and model:
        (day, model, role, classified, of those found pneumonia, abstained), ordered by day and
        model. `model` is the job's name and version (None: an abstention recorded before
        pacs-ai kept it). The live model's results are its jobs' (role 'live'); a shadow
        model's would be added here with its own role (pacs_ai.ops.drift reads any role)."""
        results: dict[tuple[int, str | None], list[int]] = {}
        for day, model, classified, positive in self._read(
                "SELECT CAST(received_at / 86400 AS INTEGER) AS day, model, COUNT(*), "
                "TOTAL(finding = 'pneumonia') FROM jobs WHERE received_at >= ? AND finding IS "
                "NOT NULL GROUP BY day, model", (since,)):
            results[(day, model)] = [int(classified), int(positive), 0]
        for day, model, abstained in self._read(  # few: by the state index
                "SELECT CAST(received_at / 86400 AS INTEGER) AS day, model, COUNT(*) FROM jobs "
                f"WHERE state = '{JobState.SKIPPED}' AND received_at >= ? AND reason LIKE "
                f"'{ABSTAINED_REASON_CODE}:%' GROUP BY day, model", (since,)):
            results.setdefault((day, model), [0, 0, 0])[2] = abstained
        return [(day, model, "live", *counts) for (day, model), counts in
                sorted(results.items(), key=lambda item: (item[0][0], item[0][1] or ""))]

    def dismissed_count(self) -> int:
        """Failed jobs an admin dismissed."""
        return self._read(f"SELECT COUNT(*) FROM jobs WHERE state = '{JobState.FAILED}' AND "
                          "dismissed_at IS NOT NULL")[0][0]

    def backlog(self) -> int:
        """Jobs received but not finished: waiting for classification or for delivery."""
        return self._read("SELECT COUNT(*) FROM jobs WHERE state IN "
                          f"('{JobState.PENDING}', '{JobState.CLASSIFYING}', "
                          f"'{JobState.DELIVERING}')")[0][0]

    def latest_failures(self, limit: int = 10) -> list[Job]:
        rows = self._read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE state = '{JobState.FAILED}' "
                          "ORDER BY updated_at DESC, id DESC LIMIT ?", (limit,))
        return [Job(*row) for row in rows]

    def latest_skips(self, limit: int = 10) -> list[Job]:
        rows = self._read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE state = '{JobState.SKIPPED}' "
                          "ORDER BY updated_at DESC, id DESC LIMIT ?", (limit,))
        return [Job(*row) for row in rows]

    def retrying_deliveries(self, limit: int = 10) -> list[tuple[str, str, int, float, str]]:
        """(report_uid, destination, attempts, next_attempt_at, last_error) of deliveries that
        failed at least once and will be tried again; for a heat-map image its own UID and
        "destination (heatmap)"."""
        return self._read(
            "SELECT COALESCE(d.object_uid, j.report_uid), d.destination || CASE d.object "
            f"WHEN '{DeliveryObject.REPORT}' THEN '' ELSE ' (' || d.object || ')' END, d.attempts, "
            "d.next_attempt_at, d.last_error "
            "FROM deliveries d JOIN jobs j ON j.id = d.job_id "
            f"WHERE d.state = '{DeliveryState.PENDING}' AND d.attempts > 0 "
            "ORDER BY d.next_attempt_at LIMIT ?", (limit,))

    def retrying_count(self) -> int:
        """How many deliveries retrying_deliveries would list without a limit."""
        return self._read("SELECT COUNT(*) FROM deliveries "
                          f"WHERE state = '{DeliveryState.PENDING}' AND attempts > 0")[0][0]

    def recent_jobs(self, limit: int) -> list[Job]:
        """The latest jobs, newest first (the queue page): by id, the primary key, so it stays
        quick on a large queue; a re-sent film keeps its place."""
        rows = self._read(f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        return [Job(*row) for row in rows]

    def job_by_id(self, job_id: int) -> Job | None:
        rows = self._read(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return Job(*rows[0]) if rows else None

    def deliveries_of(self, job_ids: Iterable[int]) -> dict[int, dict[str, dict[str, Any]]]:
        """Per job, per destination: state, attempts, last_error. Where a destination has
        several rows for a job (the report and other objects), the least advanced is shown."""
        ids = list(job_ids)
        if not ids:
            return {}
        rank = {DeliveryState.FAILED: 0, DeliveryState.PENDING: 1, DeliveryState.DONE: 2}
        result: dict[int, dict[str, dict[str, Any]]] = {}
        for job_id, name, state, attempts, error in self._read(
                "SELECT job_id, destination, state, attempts, last_error FROM deliveries "
                f"WHERE job_id IN ({','.join('?' * len(ids))})", ids):
            shown = result.setdefault(job_id, {}).get(name)
            if shown is None or rank.get(state, 0) < rank.get(shown["state"], 0):
                result[job_id][name] = {"state": state, "attempts": attempts,
                                        "last_error": error}
        return result
