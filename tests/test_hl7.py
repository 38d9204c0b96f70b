"""HL7 v2 ORU^R01 to a RIS (kind = "hl7"): the message made from a report, checked with hl7apy
at its strict level, and the transport against real MLLP peers: the test RIS of
testbed.hl7_peers (AA, AE, AR, no answer, a closed connection, TLS) and hl7apy's own
MLLPServer (one message per connection). The service paths are in test_hl7_service.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pydicom
import pytest
from hl7apy.mllp import AbstractHandler, MLLPRequestHandler, MLLPServer

from pacs_ai.config import ConfigError, Destination, Hl7Target, ReportConfig, parse_config
from pacs_ai.deliver.hl7_encoding import NotEncodable
from pacs_ai.deliver.hl7_message import (MessageNotBuilt, build_oru, hl7_datetime, oru_bytes,
                                         parse_ack)
from pacs_ai.deliver.hl7_transport import Hl7Transport
from pacs_ai.model.model import ModelInfo
from pacs_ai.report.report import build_report
from pacs_ai.report.report_facts import read_report_facts, redact, report_facts
from pacs_ai.report.uids import message_control_id
from testbed.dicom_peers import LOCALHOST, synthetic_radiograph
from testbed.hl7_peers import MllpReceiver, build_ack, check_message, decode, escaped

MODEL = ModelInfo(name="pacs-ai-pneumonia", version="1.4.2", threshold=0.42,
                  output_kind="logit", metadata={})
TARGET = Hl7Target(sending_facility="CHILDRENS", receiving_application="RIS",
                   receiving_facility="RADIOLOGY")
# Coding systems HL7 v2.5.1's table 0396 (as hl7apy has it) does not list, used on purpose:
# SNOMED CT as SCT, UCUM, the HL7 table 0485 as HL70485, and pacs-ai's local 99PACSAI
KNOWN_TABLE_WARNINGS = ("Value SCT not in table HL70396", "Value UCUM not in table HL70396",
                        "Value HL70485 not in table HL70396",
                        "Value 99PACSAI not in table HL70396")


def film(seed: int = 1, **header) -> pydicom.Dataset:
    source = synthetic_radiograph(seed=seed)
    for keyword, value in header.items():
        setattr(source, keyword, value)
    return source


def report_path(folder: Path, source: pydicom.Dataset, probability: float) -> Path:
    report = build_report(source, probability, MODEL)
    path = folder / f"{report.SOPInstanceUID}.dcm"
    report.save_as(path, enforce_file_format=True)
    return path


def destination(port: int, **keys) -> Destination:
    return Destination(name="ris", ae_title="", host=LOCALHOST, port=port,
                       timeout_seconds=keys.pop("timeout_seconds", 5), tls=keys.pop("tls", None),
                       hl7=dataclasses.replace(TARGET, charset=keys.pop("charset", "UTF-8")))


# --- the message ----------------------------------------------------------------------------

def test_a_pneumonia_report_becomes_a_valid_oru_with_its_order_finding_and_priority(tmp_path):
    source = film(PatientName="O'Brien^Anne|Marie^^Dr^Jr", IssuerOfPatientID="HOSP&MRN")
    sr = pydicom.dcmread(report_path(tmp_path, source, 0.87))
    facts = report_facts(sr)
    message = build_oru(facts, TARGET, "S")
    text = oru_bytes(message).decode("utf-8")
    parsed, errors, warnings = check_message(text)
    assert errors == [], errors
    # no length or other warning: only the coding systems chosen on purpose
    assert all(any(known in w for known in KNOWN_TABLE_WARNINGS) for w in warnings), warnings
    # read back with hl7apy's grouped, strict parse: the ORU^R01 structure
    result = parsed.ORU_R01_PATIENT_RESULT
    order = result.ORU_R01_ORDER_OBSERVATION
    msh = parsed.msh
    assert msh.msh_3.to_er7() == "pacs-ai"
    assert (msh.msh_4.to_er7(), msh.msh_5.to_er7(), msh.msh_6.to_er7()) == (
        "CHILDRENS", "RIS", "RADIOLOGY")
    assert msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and msh.msh_12.to_er7() == "2.5.1"
    assert msh.msh_10.to_er7() == message_control_id(str(sr.SOPInstanceUID))
    assert msh.msh_18.to_er7() == "UNICODE UTF-8"
    software = [(s.sft_3.to_er7(), s.sft_2.to_er7()) for s in parsed.children.get("SFT")]
    assert ("pacs-ai-pneumonia", "1.4.2") in software  # the model and its version
    pid = result.ORU_R01_PATIENT.pid
    assert pid.pid_3.to_er7() == f"{source.PatientID}^^^{escaped('HOSP&MRN')}"
    # DICOM family^given^middle^prefix^suffix -> HL7 family^given^middle^suffix^prefix, with
    # the delimiter inside the given name escaped, not taken for a component
    assert pid.pid_5.to_er7() == f"O'Brien^{escaped('Anne|Marie')}^^Jr^Dr"
    assert (pid.pid_7.to_er7(), pid.pid_8.to_er7()) == ("20150101", "F")
    accession = str(source.AccessionNumber)
    assert order.orc.orc_1.to_er7() == "RE" and order.orc.orc_3.to_er7() == accession
    obr = order.obr
    assert obr.obr_3.to_er7() == accession and obr.obr_18.to_er7() == accession
    assert obr.obr_4.to_er7() == "399208008^Plain chest X-ray^SCT"
    assert obr.obr_7.to_er7().startswith("20240102101500")  # the film's study date and time
    assert obr.obr_25.to_er7() == "P" and obr.obr_27.to_er7() == "^^^^^S"
    assert order.ORU_R01_TIMING_QTY.tq1.tq1_9.to_er7() == "S^Stat^HL70485"
    observations = {o.obx.obx_3.to_er7().split("^")[0]: o.obx
                    for o in order.children.get("ORU_R01_OBSERVATION")}
    finding = observations["121071"]
    assert finding.obx_5.to_er7() == "233604007^Pneumonia^SCT" and finding.obx_8.to_er7() == "A"
    probability = observations["122157"]
    assert probability.obx_2.to_er7() == "NM" and probability.obx_8.to_er7() == "A"
    assert float(probability.obx_5.to_er7()) == pytest.approx(0.87, abs=1e-6)
    assert observations["111001"].obx_5.to_er7() == "pacs-ai-pneumonia"
    assert observations["111003"].obx_5.to_er7() == "1.4.2"
    assert observations["111002"].obx_5.to_er7() == "threshold=0.42"
    assert observations["110180"].obx_5.to_er7() == str(source.StudyInstanceUID)
    assert observations["SR-UID"].obx_5.to_er7() == str(sr.SOPInstanceUID)
    assert observations["FILM-UID"].obx_5.to_er7() == str(source.SOPInstanceUID)
    assert {o.obx_11.to_er7() for o in observations.values()} == {"P"}  # preliminary


def test_a_normal_report_says_normal_and_carries_no_priority(tmp_path):
    facts = read_report_facts(report_path(tmp_path, film(2), 0.1))
    text = oru_bytes(build_oru(facts, TARGET, "S")).decode()
    parsed, errors, _ = check_message(text)
    assert errors == []
    order = parsed.ORU_R01_PATIENT_RESULT.ORU_R01_ORDER_OBSERVATION
    assert "ORU_R01_TIMING_QTY" not in [c.name for c in order.children]  # never "routine"
    assert order.obr.obr_27.to_er7() == ""
    first = order.children.get("ORU_R01_OBSERVATION")[0].obx
    assert first.obx_5.to_er7() == "17621005^Normal^SCT" and first.obx_8.to_er7() == "N"


def test_priority_none_sends_a_pneumonia_result_without_one(tmp_path):
    facts = read_report_facts(report_path(tmp_path, film(3), 0.9))
    parsed, _, _ = check_message(oru_bytes(build_oru(facts, TARGET, None)).decode())
    order = parsed.ORU_R01_PATIENT_RESULT.ORU_R01_ORDER_OBSERVATION
    assert "ORU_R01_TIMING_QTY" not in [c.name for c in order.children]
    assert order.children.get("ORU_R01_OBSERVATION")[0].obx.obx_8.to_er7() == "A"


def test_the_same_report_gives_the_same_message_byte_for_byte(tmp_path):
    path = report_path(tmp_path, film(4), 0.6)
    first = oru_bytes(build_oru(read_report_facts(path), TARGET, "A"))
    again = oru_bytes(build_oru(read_report_facts(path), TARGET, "A"))
    assert first == again
    other = oru_bytes(build_oru(read_report_facts(report_path(tmp_path, film(5), 0.6)),
                                TARGET, "A"))
    ids = [parse_ack(build_ack(m.decode(), "AA")).control_id for m in (first, other)]
    assert ids[0] != ids[1] and all(len(i) == 20 for i in ids)


def test_a_film_without_an_accession_number_gets_no_message(tmp_path):
    facts = read_report_facts(report_path(tmp_path, film(6, AccessionNumber=""), 0.6))
    with pytest.raises(MessageNotBuilt, match="^no-accession-number: "):
        build_oru(facts, TARGET, "A")


def test_a_film_without_a_patient_id_gets_no_message(tmp_path):
    facts = read_report_facts(report_path(tmp_path, film(9, PatientID=""), 0.6))
    with pytest.raises(MessageNotBuilt, match="^no-patient-id: "):
        build_oru(facts, TARGET, "A")


def test_a_film_s_own_procedure_code_is_the_order_s_procedure(tmp_path):
    source = film(7)
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "RPID16", "RADLEX", "XR CHEST PA"
    source.ProcedureCodeSequence = [item]
    facts = read_report_facts(report_path(tmp_path, source, 0.6))
    parsed, _, _ = check_message(oru_bytes(build_oru(facts, TARGET, "A")).decode())
    assert parsed.ORU_R01_PATIENT_RESULT.ORU_R01_ORDER_OBSERVATION.obr.obr_4.to_er7() == \
        "RPID16^XR CHEST PA^RADLEX"


def test_a_peer_s_text_is_cleared_of_the_patient_s_identifiers(tmp_path):
    facts = read_report_facts(report_path(tmp_path, film(8, PatientName="Doe^Jane"), 0.6))
    said = f"Patient {facts.patient_id} (Doe, Jane) born 20150101 has no order ACC00008"
    assert redact(said, facts) == ("Patient <patient data> (<patient data>, <patient data>) "
                                   "born <patient data> has no order <patient data>")


def test_hl7_datetime_carries_the_offset():
    import datetime as dt
    moment = dt.datetime(2024, 1, 2, 10, 15, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    assert hl7_datetime(moment) == "20240102101500-0500"
    assert hl7_datetime(dt.date(2015, 1, 1)) == "20150101"


# --- the character set (charset): UTF-8, 8859/1 or ASCII ---------------------------------------

GERMAN = "Müller^Jürgen"  # ü: C3 BC in UTF-8, FC in ISO 8859-1, none in ASCII
REFUSED_TAIL = ", the destination's charset: not sent, as the RIS would show them garbled"


def german_report(folder: Path, seed: int = 40, **header) -> Path:
    header.setdefault("PatientName", GERMAN)
    header.setdefault("SpecificCharacterSet", "ISO_IR 100")
    return report_path(folder, film(seed, **header), 0.8)


@pytest.mark.parametrize("charset,msh_18,name,pid_5", [
    ("UTF-8", "UNICODE UTF-8", GERMAN, b"M\xc3\xbcller^J\xc3\xbcrgen"),
    ("8859/1", "8859/1", GERMAN, b"M\xfcller^J\xfcrgen"),
    ("ASCII", "ASCII", "Mueller^Juergen", b"Mueller^Juergen"),
])
def test_each_charset_encodes_the_message_and_states_it_in_msh_18(tmp_path, charset, msh_18,
                                                                  name, pid_5):
    facts = read_report_facts(german_report(tmp_path, PatientName=name))
    raw = oru_bytes(build_oru(facts, dataclasses.replace(TARGET, charset=charset), "A"))
    assert b"|" + pid_5 + b"|" in raw
    if charset != "UTF-8":
        assert b"\xc3" not in raw  # no UTF-8 sequence in a Latin-1 or ASCII message
    if charset == "ASCII":
        assert max(raw) < 0x80
    # a RIS reads it in the character set MSH-18 names, and it is a valid ORU^R01
    text, unreadable = decode(raw)
    assert unreadable == []
    parsed, errors, _ = check_message(text)
    assert errors == [], errors
    assert parsed.msh.msh_18.to_er7() == msh_18
    assert parsed.ORU_R01_PATIENT_RESULT.ORU_R01_PATIENT.pid.pid_5.to_er7() == name


@pytest.mark.parametrize("charset,name", [
    ("8859/1", "Иванов^Иван"),  # Cyrillic
    ("8859/1", "王^小明"),  # CJK
    ("ASCII", GERMAN),
])
def test_a_name_outside_the_charset_is_refused_naming_the_field_not_the_name(tmp_path, charset,
                                                                             name):
    facts = read_report_facts(german_report(tmp_path, PatientName=name,
                                            SpecificCharacterSet="ISO_IR 192"))
    message = build_oru(facts, dataclasses.replace(TARGET, charset=charset), "A")
    with pytest.raises(NotEncodable) as refused:
        oru_bytes(message)
    assert str(refused.value) == (f"hl7-encoding: PID-5 (patient name) has characters outside "
                                  f"{charset}{REFUSED_TAIL}")
    assert not any(part in str(refused.value) for part in name.split("^"))


def test_every_field_outside_the_charset_is_named(tmp_path):
    source = film(41, PatientName="Иванов^Иван", SpecificCharacterSet="ISO_IR 192")
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator = "RPID16", "RADLEX"
    item.CodeMeaning = "Рентген грудной клетки"
    source.ProcedureCodeSequence = [item]
    model = dataclasses.replace(MODEL, name="modèle-pneumonie")
    report = build_report(source, 0.8, model)
    path = tmp_path / "report.dcm"
    report.save_as(path, enforce_file_format=True)
    message = build_oru(read_report_facts(path), dataclasses.replace(TARGET, charset="ASCII"),
                        "A")
    with pytest.raises(NotEncodable) as refused:
        oru_bytes(message)
    assert str(refused.value) == (
        "hl7-encoding: SFT-3 (software product), SFT-4 (software binary ID), PID-5 (patient "
        "name), OBR-4 (procedure), OBX-5 (Algorithm Name) have characters outside ASCII"
        + REFUSED_TAIL)
    # the model's name fits 8859/1; the Cyrillic does not
    latin = build_oru(read_report_facts(path), dataclasses.replace(TARGET, charset="8859/1"),
                      "A")
    with pytest.raises(NotEncodable, match=r"^hl7-encoding: PID-5 \(patient name\), OBR-4 "
                                           r"\(procedure\) have characters outside 8859/1"):
        oru_bytes(latin)


def test_the_ack_is_read_in_the_destination_s_charset(tmp_path):
    message = oru_bytes(build_oru(read_report_facts(german_report(tmp_path)),
                                  dataclasses.replace(TARGET, charset="8859/1"), "A"))
    text, _ = decode(message)
    # A Latin-1 RIS's text whose bytes happen to be valid UTF-8 as well (C3 BC): read as
    # 8859/1 it is what the RIS wrote; read as UTF-8 it would be another text
    said = "Ã¼ rejected"
    ack = build_ack(text, "AE", said)
    assert said.encode("latin-1") in ack and b"|8859/1" in ack
    assert parse_ack(ack, "8859/1").text.startswith(said)
    assert parse_ack(ack, "UTF-8").text.startswith("ü rejected")  # what the charset changes
    # an ASCII RIS that answers in Latin-1 after all is still understood
    latin = build_ack(text, "AE", "Auftrag für Röntgen unbekannt", charset="8859/1")
    assert parse_ack(latin, "ASCII").text.startswith("Auftrag für Röntgen unbekannt")


# --- the config ------------------------------------------------------------------------------

def test_an_hl7_destination_and_the_priority_are_read(tmp_path):
    config = parse_config({"report": {"pneumonia_priority": "s"}, "destinations": [
        {"kind": "hl7", "name": "ris", "host": "ris.example.org", "port": 2575,
         "receiving_application": "RIS", "receiving_facility": "RAD",
         "sending_facility": "CHILDRENS", "processing_id": "t", "tls": True},
        {"kind": "hl7", "host": "10.0.0.5", "port": 6661}]}, base_dir=tmp_path)
    ris, plain = config.destinations
    assert config.report.pneumonia_priority == "S"
    assert ris.kind == "hl7" and not ris.takes_images and ris.tls is not None
    assert ris.hl7 == Hl7Target(sending_facility="CHILDRENS", receiving_application="RIS",
                                receiving_facility="RAD", processing_id="T")
    assert plain.name == "hl7@10.0.0.5:6661" and plain.where == "mllp://10.0.0.5:6661"
    assert parse_config({}, base_dir=tmp_path).report.pneumonia_priority == "A"


def test_routes_send_results_to_a_ris_like_to_any_destination(tmp_path):
    from pacs_ai.deliver.routing import RouteFacts, choose_route

    config = parse_config({
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "pacs", "port": 104},
                         {"kind": "hl7", "name": "ris", "host": "ris", "port": 2575}],
        "routes": [{"name": "er", "calling_ae_title": "ER_CR", "destinations": ["pacs", "ris"]}],
        "routing": {"default": ["pacs"]}}, base_dir=tmp_path)
    er = choose_route(config, RouteFacts("ER_CR", None, None, None))
    ward = choose_route(config, RouteFacts("WARD_DX", None, None, None))
    assert er.destinations == ("pacs", "ris") and ward.destinations == ("pacs",)


@pytest.mark.parametrize("written,charset,msh_18", [
    (None, "UTF-8", "UNICODE UTF-8"), ("UTF-8", "UTF-8", "UNICODE UTF-8"),
    ("UNICODE UTF-8", "UTF-8", "UNICODE UTF-8"), ("8859/1", "8859/1", "8859/1"),
    ("ascii", "ASCII", "ASCII"),
])
def test_an_hl7_destination_s_charset_is_read(tmp_path, written, charset, msh_18):
    block = {"kind": "hl7", "host": "ris", "port": 2575}
    if written is not None:
        block["charset"] = written
    [ris] = parse_config({"destinations": [block]}, base_dir=tmp_path).destinations
    assert ris.hl7.charset == charset and ris.hl7.msh_18 == msh_18


@pytest.mark.parametrize("data,message", [
    ({"destinations": [{"kind": "hl7", "host": "ris"}]},
     '[[destinations]] #1 port: is required: a kind = "hl7" destination needs'),
    ({"destinations": [{"kind": "hl7", "host": "ris", "port": 1, "ae_title": "RIS"}]},
     '[[destinations]] #1 ae_title: is not used by a kind = "hl7" destination'),
    ({"destinations": [{"kind": "hl7", "host": "ris", "port": 1,
                        "receiving_application": "RIS^X"}]},
     "[[destinations]] #1 receiving_application: must not contain the HL7 delimiters"),
    ({"destinations": [{"kind": "hl7", "host": "ris", "port": 1, "processing_id": "X"}]},
     "[[destinations]] #1 processing_id: 'X' is not one of 'p', 't', 'd'"),
    ({"destinations": [{"kind": "hl7", "host": "ris", "port": 1, "recieving_facility": "R"}]},
     "[[destinations]] #1: unknown key 'recieving_facility' (did you mean "
     "'receiving_facility'?)"),
    ({"destinations": [{"kind": "hl7", "host": "ris", "port": 1, "charset": "ISO-8859-1"}]},
     "[[destinations]] #1 charset: 'ISO-8859-1' is not one of 'UTF-8', '8859/1' (ISO 8859-1, "
     "Latin-1), 'ASCII' (as HL7 table 0211 names them in MSH-18)"),
    ({"destinations": [{"kind": "hl7", "host": "ris", "port": 1, "charset": 88591}]},
     "[[destinations]] #1 charset: expected a quoted string, got"),
    ({"destinations": [{"kind": "hl7", "host": "ris", "port": 1, "charset": "ASCII",
                        "sending_facility": "KLINIKUM MÜNCHEN"}]},
     "[[destinations]] #1 sending_facility: has characters outside ASCII, the destination's "
     "charset"),
    ({"report": {"pneumonia_priority": "urgent"}},
     "[report] pneumonia_priority: 'urgent' is not one of 's', 'a', 'none'"),
])
def test_hl7_mistakes_name_the_key(tmp_path, data, message):
    with pytest.raises(ConfigError) as error:
        parse_config(data, base_dir=tmp_path)
    assert str(error.value).startswith(message), str(error.value)
    assert "\n" not in str(error.value)  # one line


# --- the transport against real MLLP peers --------------------------------------------------

@pytest.fixture
def reports(tmp_path) -> list[Path]:
    return [report_path(tmp_path, film(20 + n), 0.3 + 0.2 * n) for n in range(3)]


def test_each_answer_is_an_outcome(reports):
    with MllpReceiver(["AA", "AE", "AR"], error_text="Order not found") as ris:
        connection = Hl7Transport(destination(ris.port), ReportConfig()).connect()
        try:
            results = [connection.store(path) for path in reports]
        finally:
            connection.close()
        ids = [message_control_id(read_report_facts(p).report_uid) for p in reports]
        assert results[0].stored and results[0].detail == f"AA (message {ids[0]})"
        assert not results[1].stored and not results[1].permanent
        assert results[1].detail.startswith("hl7-ae: Order not found") and ids[1] in \
            results[1].detail
        assert results[2].detail.startswith("hl7-ar: Order not found")
        assert [r.control_id for r in ris.received] == ids
        assert {r.connection for r in ris.received} == {1}  # one connection for the batch
        assert all(r.errors == [] for r in ris.received)


@pytest.mark.parametrize("action,detail", [
    ("none", "no-answer: no ACK from 127.0.0.1:{port} within 1 s"),
    ("close", "no-answer: 127.0.0.1:{port} closed the connection without an ACK"),
])
def test_a_lost_ack_closes_the_connection_and_the_rest_waits(reports, action, detail):
    with MllpReceiver([action]) as ris:
        connection = Hl7Transport(destination(ris.port, timeout_seconds=1)).connect()
        result = connection.store(reports[0])
        connection.close()
    assert not result.stored and not result.permanent
    assert result.detail.startswith(detail.format(port=ris.port)), result.detail
    assert not connection.is_open() and connection.lost_reason == result.detail


def test_the_ris_s_answer_is_recorded_without_the_patient_s_identifiers(reports):
    patient = read_report_facts(reports[0]).patient_id
    with MllpReceiver(["AE"], error_text=f"Unknown patient {patient}") as ris:
        connection = Hl7Transport(destination(ris.port)).connect()
        result = connection.store(reports[0])
        connection.close()
    assert patient not in result.detail
    assert result.detail.startswith("hl7-ae: Unknown patient <patient data>")


def test_no_ris_listening_is_a_connection_failure():
    from pacs_ai.deliver.transport import ConnectFailed
    from testbed.dicom_peers import free_port

    port = free_port()
    with pytest.raises(ConnectFailed, match=f"^connection-failed: 127.0.0.1:{port}: "):
        Hl7Transport(destination(port)).connect()


def test_a_ris_that_closes_after_each_answer_is_reconnected_to(reports):
    with MllpReceiver(one_message_per_connection=True) as ris:
        connection = Hl7Transport(destination(ris.port)).connect()
        results = [connection.store(path) for path in reports]
        connection.close()
    assert all(r.stored for r in results), results
    assert [r.connection for r in ris.received] == [1, 2, 3]


def test_hl7apy_s_own_mllp_server_takes_the_messages(reports):
    """The library's MLLPServer (it answers one message per connection): a RIS other than
    ours parses the message as an ORU^R01 and its ACK is understood."""
    seen: list[str] = []

    class Accept(AbstractHandler):
        def reply(self):
            seen.append(self.incoming_message)
            return "\x0b" + build_ack(self.incoming_message, "AA").decode() + "\x1c\r"

    server = MLLPServer(LOCALHOST, 0, {"ORU^R01^ORU_R01": (Accept,)}, timeout=5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        connection = Hl7Transport(destination(server.server_address[1])).connect()
        results = [connection.store(path) for path in reports[:2]]
        connection.close()
    finally:
        server.shutdown()
        server.server_close()
    assert all(r.stored for r in results), results
    assert len(seen) == 2 and all(check_message(m)[1] == [] for m in seen)


def test_mllp_over_tls_with_the_ris_s_ca(tmp_path, reports):
    from pacs_ai.config import TLSFiles
    from tests.tls_material import make_tls_material

    material = make_tls_material(tmp_path / "tls")
    stranger = make_tls_material(tmp_path / "tls", prefix="stranger-")
    with MllpReceiver(tls=material) as ris:
        trusted = Hl7Transport(destination(ris.port, tls=TLSFiles(ca_file=material.ca_cert)))
        connection = trusted.connect()
        assert connection.store(reports[0]).stored
        connection.close()
        untrusted = Hl7Transport(destination(ris.port, tls=TLSFiles(ca_file=stranger.ca_cert)))
        from pacs_ai.deliver.transport import ConnectFailed
        with pytest.raises(ConnectFailed, match="^tls-certificate: "):
            untrusted.connect()
    assert len(ris.received) == 1


# --- the character set on the wire ----------------------------------------------------------

def test_a_latin_1_ris_gets_latin_1_and_its_latin_1_answer_is_read(tmp_path):
    """The test RIS reads each message in the character set MSH-18 names and answers in it: the
    name arrives as the RIS stores it, the RIS's text comes back readable, the name it echoes
    cleared."""
    reports = [german_report(tmp_path, 42), german_report(tmp_path, 43)]
    with MllpReceiver(["AE"], error_text="Auftrag für Müller unbekannt") as ris:
        connection = Hl7Transport(destination(ris.port, charset="8859/1")).connect()
        try:
            refused, stored = [connection.store(path) for path in reports]
        finally:
            connection.close()
    assert refused.detail.startswith("hl7-ae: Auftrag für <patient data> unbekannt")
    assert stored.stored
    for message in ris.received:
        assert message.errors == [] and b"M\xfcller^J\xfcrgen" in message.raw
        assert message.field("PID", 5) == GERMAN and message.field("MSH", 18) == "8859/1"


def test_a_name_outside_the_charset_never_reaches_the_ris(tmp_path, capfd, caplog):
    name = "Иванов^Иван"
    path = german_report(tmp_path, 44, PatientName=name, SpecificCharacterSet="ISO_IR 192")
    with MllpReceiver() as ris:
        connection = Hl7Transport(destination(ris.port, charset="8859/1")).connect()
        try:
            result = connection.store(path)
            assert connection.is_open()  # the next message may go: this one was never sent
        finally:
            connection.close()
    assert not result.stored and result.permanent  # a retry would send the same name
    assert result.detail == ("hl7-encoding: PID-5 (patient name) has characters outside "
                             "8859/1" + REFUSED_TAIL)
    assert ris.received == []
    captured = capfd.readouterr()
    for seen in (result.detail, captured.out, captured.err, caplog.text):
        assert "Иванов" not in seen and "Иван" not in seen


def test_hl7apy_s_own_server_reading_latin_1_gets_the_name(tmp_path):
    """A RIS other than ours: hl7apy's MLLPServer set to read and answer ISO 8859-1."""
    seen: list[str] = []

    class Latin1(MLLPRequestHandler):
        encoding = "iso-8859-1"

    class Accept(AbstractHandler):
        def reply(self):
            seen.append(self.incoming_message)
            return "\x0b" + build_ack(self.incoming_message, "AA").decode("latin-1") + "\x1c\r"

    server = MLLPServer(LOCALHOST, 0, {"ORU^R01^ORU_R01": (Accept,)}, timeout=5,
                        request_handler_class=Latin1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        connection = Hl7Transport(destination(server.server_address[1],
                                              charset="8859/1")).connect()
        result = connection.store(german_report(tmp_path, 45))
        connection.close()
    finally:
        server.shutdown()
        server.server_close()
    assert result.stored, result
    [message] = seen
    parsed, errors, _ = check_message(message)
    assert errors == [] and parsed.msh.msh_18.to_er7() == "8859/1"
    assert parsed.ORU_R01_PATIENT_RESULT.ORU_R01_PATIENT.pid.pid_5.to_er7() == GERMAN
