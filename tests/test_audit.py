"""The audit trail (issue 14 item 7): the record builders, the writer (rotation, a full disk, a
stalled disk), the listener's records with pynetdicom peers, and the whole path with real
peers: DCMTK storescu/echoscu -> `pacs-ai serve` -> Orthanc."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pydicom
import pytest
import structlog.testing

from pacs_ai.config import ConfigError, parse_config
from pacs_ai.ops import audit, metrics
from pacs_ai.ops.audit import AuditTrail
from testbed.dicom_peers import (LOCALHOST, SimulatedModality, free_port, synthetic_radiograph,
                                 wait_until)
from testbed.job_queue import all_jobs
from testbed.listener import Listener


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def participant(record: dict, role_code: str) -> dict:
    [found] = [p for p in record["ActiveParticipant"]
               if p["RoleIDCode"][0]["csd-code"] == role_code]
    return found


def lost_count() -> float:
    return metrics.REGISTRY.get_sample_value("pacs_ai_audit_records_lost_total") or 0.0


# --- builders -----------------------------------------------------------------------------------

def received(**overrides) -> dict:
    fields = dict(calling_ae_title="CR1", peer="10.1.2.3", called_ae_title="PACS_AI",
                  node="ai-host", status=0x0000, reason=None, sop_class_uid="1.2.840.1",
                  sop_instance_uid="1.2.3.4", study_instance_uid="1.2.3",
                  series_instance_uid="1.2.3.9", association_id="a1")
    fields.update(overrides)
    return audit.instance_received(**fields).as_json("PACS_AI@ai-host")


def test_transfer_in_record_has_the_dicom_audit_fields():
    record = received()
    event = record["EventIdentification"]
    assert event["EventID"] == {"csd-code": "110104", "codeSystemName": "DCM",
                                "originalText": "DICOM Instances Transferred"}
    assert event["EventActionCode"] == "C" and event["EventOutcomeIndicator"] == 0
    assert event["EventDateTime"].endswith("Z")
    source, destination = participant(record, "110153"), participant(record, "110152")
    assert (source["UserID"], source["NetworkAccessPointID"], source["UserIsRequestor"],
            source["NetworkAccessPointTypeCode"]) == ("CR1", "10.1.2.3", True, "2")
    assert (destination["UserID"], destination["NetworkAccessPointID"],
            destination["NetworkAccessPointTypeCode"]) == ("PACS_AI", "ai-host", "1")
    [study] = record["ParticipantObjectIdentification"]  # no patient unless asked
    assert study["ParticipantObjectID"] == "1.2.3"
    assert study["ParticipantObjectIDTypeCode"]["csd-code"] == "110180"
    assert study["ParticipantObjectDescription"]["SOPClass"] == [
        {"UID": "1.2.840.1", "NumberOfInstances": 1, "Instance": [{"UID": "1.2.3.4"}]}]
    assert study["ParticipantObjectDetail"] == [{"type": "SeriesInstanceUID",
                                                 "value": "1.2.3.9"}]
    assert record["AuditSourceIdentification"]["AuditSourceID"] == "PACS_AI@ai-host"
    assert record["pacs_ai"] == {"record": "transfer-in", "status": "0x0000",
                                 "association": "a1"}


def test_the_outcome_follows_the_dicom_status():
    assert received(status=0xB000)["EventIdentification"]["EventOutcomeIndicator"] == 0
    full = received(status=0xA700, reason="disk-full: No space left on device")
    assert full["EventIdentification"]["EventOutcomeIndicator"] == 4  # the modality re-sends
    assert full["EventIdentification"]["EventOutcomeDescription"] == \
        "0xA700 disk-full: No space left on device"
    internal = received(status=0xA700, reason="internal-error: KeyError")
    assert internal["EventIdentification"]["EventOutcomeIndicator"] == 12
    bad = received(status=0xC000, reason="truncated-pixel-data: 10 of 20 bytes",
                   study_instance_uid=None, series_instance_uid=None)
    assert bad["EventIdentification"]["EventOutcomeIndicator"] == 8
    assert bad["pacs_ai"]["reason"].startswith("truncated-pixel-data")
    [study] = bad["ParticipantObjectIdentification"]  # the instance is named all the same
    assert study["ParticipantObjectID"] == "" and "ParticipantObjectDetail" not in study
    assert study["ParticipantObjectDescription"]["SOPClass"][0]["Instance"] == [{"UID": "1.2.3.4"}]


def test_patient_id_only_when_given_and_never_a_name():
    record = received(patient_id="PID-4711")
    patient = record["ParticipantObjectIdentification"][1]
    assert (patient["ParticipantObjectTypeCode"], patient["ParticipantObjectTypeCodeRole"],
            patient["ParticipantObjectID"]) == (1, 1, "PID-4711")
    assert "ParticipantObjectName" not in json.dumps(record)


@pytest.mark.parametrize("stored, given_up, outcome", [(True, False, 0), (False, False, 4),
                                                       (False, True, 8)])
def test_transfer_out_record(stored, given_up, outcome):
    record = audit.report_sent(
        calling_ae_title="PACS_AI", node="ai-host", destination="main-pacs",
        destination_ae_title="ORTHANC", destination_address="10.9.9.9", stored=stored,
        detail="0x0000" if stored else "connection-failed: ORTHANC@10.9.9.9:4242",
        given_up=given_up, report_uid="2.25.7", source_sop_instance_uid="1.2.3.4", attempts=3,
        study_instance_uid="1.2.3").as_json("x")
    event = record["EventIdentification"]
    assert (event["EventID"]["csd-code"], event["EventActionCode"],
            event["EventOutcomeIndicator"]) == ("110104", "R", outcome)
    destination = participant(record, "110152")
    assert (destination["UserID"], destination["NetworkAccessPointID"]) == ("ORTHANC",
                                                                            "10.9.9.9")
    assert participant(record, "110153")["UserIsRequestor"] is True
    [study] = record["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == "1.2.3"
    assert study["ParticipantObjectDescription"]["SOPClass"][0]["Instance"] == [{"UID": "2.25.7"}]
    assert record["pacs_ai"]["destination"] == "main-pacs"
    assert record["pacs_ai"]["attempts"] == 3 and record["pacs_ai"]["object"] == "report"


def test_security_alert_and_application_activity_codes():
    alert = audit.security_alert(reason="calling-ae-not-allowed", peer="10.6.6.6",
                                 ae_title="PACS_AI", node="h", calling_ae_title="INTRUDER",
                                 called_ae_title="PACS_AI").as_json("x")
    event = alert["EventIdentification"]
    assert event["EventID"]["csd-code"] == "110113"
    assert [c["csd-code"] for c in event["EventTypeCode"]] == ["110126"]
    assert event["EventOutcomeIndicator"] == 8
    assert participant(alert, "110153")["UserID"] == "INTRUDER"
    start = audit.application_activity(started=True, ae_title="PACS_AI", node="h").as_json("x")
    stop = audit.application_activity(started=False, ae_title="PACS_AI", node="h").as_json("x")
    assert start["EventIdentification"]["EventID"]["csd-code"] == "110100"
    assert [start["EventIdentification"]["EventTypeCode"][0]["csd-code"],
            stop["EventIdentification"]["EventTypeCode"][0]["csd-code"]] == ["110120", "110121"]


# --- config ---------------------------------------------------------------------------------------

def test_audit_config_defaults_and_errors(tmp_path):
    config = parse_config({"storage": {"spool_dir": "spool"}}, base_dir=tmp_path)
    assert config.audit.enabled and not config.audit.include_patient_id
    assert config.audit.file(config.storage.spool_dir) == tmp_path / "spool" / "audit" / "audit.log"
    assert config.audit.max_bytes == 50 * 1024 * 1024 and config.audit.backup_count == 20
    custom = parse_config({"audit": {"path": "logs/audit.jsonl", "max_bytes": 0}},
                          base_dir=tmp_path).audit
    assert custom.file(tmp_path / "spool") == tmp_path / "logs" / "audit.jsonl"
    for table, key in (({"max_bytes": 1000}, "max_bytes"),
                       ({"backup_count": 0}, "backup_count"),
                       ({"include_patient_id": "yes"}, "include_patient_id"),
                       ({"rotate": True}, "rotate")):
        with pytest.raises(ConfigError, match=rf"\[audit\].*{key}"):
            parse_config({"audit": table}, base_dir=tmp_path)


# --- the writer -----------------------------------------------------------------------------------

def message(index: int) -> audit.AuditMessage:
    return audit.instance_received(
        calling_ae_title="CR1", peer="10.1.2.3", called_ae_title="PACS_AI", node="h", status=0,
        reason=None, sop_class_uid="1.2", sop_instance_uid=f"1.2.3.{index}",
        study_instance_uid="1.2.3", series_instance_uid=None)


def test_records_are_json_lines_rotated_by_size(tmp_path):
    path = tmp_path / "audit" / "audit.log"
    trail = AuditTrail(path, max_bytes=4000, backup_count=2).start()
    for index in range(60):
        trail.record(message(index))
    trail.close()
    files = sorted(path.parent.iterdir())
    assert [f.name for f in files] == ["audit.log", "audit.log.1", "audit.log.2"]
    assert all(f.stat().st_size <= 4000 for f in files)
    assert all(f.stat().st_mode & 0o007 == 0 for f in files)  # nothing for other users
    newest = read_records(path)
    assert newest[-1]["ParticipantObjectIdentification"][0]["ParticipantObjectDescription"][
        "SOPClass"][0]["Instance"] == [{"UID": "1.2.3.59"}]  # the last one written is kept


def test_a_full_disk_loses_records_but_never_raises_and_is_logged_once(tmp_path):
    """/dev/full answers every write with ENOSPC, as a full file system does."""
    before = lost_count()
    trail = AuditTrail(Path("/dev/full"), max_bytes=1 << 20, backup_count=1).start()
    with structlog.testing.capture_logs() as logs:
        for index in range(5):
            trail.record(message(index))  # must not raise
        trail.close()
    assert lost_count() - before == 5
    warnings = [entry for entry in logs if entry["event"] == "audit_write_failed"]
    assert len(warnings) == 1 and "No space left" in warnings[0]["error"]


def test_writing_resumes_after_a_failure_and_says_how_many_were_lost(tmp_path):
    path = tmp_path / "audit.log"
    trail = AuditTrail(path, max_bytes=0, backup_count=0).start()
    handler = trail._handler
    real_path = handler.baseFilename
    with structlog.testing.capture_logs() as logs:
        handler.baseFilename = "/dev/full"  # the disk fills up ...
        for index in range(3):
            trail.record(message(index))
        assert wait_until(lambda: trail._queue.empty(), 5)
        time.sleep(0.1)
        handler.baseFilename = real_path  # ... and gets room again
        trail.record(message(3))
        trail.close()
    events = [entry["event"] for entry in logs]
    assert events == ["audit_write_failed", "audit_write_resumed"], logs
    assert logs[1]["records_lost"] == 3
    assert len(read_records(path)) == 1


def test_a_stalled_disk_never_blocks_the_caller(tmp_path):
    """The file is a FIFO nobody reads: the writer thread blocks in open() as on a hung disk;
    record() must still return at once, and what does not fit in the queue is counted lost."""
    fifo = tmp_path / "audit.log"
    os.mkfifo(fifo)
    before = lost_count()
    trail = AuditTrail(fifo, max_bytes=0, queue_records=10)
    # start() opens the file itself to check it can: with a FIFO that would block too
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        trail.start()
    finally:
        os.close(reader)
    started = time.monotonic()
    for index in range(100):
        trail.record(message(index))
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, elapsed
    assert lost_count() - before >= 89  # 10 queued, one maybe taken by the writer
    drained: list[bytes] = []
    drain = threading.Thread(target=lambda: drained.append(fifo.read_bytes()), daemon=True)
    drain.start()
    trail.close(timeout=10)
    drain.join(timeout=10)
    assert 10 <= b"".join(drained).count(b"\n") <= 11


def test_an_unwritable_audit_path_stops_the_start_with_the_key(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(Exception, match=r"\[audit\] path"):
        AuditTrail(blocker / "audit.log").start()


# --- the listener's records (pynetdicom peers, in this process) ------------------------------------

class AuditedListener(Listener):
    """The listener with an audit trail, and its records."""

    def __init__(self, folder: Path, **tables):
        super().__init__(folder, audited=True, **tables)

    def records(self, kind: str | None = None) -> list[dict]:
        records = read_records(self.audit_path) if self.audit_path.exists() else []
        return [r for r in records if kind is None or r["pacs_ai"]["record"] == kind]

    def wait_for(self, kind: str, count: int = 1) -> list[dict]:
        wait_until(lambda: len(self.records(kind)) >= count, 10)
        return self.records(kind)


@pytest.fixture
def audited(tmp_path):
    made: list[AuditedListener] = []

    def make(**tables) -> AuditedListener:
        folder = tmp_path / f"listener-{len(made)}"
        folder.mkdir()
        made.append(AuditedListener(folder, **tables))
        return made[-1]

    yield make
    for listener in made:
        listener.close()


def test_listener_records_a_stored_and_a_refused_instance_and_the_association(audited):
    listener = audited(audit={"include_patient_id": True})
    good = synthetic_radiograph()
    good.PatientID = "PID-0001"
    bad = synthetic_radiograph()
    bad.PixelData = bad.PixelData[: len(bad.PixelData) // 2]  # cut: refused 0xC000
    result = SimulatedModality(listener.port, calling_ae_title="CR_ROOM_1").send([good, bad])
    assert [r.status for r in result] == [0x0000, 0xC000], result
    transfers = listener.wait_for("transfer-in", 2)
    by_uid = {t["ParticipantObjectIdentification"][0]["ParticipantObjectDescription"]
              ["SOPClass"][0]["Instance"][0]["UID"]: t for t in transfers}
    stored, refused = by_uid[str(good.SOPInstanceUID)], by_uid[str(bad.SOPInstanceUID)]
    assert stored["EventIdentification"]["EventOutcomeIndicator"] == 0
    assert participant(stored, "110153")["UserID"] == "CR_ROOM_1"
    assert participant(stored, "110153")["NetworkAccessPointID"] == "127.0.0.1"
    objects = stored["ParticipantObjectIdentification"]
    assert objects[0]["ParticipantObjectID"] == str(good.StudyInstanceUID)
    assert objects[0]["ParticipantObjectDetail"][0]["value"] == str(good.SeriesInstanceUID)
    assert objects[1]["ParticipantObjectID"] == "PID-0001"  # include_patient_id = true
    assert refused["EventIdentification"]["EventOutcomeIndicator"] == 8
    assert refused["pacs_ai"]["status"] == "0xC000"
    assert refused["pacs_ai"]["reason"].startswith("truncated-pixel-data")
    [start] = listener.wait_for("association-start")
    [end] = listener.wait_for("association-end")
    assert start["EventIdentification"]["EventID"]["csd-code"] == "110102"
    assert start["pacs_ai"]["association"] == end["pacs_ai"]["association"] == \
        stored["pacs_ai"]["association"]
    assert end["EventIdentification"]["EventOutcomeDescription"] == "released"
    assert (end["pacs_ai"]["instances_stored"], end["pacs_ai"]["instances_refused"]) == (1, 1)



def test_a_film_too_large_to_decode_is_a_refused_transfer(audited):
    """Issue 23 item 3: refused while received, so audited as a refused transfer-in (outcome
    8), with status and reason, like the other refusals; it was recorded as stored before."""
    from pydicom.uid import JPEG2000Lossless

    from tests.hostile_input import declaring

    listener = audited()
    film = declaring(synthetic_radiograph(seed=9, transfer_syntax=JPEG2000Lossless), 60000, 60000)
    [result] = SimulatedModality(listener.port).send([film])
    assert result.status == 0xC000
    [refused] = listener.wait_for("transfer-in")
    assert refused["EventIdentification"]["EventOutcomeIndicator"] == 8
    assert refused["pacs_ai"]["status"] == "0xC000"
    assert refused["pacs_ai"]["reason"] == \
        "too-large: 60000 x 60000 x 1 frame(s) > max_pixels 50000000"

def test_listener_leaves_the_patient_id_out_by_default(audited):
    listener = audited()
    film = synthetic_radiograph()
    film.PatientID = "PID-0002"
    SimulatedModality(listener.port).send([film])
    [record] = listener.wait_for("transfer-in")
    assert len(record["ParticipantObjectIdentification"]) == 1
    assert "PID-0002" not in listener.audit_path.read_text()


def test_refused_callers_are_security_alerts(audited):
    listener = audited(listener={"allowed_calling_ae_titles": ["CR1"],
                                 "allowed_peer_addresses": ["127.0.0.1"]})
    assert SimulatedModality(listener.port, calling_ae_title="INTRUDER").echo() is None
    assert SimulatedModality(listener.port, called_ae_title="NOTME",
                             calling_ae_title="CR1").echo() is None
    alerts = listener.wait_for("security-alert", 2)
    reasons = {a["pacs_ai"]["reason"]: a for a in alerts}
    assert set(reasons) == {"calling-ae-not-allowed", "called-ae-not-recognised"}
    intruder = reasons["calling-ae-not-allowed"]
    assert intruder["EventIdentification"]["EventID"]["csd-code"] == "110113"
    assert participant(intruder, "110153")["UserID"] == "INTRUDER"
    assert participant(intruder, "110153")["NetworkAccessPointID"] == "127.0.0.1"
    assert reasons["called-ae-not-recognised"]["pacs_ai"]["called_ae_title"] == "NOTME"
    assert listener.records("association-start") == []  # none was accepted


def test_an_ae_title_from_the_wrong_address_is_a_security_alert(audited):
    listener = audited(listener={"allowed_calling_ae_titles": [
        {"ae_title": "CR2", "address": "10.1.2.0/24"}]})
    assert SimulatedModality(listener.port, calling_ae_title="CR2").echo() is None
    [alert] = listener.wait_for("security-alert")
    assert alert["pacs_ai"]["reason"] == "calling-ae-wrong-address"
    assert participant(alert, "110153")["UserID"] == "CR2"
    assert participant(alert, "110153")["NetworkAccessPointID"] == "127.0.0.1"


def test_an_address_not_allowed_is_a_security_alert(audited):
    listener = audited(listener={"allowed_peer_addresses": ["10.0.0.0/8"]})
    assert SimulatedModality(listener.port).echo() is None
    [alert] = listener.wait_for("security-alert")
    assert alert["pacs_ai"]["reason"] == "peer-address-not-allowed"
    assert participant(alert, "110153")["NetworkAccessPointID"] == "127.0.0.1"



def test_a_full_audit_disk_never_costs_a_modality_its_answer(audited):
    """The audit file on a full disk (/dev/full: every write ENOSPC): films are still taken
    and acknowledged, the records are counted lost and the loss is logged once."""
    listener = audited(audit={"path": "/dev/full"})
    before = lost_count()
    with structlog.testing.capture_logs() as logs:
        results = SimulatedModality(listener.port).send(
            [synthetic_radiograph() for _ in range(3)])
        assert [r.status for r in results] == [0x0000] * 3, results
        # association start, three transfers in, association end
        assert wait_until(lambda: lost_count() - before >= 5, 10), lost_count() - before
    assert len(all_jobs(listener.store)) == 3
    assert [e["event"] for e in logs if e["event"].startswith("audit_")] == ["audit_write_failed"]


def test_a_failed_tls_handshake_is_a_security_alert(audited, tmp_path):
    import ssl

    from tests.tls_material import make_tls_material

    ours = make_tls_material(tmp_path / "pki")
    stranger = make_tls_material(tmp_path / "pki", prefix="stranger-")
    listener = audited(tls={"cert_file": str(ours.server_cert), "key_file": str(ours.server_key),
                            "ca_file": str(ours.ca_cert), "require_client_cert": True})
    context = ssl.create_default_context(cafile=str(ours.ca_cert))
    context.check_hostname = False
    context.load_cert_chain(str(stranger.client_cert), str(stranger.client_key))
    assert SimulatedModality(listener.port, ssl_context=context, timeout=5).echo() is None
    [alert] = listener.wait_for("security-alert")
    assert alert["pacs_ai"]["reason"] == "tls-handshake-failed"
    assert alert["EventIdentification"]["EventOutcomeDescription"].startswith(
        "tls-handshake-failed: ")  # with the TLS error
    assert participant(alert, "110153")["NetworkAccessPointID"] == "127.0.0.1"



def test_failed_deliveries_and_the_patient_id_in_the_service_audit(tmp_path, tiny_model):
    """`pacs-ai serve` with its PACS down and [retry] max_attempts = 2: the report's first
    attempt is a transfer-out with outcome 4 (to be retried), the second 8 (given up), each
    with the reason; include_patient_id puts the film's Patient ID in the transfer-in and the
    transfer-out (the report's), and never in the journal."""
    from testbed.dicom_peers import ServiceProcess, write_service_config

    folder = tmp_path / "service"
    folder.mkdir()
    down = {"name": "down-pacs", "ae_title": "NOBODY", "host": LOCALHOST, "port": free_port()}
    config = write_service_config(folder, model=tiny_model, destinations=[down],
                                  tables={"retry": {"max_attempts": 2},
                                          "audit": {"include_patient_id": True},
                                          "workers": {"torch_threads": 1}})
    film = synthetic_radiograph(seed=7)
    film.PatientID = "PID-AUDIT-7"
    audit_path = folder / "spool" / "audit" / "audit.log"

    def transfers_out() -> list[dict]:
        return [r for r in read_records(audit_path) if r["pacs_ai"]["record"] == "transfer-out"]

    with ServiceProcess(config, folder / "serve.log") as service:
        [result] = SimulatedModality(service.port).send([film])
        assert result.acknowledged
        assert wait_until(lambda: len(transfers_out()) >= 2, 60), read_records(audit_path)
        journal = service.log_path.read_text()
    first, second = transfers_out()[:2]
    assert [first["EventIdentification"]["EventOutcomeIndicator"],
            second["EventIdentification"]["EventOutcomeIndicator"]] == [4, 8]
    assert (first["pacs_ai"]["given_up"], second["pacs_ai"]["given_up"]) == (False, True)
    assert second["pacs_ai"]["reason"].startswith("connection-failed: NOBODY@")
    assert second["pacs_ai"]["attempts"] == 2 and second["pacs_ai"]["destination"] == "down-pacs"
    assert participant(second, "110152")["UserID"] == "NOBODY"
    study, patient = second["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == str(film.StudyInstanceUID)
    assert patient["ParticipantObjectID"] == "PID-AUDIT-7"
    [transfer_in] = [r for r in read_records(audit_path) if r["pacs_ai"]["record"] == "transfer-in"
                     and r["pacs_ai"]["status"] == "0x0000"
                     and participant(r, "110153")["UserID"] == "MODALITY"]
    assert transfer_in["ParticipantObjectIdentification"][1]["ParticipantObjectID"] == \
        "PID-AUDIT-7"
    assert "PID-AUDIT-7" not in journal



def test_no_audit_file_when_the_trail_is_off(tmp_path, tiny_model):
    from testbed.dicom_peers import ServiceProcess, write_service_config

    config = write_service_config(tmp_path, model=tiny_model,
                                  tables={"audit": {"enabled": False}})
    with ServiceProcess(config, tmp_path / "serve.log") as service:
        [result] = SimulatedModality(service.port).send([synthetic_radiograph(seed=8)])
        assert result.acknowledged
    assert not (tmp_path / "spool" / "audit").exists()
    [started] = [e for e in service.events() if e.get("event") == "service_started"]
    assert started["audit_log"] is None


# --- the whole path with real peers: DCMTK storescu -> pacs-ai serve -> Orthanc -------------------

@pytest.mark.real_peer
def test_real_peers_transfer_in_out_and_a_refused_caller_are_audited(tmp_path, tiny_model):
    """storescu sends a film to `pacs-ai serve`, which reports to Orthanc; echoscu calls with an
    AE title the listener does not allow. The audit file holds the film's transfer-in (the
    AE title, address, its UIDs, outcome 0), the report's transfer-out to Orthanc (the SR
    Orthanc stored, outcome 0) and the refused caller as a security alert; the journal-side
    log holds no audit record."""
    from testbed.dicom_peers import ServiceProcess, write_service_config
    from testbed.environment import SAMPLE_DICOMS, require_tool
    from testbed.real_peers import (Modality, Orthanc, echoscu, orthanc_destination, renamed_copy,
                                    storescu)
    from tests.test_real_peers import stored_reports_for

    require_tool("Orthanc")
    with Orthanc(tmp_path / "orthanc", modalities=[Modality("PACS_AI", 104)]) as orthanc:
        folder = tmp_path / "service"
        folder.mkdir()
        config = write_service_config(
            folder, model=tiny_model, destinations=[orthanc_destination(orthanc)],
            tables={"workers": {"torch_threads": 1},
                    "listener": {"allowed_calling_ae_titles": ["XRAY_ROOM_1", "MODALITY"]}})
        film = renamed_copy(SAMPLE_DICOMS / "cr_normal_pa_12bit.dcm", tmp_path / "film.dcm")
        source = pydicom.dcmread(film, stop_before_pixels=True)
        audit_path = folder / "spool" / "audit" / "audit.log"
        with ServiceProcess(config, folder / "serve.log") as service:
            run = storescu(service.port, [film], called_ae="PACS_AI", calling_ae="XRAY_ROOM_1")
            assert run.acknowledged == [str(film)], run.output
            refused = echoscu(service.port, called_ae="PACS_AI", calling_ae="INTRUDER")
            assert refused.returncode != 0
            reports: list[dict] = []
            assert wait_until(lambda: reports.extend(stored_reports_for(
                orthanc, str(source.StudyInstanceUID), str(source.SOPInstanceUID))) or reports,
                90, interval=0.3), "no report at Orthanc"

            def by_kind(kind: str) -> list[dict]:
                return [r for r in read_records(audit_path) if r["pacs_ai"]["record"] == kind]

            assert wait_until(lambda: by_kind("transfer-out"), 10)
            journal = service.log_path.read_text()
        records = read_records(audit_path)  # after the stop: application-stop written too
    print(json.dumps(records, indent=1)[:6000])

    kinds = [r["pacs_ai"]["record"] for r in records]
    assert kinds[0] == "application-start" and kinds[-1] == "application-stop"
    [transfer_in] = [r for r in by_kind("transfer-in")
                     if participant(r, "110153")["UserID"] == "XRAY_ROOM_1"]
    assert transfer_in["EventIdentification"]["EventOutcomeIndicator"] == 0
    assert transfer_in["pacs_ai"]["status"] == "0x0000"
    assert participant(transfer_in, "110153")["NetworkAccessPointID"] == "127.0.0.1"
    assert participant(transfer_in, "110152")["UserID"] == "PACS_AI"
    [study] = transfer_in["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == str(source.StudyInstanceUID)
    assert study["ParticipantObjectDescription"]["SOPClass"] == [{
        "UID": str(source.SOPClassUID), "NumberOfInstances": 1,
        "Instance": [{"UID": str(source.SOPInstanceUID)}]}]
    assert study["ParticipantObjectDetail"][0]["value"] == str(source.SeriesInstanceUID)

    [transfer_out] = [r for r in by_kind("transfer-out") if r["pacs_ai"]["object"] == "report"]
    assert transfer_out["EventIdentification"]["EventOutcomeIndicator"] == 0
    assert transfer_out["pacs_ai"]["destination"] == "orthanc"
    assert transfer_out["pacs_ai"]["source_sop_instance_uid"] == str(source.SOPInstanceUID)
    destination = participant(transfer_out, "110152")
    assert (destination["UserID"], destination["NetworkAccessPointID"]) == (orthanc.ae_title,
                                                                            "127.0.0.1")
    [report_object] = transfer_out["ParticipantObjectIdentification"]
    assert report_object["ParticipantObjectID"] == str(source.StudyInstanceUID)
    [stored_report] = reports
    assert report_object["ParticipantObjectDescription"]["SOPClass"][0]["Instance"] == [
        {"UID": stored_report["SOPInstanceUID"]}]

    [alert] = by_kind("security-alert")
    assert alert["pacs_ai"]["reason"] == "calling-ae-not-allowed"
    assert participant(alert, "110153")["UserID"] == "INTRUDER"
    assert participant(alert, "110153")["NetworkAccessPointID"] == "127.0.0.1"
    starts = {r["pacs_ai"]["association"] for r in by_kind("association-start")}
    assert transfer_in["pacs_ai"]["association"] in starts
    assert "EventIdentification" not in journal  # the audit trail is not in the journal
