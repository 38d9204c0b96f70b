"""pacs-ai between independent DICOM implementations: DCMTK's echoscu/storescu as the modality,
Orthanc as the PACS, `pacs-ai serve` as a real subprocess in between.

One service and one Orthanc serve the whole module (they start in about two seconds, but the
tests do not need separate ones): every test sends instances of its own (fresh UIDs where the
same sample is sent twice) and looks at its own studies only. Every report checked here is the
file Orthanc stored, fetched back through its REST API, and goes through dciodvfy and dsrdump.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID

from testbed.dicom_peers import ServiceProcess, wait_until, write_service_config
from testbed.environment import SAMPLE_DICOMS, require_tool
from testbed.real_peers import (Modality, Orthanc, echoscu, orthanc_destination, propose_as_stored,
                                renamed_copy, spool_jobs, storescu, storescu_many)
from tests.dicom_tools import DSRDUMP_NO_UTF8_VR_CHECK, run_dciodvfy, run_dsrdump

pytestmark = pytest.mark.real_peer

SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
REPORT_TIMEOUT_S = 90
MANIFEST = json.loads((SAMPLE_DICOMS / "manifest.json").read_text())["files"]
OK_SAMPLES = [entry for entry in MANIFEST if entry["expected_status"] == "ok"]


def one_sample_per_transfer_syntax() -> list[dict]:
    chosen: dict[str, dict] = {}
    for entry in OK_SAMPLES:
        chosen.setdefault(entry["transfer_syntax"], entry)
    return list(chosen.values())


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    require_tool("Orthanc")
    with Orthanc(tmp_path_factory.mktemp("orthanc"),
                 modalities=[Modality("PACS_AI", 104)]) as pacs:
        yield pacs


@pytest.fixture(scope="module")
def service(tmp_path_factory, orthanc, tiny_model):
    folder = tmp_path_factory.mktemp("service")
    config = write_service_config(folder, model=tiny_model,
                                  destinations=[orthanc_destination(orthanc)],
                                  tables={"workers": {"torch_threads": 1}})
    with ServiceProcess(config, folder / "serve.log") as running:
        yield running
        assert running.process.poll() is None, "the service exited during the tests"


def spool_of(service: ServiceProcess) -> Path:
    return service.config_path.parent / "spool"


def received_transfer_syntaxes(service: ServiceProcess) -> dict[str, str]:
    """SOP Instance UID -> transfer syntax the listener received it in (from its log)."""
    return {event["sop_instance_uid"]: event["transfer_syntax"] for event in service.events()
            if event.get("event") == "instance_received"}


def stored_reports_for(orthanc: Orthanc, study_uid: str, source_uid: str) -> list[dict]:
    """SR instances Orthanc holds in the study that reference the source image."""
    reports = []
    for tags in orthanc.study_instances(study_uid):
        if not str(tags.get("SOPClassUID", "")).startswith(SR_CLASS_PREFIX):
            continue
        evidence = tags.get("CurrentRequestedProcedureEvidenceSequence") or []
        referenced = {sop.get("ReferencedSOPInstanceUID") for study in evidence
                      for series in study.get("ReferencedSeriesSequence", [])
                      for sop in series.get("ReferencedSOPSequence", [])}
        if source_uid in referenced:
            reports.append(tags)
    return reports


def wait_for_reports(orthanc: Orthanc, sources: list[pydicom.Dataset]) -> dict[str, list[dict]]:
    """Wait until Orthanc holds a report for every source; the reports per source UID."""
    found: dict[str, list[dict]] = {}

    def all_there() -> bool:
        for source in sources:
            uid = str(source.SOPInstanceUID)
            if not found.get(uid):
                found[uid] = stored_reports_for(orthanc, str(source.StudyInstanceUID), uid)
        return all(found.values())

    wait_until(all_there, REPORT_TIMEOUT_S, interval=0.3)
    missing = [uid for uid, reports in found.items() if not reports]
    assert not missing, f"no report at the PACS within {REPORT_TIMEOUT_S} s for {missing}"
    return found


def check_stored_report(orthanc: Orthanc, report_tags: dict, folder: Path) -> pydicom.Dataset:
    """Fetch the SR Orthanc stored, run dciodvfy and dsrdump on it, print their warnings."""
    orthanc_id = orthanc.find_instance(report_tags["SOPInstanceUID"])
    assert orthanc_id is not None
    path = folder / f"{report_tags['SOPInstanceUID']}.dcm"
    path.write_bytes(orthanc.instance_file(orthanc_id))
    validated = run_dciodvfy(path)
    print(validated.report())
    assert validated.errors == [], validated.output
    dumped = run_dsrdump(path)
    print(dumped.report())
    assert dumped.returncode == 0 and dumped.errors == [], dumped.output
    content_tree_warnings = [w for w in dumped.warnings if w != DSRDUMP_NO_UTF8_VR_CHECK]
    assert content_tree_warnings == [], dumped.output
    assert "Imaging Measurement Report" in dumped.stdout
    return pydicom.dcmread(path)


def assert_reports_in_image_studies(orthanc: Orthanc, sources: list[pydicom.Dataset],
                                    folder: Path) -> None:
    """Exactly one report per source, in the source's study, valid for dciodvfy and dsrdump."""
    reports = wait_for_reports(orthanc, sources)
    for source in sources:
        uid = str(source.SOPInstanceUID)
        assert len(reports[uid]) == 1, f"{uid}: {len(reports[uid])} reports at the PACS"
        stored = check_stored_report(orthanc, reports[uid][0], folder)
        assert stored.StudyInstanceUID == source.StudyInstanceUID
        assert stored.PatientID == source.PatientID
        assert stored.SeriesInstanceUID != source.SeriesInstanceUID


