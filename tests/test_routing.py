"""Routing end to end: two calling AE titles, two archives (Orthanc by C-STORE, Orthanc by
DICOMweb STOW-RS), a [[routes]] rule for one caller and [routing] default for the rest."""

from __future__ import annotations

import json
import sqlite3

import pytest

from pacs_ai.queue.job_records import NewInstance
from pacs_ai.queue.jobs import JobStore
from testbed.dicom_peers import (ServiceProcess, SimulatedModality, pacs_ai_cli,
                                 synthetic_radiograph, wait_until, write_service_config)
from testbed.real_peers import Modality, Orthanc, orthanc_destination


def sr_in_study(orthanc: Orthanc, film) -> list[str]:
    return orthanc.study_sop_instance_uids(str(film.StudyInstanceUID), modality="SR")


@pytest.mark.real_peer
def test_each_caller_s_reports_go_where_its_route_says(tmp_path, tiny_model):
    with Orthanc(tmp_path / "ward-pacs", modalities=[Modality("PACS_AI", 104)]) as ward_pacs, \
            Orthanc(tmp_path / "er-archive", dicomweb=True) as er_archive:
        config = write_service_config(
            tmp_path, model=tiny_model,
            destinations=[orthanc_destination(ward_pacs, name="ward-pacs"),
                          {"name": "er-archive", "kind": "dicomweb",
                           "url": er_archive.dicomweb_url}])
        with config.open("a") as file:
            file.write('\n[[routes]]\nname = "er"\ncalling_ae_title = "ER_CR"\n'
                       'destinations = ["er-archive"]\n\n[routing]\ndefault = ["ward-pacs"]\n')
        with ServiceProcess(config, tmp_path / "serve.log") as service:
            er_film, ward_film = synthetic_radiograph(seed=21), synthetic_radiograph(seed=22)
            for caller, film in (("ER_CR", er_film), ("WARD_DX", ward_film)):
                [result] = SimulatedModality(service.port, calling_ae_title=caller).send([film])
                assert result.acknowledged, result
            assert wait_until(lambda: sr_in_study(er_archive, er_film)
                              and sr_in_study(ward_pacs, ward_film), 60), \
                service.log_path.read_text()[-3000:]
            classified = {e["sop_instance_uid"]: e for e in service.events()
                          if e["event"] == "instance_classified"}
            assert classified[str(er_film.SOPInstanceUID)]["route"] == "er"
            assert classified[str(er_film.SOPInstanceUID)]["destinations"] == ["er-archive"]
            assert classified[str(ward_film.SOPInstanceUID)]["route"] == "default"
            result = pacs_ai_cli("status", "--config", str(config), "--json")
            assert json.loads(result.stdout)["routes"] == {"default": 1, "er": 1}
            text = pacs_ai_cli("status", "--config", str(config)).stdout
            assert "routes:   default 1 | er 1" in text, text
        # each report went to its route's archive only
        assert sr_in_study(ward_pacs, er_film) == [] and sr_in_study(er_archive, ward_film) == []
        assert len(sr_in_study(er_archive, er_film)) == 1
        assert len(sr_in_study(ward_pacs, ward_film)) == 1


OLD_JOBS_TABLE = """
CREATE TABLE jobs (id INTEGER PRIMARY KEY, sop_instance_uid TEXT NOT NULL UNIQUE,
  sop_class_uid TEXT NOT NULL, study_instance_uid TEXT, calling_ae_title TEXT,
  image_file TEXT NOT NULL, state TEXT NOT NULL, stage TEXT, reason TEXT, probability REAL,
  finding TEXT, report_uid TEXT, report_file TEXT, classify_ms REAL, received_at REAL NOT NULL,
  updated_at REAL NOT NULL);
INSERT INTO jobs (sop_instance_uid, sop_class_uid, image_file, state, received_at, updated_at)
  VALUES ('1.2.3', '1.2.840.10008.5.1.4.1.1.1', 'images/a.dcm', 'done', 1, 1);
"""


def test_a_queue_from_before_routing_gets_the_new_columns(tmp_path):
    """A jobs.sqlite written before routing (no peer_address ... model columns) opens, and
    new jobs record what routes match on."""
    path = tmp_path / "jobs.sqlite"
    old = sqlite3.connect(path)
    old.executescript(OLD_JOBS_TABLE + "PRAGMA user_version = 1;")
    old.close()
    store = JobStore.open(path)
    try:
        assert store.find("1.2.3").route is None
        store.admit(NewInstance("1.2.4", "1.2.840.10008.5.1.4.1.1.1", None, "CR1",
                                peer_address="10.0.0.7", modality="CR", station_name="ROOM1",
                                accession_number="A1"), lambda: "images/b.dcm")
        job = store.find("1.2.4")
        assert (job.peer_address, job.modality, job.station_name, job.accession_number) == \
            ("10.0.0.7", "CR", "ROOM1", "A1")
    finally:
        store.close()


def test_a_queue_from_before_heat_maps_keeps_every_deliveries_index(tmp_path):
    """The deliveries table is rebuilt for heat-map objects; the rebuilt one has all indexes
    (deliveries_done is what the destination health queries look up)."""
    path = tmp_path / "jobs.sqlite"
    old = sqlite3.connect(path)
    old.executescript(OLD_JOBS_TABLE + """
CREATE TABLE deliveries (job_id INTEGER NOT NULL, destination TEXT NOT NULL,
  state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL,
  first_attempt_at REAL, last_error TEXT, delivered_at REAL, PRIMARY KEY (job_id, destination));
INSERT INTO deliveries VALUES (1, 'pacs', 'done', 1, 5, 5, NULL, 6);
PRAGMA user_version = 1;""")
    old.close()
    JobStore.open(path).close()
    check = sqlite3.connect(path)
    indexes = {row[0] for row in check.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'deliveries' "
        "AND name NOT LIKE 'sqlite_autoindex%'")}
    rows = check.execute("SELECT job_id, destination, object FROM deliveries").fetchall()
    check.close()
    assert indexes == {"deliveries_due", "deliveries_done"}
    assert rows == [(1, "pacs", "report")]
