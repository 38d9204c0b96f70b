"""The job queue's SQLite schema (jobs, deliveries, shadow_results) and how a queue written by
an earlier pacs-ai is brought up to date when it is opened (`prepare_schema`).
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from pacs_ai.errors import UserError

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL UNIQUE,
    sop_class_uid TEXT NOT NULL,
    study_instance_uid TEXT,
    calling_ae_title TEXT,
    image_file TEXT NOT NULL,          -- relative to the spool
    state TEXT NOT NULL,
    stage TEXT,                        -- where a failed job failed: classify, report, deliver
    reason TEXT,                       -- 'code: detail' of a skip or failure
    probability REAL,
    finding TEXT,
    report_uid TEXT,
    report_file TEXT,                  -- relative to the spool
    classify_ms REAL,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    peer_address TEXT,                 -- what routing rules match ([[routes]]) ...
    modality TEXT,
    station_name TEXT,
    accession_number TEXT,             -- shown on the queue page only when [web] allows it
    route TEXT,                        -- the [[routes]] name taken, or 'default'
    model TEXT,                        -- name and version of the model that classified it
                                       -- (or abstained on it)
    dismissed_at REAL,                 -- a failed job an admin dismissed (pacs-ai dismiss)
    age_known INTEGER                  -- a reported film's header gave a usable patient age:
                                       -- 1 or 0; NULL: not reported, or before pacs-ai kept it
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    first_attempt_at REAL,
    last_error TEXT,
    delivered_at REAL,
    object TEXT NOT NULL DEFAULT 'report',  -- what is sent: 'report' or 'heatmap'
    object_uid TEXT,                   -- a heatmap's SOP Instance UID (a report's: the job's)
    object_file TEXT,                  -- a heatmap's file, relative to the spool
    PRIMARY KEY (job_id, destination, object)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (destination, state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_done ON deliveries (destination, state, delivered_at);
-- [shadow]: one row per film the live model assessed and shadow model (pacs_ai.classify.shadow), with
-- both models' assessment of the same model input; never reported. A film assessed again
-- (a retry, a restart mid-batch) replaces its row.
CREATE TABLE IF NOT EXISTS shadow_results (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    model_name TEXT NOT NULL,          -- the shadow model
    model_version TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    threshold REAL NOT NULL,           -- its threshold in force
    status TEXT NOT NULL,              -- 'assessed', or why not: 'busy', 'model-failed',
                                       -- 'stopped', 'outside-intended-age' (its own age range)
    probability REAL,                  -- the shadow's, even when it abstains
    ood_score REAL,                    -- NULL: a model without an out-of-distribution score
    abstained INTEGER,                 -- 1: score above its ood threshold (no finding)
    finding TEXT,                      -- 'pneumonia' or 'normal'; NULL when abstained
    live_model_name TEXT NOT NULL,     -- the live model, and what it made of the same input
    live_model_version TEXT NOT NULL,
    live_model_sha256 TEXT NOT NULL,
    live_threshold REAL NOT NULL,
    live_probability REAL NOT NULL,
    live_ood_score REAL,
    live_abstained INTEGER NOT NULL,
    live_finding TEXT,
    reason TEXT,                       -- why not assessed
    assessed_at REAL NOT NULL,
    PRIMARY KEY (job_id, model_sha256)
);
CREATE INDEX IF NOT EXISTS shadow_results_by_time ON shadow_results (assessed_at);
"""


# Columns added after the first release, with their types: a queue written by an older pacs-ai
# gets them at open (its rows read NULL there).
ADDED_JOB_COLUMNS = {"peer_address": "TEXT", "modality": "TEXT", "station_name": "TEXT",
                     "accession_number": "TEXT", "route": "TEXT", "model": "TEXT",
                     "age_known": "INTEGER", "dismissed_at": "REAL"}
# Indexes on columns an older queue gets only from ADDED_JOB_COLUMNS: created after them (in
# SCHEMA they would stop an older queue from opening: "no such column").
INDEXES_ON_ADDED_COLUMNS = """
-- the daily rates (daily_results): the classified films of a window read from the index alone
CREATE INDEX IF NOT EXISTS jobs_by_received ON jobs (received_at, finding, model);
"""


_DELIVERIES_TABLE = re.search(r"CREATE TABLE IF NOT EXISTS deliveries \(.*?\n\);", SCHEMA,
                              re.DOTALL).group(0)
# every index of the table (the rebuild below drops them with the old table)
_DELIVERIES_INDEXES = re.findall(r"CREATE INDEX IF NOT EXISTS deliveries_\w+ [^;]*;", SCHEMA)


def _add_delivery_objects(connection: sqlite3.Connection) -> None:
    """A queue written before heat-map images: its deliveries table gets the object columns
    and the primary key (job, destination, object), copied in one transaction (SQLite cannot
    change a primary key in place); its rows stay the report deliveries they were."""
    columns = {row[1] for row in connection.execute("PRAGMA table_info(deliveries)")}
    if "object" in columns:
        return
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute("ALTER TABLE deliveries RENAME TO deliveries_before_objects")
        connection.execute(_DELIVERIES_TABLE)
        connection.execute(
            "INSERT INTO deliveries (job_id, destination, state, attempts, next_attempt_at, "
            "first_attempt_at, last_error, delivered_at) SELECT job_id, destination, state, "
            "attempts, next_attempt_at, first_attempt_at, last_error, delivered_at "
            "FROM deliveries_before_objects")
        connection.execute("DROP TABLE deliveries_before_objects")  # and its index
        for index in _DELIVERIES_INDEXES:
            connection.execute(index)
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def prepare_schema(connection: sqlite3.Connection, path: Path) -> None:
    """Create the tables of a new queue, or bring a queue written by an earlier pacs-ai up to
    date (added columns, the deliveries' object key, indexes on added columns). UserError for a
    queue written by a newer pacs-ai, whose schema this one cannot know."""
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise UserError(f"{path} was written by a newer pacs-ai (queue schema {version}); "
                        "upgrade pacs-ai or use another spool")
    connection.executescript(SCHEMA)
    _add_delivery_objects(connection)
    present = {row[1] for row in connection.execute("PRAGMA table_info(jobs)")}
    for column, kind in ADDED_JOB_COLUMNS.items():
        if column not in present:
            connection.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
    connection.executescript(INDEXES_ON_ADDED_COLUMNS)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