# --- C-ECHO -----------------------------------------------------------------------------------

def test_echoscu_gets_success(service):
    completed = echoscu(service.port, called_ae="PACS_AI", calling_ae="XRAY_ROOM_1")
    print(completed.stdout + completed.stderr)
    assert completed.returncode == 0, completed.stderr
    assert "Received Echo Response (Success)" in completed.stdout + completed.stderr


# --- C-STORE: each transfer syntax proposed as stored ---------------------------------------

@pytest.mark.parametrize("entry", one_sample_per_transfer_syntax(),
                         ids=lambda entry: entry["transfer_syntax_name"])
def test_each_transfer_syntax_proposed_as_stored_is_received_as_is_and_reported(
        entry, service, orthanc, tmp_path):
    """storescu offers the file only in its own syntax: the listener must take it as it is
    (no conversion possible), and the report must land in the image's study at Orthanc."""
    path = SAMPLE_DICOMS / entry["file"]
    options = propose_as_stored([path], tmp_path / "as-stored.cfg")
    run = storescu(service.port, [path], called_ae="PACS_AI", calling_ae="XRAY_ROOM_1",
                   extra=options)
    print(run.output)
    assert run.acknowledged == [str(path)], run.output
    assert received_transfer_syntaxes(service)[entry["sop_instance_uid"]] == \
        entry["transfer_syntax"]
    source = pydicom.dcmread(path, stop_before_pixels=True)
    assert_reports_in_image_studies(orthanc, [source], tmp_path)


# --- C-STORE: only uncompressed syntaxes proposed ----------------------------------------------

UNCOMPRESSED_OPTIONS = {"implicit-only": "-xi", "explicit-little-first": "-xe",
                        "explicit-big-first": "-xb"}


@pytest.mark.parametrize("option", UNCOMPRESSED_OPTIONS.values(), ids=UNCOMPRESSED_OPTIONS.keys())
def test_storescu_proposing_only_uncompressed_syntaxes(option, service, orthanc, tmp_path):
    """The uncompressed samples (explicit, implicit and deflated, which storescu inflates) sent
    with only uncompressed transfer syntaxes on offer: each is received uncompressed and
    reported. Fresh UIDs, so each option's run is new to the service."""
    originals = [SAMPLE_DICOMS / name for name in (
        "cr_normal_pa_12bit.dcm", "cr_normal_pa_12bit_implicit_vr.dcm",
        "cr_pneumonia_pa_12bit_deflated.dcm", "dx_pneumonia_pa_14bit_for_processing.dcm")]
    copies = [renamed_copy(path, tmp_path / f"copy-{index}.dcm")
              for index, path in enumerate(originals)]
    run = storescu(service.port, copies, called_ae="PACS_AI", calling_ae="XRAY_ROOM_2",
                   extra=[option])
    print(run.output)
    assert sorted(run.acknowledged) == sorted(map(str, copies)), run.output
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in copies]
    syntaxes = received_transfer_syntaxes(service)
    for source in sources:
        received = UID(syntaxes[str(source.SOPInstanceUID)])
        assert not received.is_compressed and not received.is_deflated, received
        if option == "-xi":
            assert received == pydicom.uid.ImplicitVRLittleEndian
    assert_reports_in_image_studies(orthanc, sources, tmp_path)


# --- C-STORE: a whole folder, and several associations at once ----------------------------------

def test_storescu_sends_the_sample_folder_every_file_gets_its_outcome(service, orthanc, tmp_path):
    """The sample folder (copied with fresh UIDs) in one association, each file proposed in its
    stored syntax (storescu's default would offer compressed files uncompressed as well and
    then fail to convert JPEG-LS itself, a DCMTK limit and not the listener's). Films the model is for are reported at Orthanc; the rest are either
    refused at the door (a SOP class the listener does not take: no presentation context), or
    refused with an error status (the broken ones hold fewer pixel bytes than their headers
    declare), or received and recorded as skipped with the manifest's reason, never
    reported."""
    folder = tmp_path / "folder"
    folder.mkdir()
    copies: dict[str, tuple[dict, Path]] = {}
    for index, entry in enumerate(MANIFEST):
        if entry["file"] == "broken_not_dicom.dcm":
            continue  # not DICOM: storescu itself refuses to send it
        copy = renamed_copy(SAMPLE_DICOMS / entry["file"], folder / f"{index:02d}.dcm")
        copies[str(copy)] = (entry, copy)
    options = propose_as_stored([copy for _, copy in copies.values()], tmp_path / "folder.cfg")
    run = storescu(service.port, [folder], called_ae="PACS_AI", calling_ae="XRAY_ROOM_3",
                   extra=options)
    print(run.output)
    statuses = dict(run.responses)
    sources = []
    for path, (entry, copy) in copies.items():
        source = pydicom.dcmread(copy, stop_before_pixels=True)
        if entry["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.2":  # CT: not a listener class
            assert statuses.get(path) is None, f"{entry['file']}: {statuses.get(path)}"
            continue
        if entry["expected_status"] == "error":  # refused before Success (issue 14)
            assert statuses.get(path) not in (None, "Success"), \
                f"{entry['file']}: {statuses.get(path)}"
            continue
        assert statuses.get(path) == "Success", f"{entry['file']}: {statuses.get(path)}"
        if entry["expected_status"] == "ok":
            sources.append(source)
    assert_reports_in_image_studies(orthanc, sources, tmp_path)

    uids = [str(pydicom.dcmread(copy, stop_before_pixels=True).SOPInstanceUID)
            for _, copy in copies.values()]

    def settled() -> bool:
        jobs = spool_jobs(spool_of(service))
        return all(uid not in jobs or jobs[uid].state in ("done", "skipped", "failed")
                   for uid in uids)

    assert wait_until(settled, 60), "the folder's jobs did not settle within 60 s"
    jobs = spool_jobs(spool_of(service))
    for entry, copy in copies.values():
        if entry["expected_status"] == "ok" or entry["sop_class_uid"].endswith(".1.2"):
            continue
        source = pydicom.dcmread(copy, stop_before_pixels=True)
        if entry["expected_status"] == "error":
            assert str(source.SOPInstanceUID) not in jobs, entry["file"]
            continue
        job = jobs[str(source.SOPInstanceUID)]
        expected_state = {"skipped": "skipped"}[entry["expected_status"]]
        print(f"{entry['file']}: {job.state} {job.reason}")
        assert job.state == expected_state, (entry["file"], job)
        assert (job.reason or "").startswith(entry["expected_reason"]), (entry["file"], job)
        assert not stored_reports_for(orthanc, str(source.StudyInstanceUID),
                                      str(source.SOPInstanceUID))


def test_several_storescu_associations_at_once(service, orthanc, tmp_path):
    """Four storescu processes, each its own association, send compressed images (proposed as
    stored) at the same time: every image acknowledged, every report at the PACS exactly
    once."""
    templates = [SAMPLE_DICOMS / name for name in (
        "cr_normal_pa_8bit_jpeg_baseline.dcm", "cr_normal_pa_12bit_j2k_lossy.dcm",
        "dx_normal_pa_12bit_jpegls_near_lossless.dcm")]
    batches = []
    for association in range(4):
        batch = [renamed_copy(templates[(association + i) % len(templates)],
                              tmp_path / f"a{association}-{i}.dcm") for i in range(3)]
        batches.append(batch)
    options = propose_as_stored(templates, tmp_path / "as-stored.cfg")
    runs = storescu_many(service.port, batches, called_ae="PACS_AI", calling_ae="XRAY_ROOM_4",
                         extra=options)
    for run, batch in zip(runs, batches):
        print(run.output)
        assert sorted(run.acknowledged) == sorted(map(str, batch)), run.output
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for batch in batches
               for path in batch]
    assert_reports_in_image_studies(orthanc, sources, tmp_path)
    print(f"sent {len(sources)}, acknowledged {sum(len(r.acknowledged) for r in runs)}, "
          f"reported {len(sources)} (one each), lost 0")
