"""The heat map between real peers: DCMTK's storescu sends a pneumonia film to `pacs-ai serve`
(the shipped model, which gives maps) and Orthanc stores what comes back: the SR with its
region and the heat-map Secondary Capture, checked through Orthanc's REST API, dciodvfy, dsrdump
and dcmj2pnm. A kill -9 between the two deliveries loses neither, and sending the film again,
even to a service that has forgotten it, gives the same two instances, not new ones.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from pacs_ai.config import default_model_path
from pacs_ai.model import heatmap
from pacs_ai.model.intended_use import site_model_info
from pacs_ai.model.model import PneumoniaModel
from pacs_ai.model.site_threshold import binding_keys
from pacs_ai.report.heatmap_image import picture_size
from pacs_ai.report.report import report_summary, site_settings_part
from pacs_ai.report.uids import heatmap_uid, report_uid
from testbed.dicom_peers import ServiceProcess, wait_until, write_service_config
from testbed.environment import FAULT_HOOKS_PYTHONPATH, REPO_ROOT, SAMPLE_DICOMS, require_tool
from testbed.real_peers import (Modality, Orthanc, orthanc_destination, renamed_copy, spool_jobs,
                                storescu)
from tests.dicom_tools import DSRDUMP_NO_UTF8_VR_CHECK, run_dciodvfy, run_dsrdump

pytestmark = pytest.mark.real_peer

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PNEUMONIA_SAMPLE = SAMPLE_DICOMS / "cr_pneumonia_pa_12bit_mono1.dcm"
TIMEOUT_S = 120
# every film is classified: the synthetic UIDs of the copies carry the samples' ages, and the
# check here is the heat map, not the intended-use filters (1.0: the gate never abstains; bound
# to the shipped file, as a threshold on its score belongs to it)
OPEN_MODEL = {"min_age_years": 0, "max_age_years": 150, "ood_threshold": 1.0}


@functools.cache
def open_model_table() -> dict:
    return {**OPEN_MODEL, **binding_keys(PneumoniaModel.load(default_model_path()))}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    require_tool("Orthanc")
    with Orthanc(tmp_path_factory.mktemp("orthanc"),
                 modalities=[Modality("PACS_AI", 104)]) as pacs:
        yield pacs


def service_config(folder: Path, orthanc: Orthanc) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_service_config(folder, model=default_model_path(),
                                destinations=[orthanc_destination(orthanc)],
                                tables={"workers": {"torch_threads": 1},
                                        "model": open_model_table()})


def study_objects(orthanc: Orthanc, study_uid: str) -> dict[str, list[str]]:
    """SOP Instance UIDs of the study's SRs and Secondary Captures at Orthanc (a UID stored
    twice would show twice)."""
    return {"sr": orthanc.study_sop_instance_uids(study_uid, modality="SR"),
            "sc": [tags["SOPInstanceUID"] for tags in orthanc.study_instances(study_uid)
                   if tags.get("SOPClassUID") == SECONDARY_CAPTURE]}


def fetch(orthanc: Orthanc, sop_instance_uid: str, folder: Path) -> Path:
    path = folder / f"{sop_instance_uid}.dcm"
    path.write_bytes(orthanc.instance_file(orthanc.find_instance(sop_instance_uid)))
    return path


def test_kill_9_between_the_two_deliveries_loses_neither_and_a_resend_duplicates_nothing(
        orthanc, tmp_path):
    film = renamed_copy(PNEUMONIA_SAMPLE, tmp_path / "film.dcm")
    source = pydicom.dcmread(film, stop_before_pixels=True)
    study = str(source.StudyInstanceUID)
    # the UIDs the report and the image get at this site's settings (pacs_ai.report.uids)
    info = site_model_info(PneumoniaModel.load(default_model_path()).info,
                           min_age_years=OPEN_MODEL["min_age_years"],
                           max_age_years=OPEN_MODEL["max_age_years"],
                           ood_threshold=OPEN_MODEL["ood_threshold"])
    site = site_settings_part(info)
    assert site is not None  # OPEN_MODEL differs from the file's age range
    expected_sr = report_uid(str(source.SOPInstanceUID), info.name, info.version, None, site)
    expected_sc = heatmap_uid(str(source.SOPInstanceUID), info.name, info.version, site)

    # 1. the service dies (SIGKILL) right after Orthanc stored the report, before the image
    config = service_config(tmp_path / "service", orthanc)
    flag = tmp_path / "kill-between-deliveries"
    flag.touch()
    env = {"PYTHONPATH": FAULT_HOOKS_PYTHONPATH,
           "PACS_AI_FAULT_KILL_BETWEEN_DELIVERIES": str(flag)}
    with ServiceProcess(config, tmp_path / "serve-1.log", env=env) as service:
        sent = storescu(service.port, [film], called_ae="PACS_AI", calling_ae="XRAY_ROOM_1")
        print(sent.output)
        assert sent.acknowledged == [str(film)], sent.output
        assert wait_until(lambda: service.process.poll() is not None, TIMEOUT_S), \
            "the fault hook did not kill the service"
        assert service.process.returncode == -9
    assert not flag.exists()
    stored = study_objects(orthanc, study)
    print("after the kill:", stored)
    assert stored == {"sr": [expected_sr], "sc": []}

    # 2. restarted: the heat-map image goes out, the report is not sent again
    with ServiceProcess(config, tmp_path / "serve-2.log") as service:
        def delivered() -> list[dict]:
            return [event for event in service.events()
                    if event.get("event") == "report_delivered"]

        assert wait_until(delivered, TIMEOUT_S), (tmp_path / "serve-2.log").read_text()[-3000:]
        # a report sent again would go first (the queue sends a job's report before its image)
        assert [event.get("object") for event in delivered()] == ["heatmap"]
        assert wait_until(lambda: spool_jobs(tmp_path / "service" / "spool")[
            str(source.SOPInstanceUID)].state == "done", 30)
    assert study_objects(orthanc, study) == {"sr": [expected_sr], "sc": [expected_sc]}

    # 3. the same film to a service with an empty spool: the same two UIDs, nothing new
    with ServiceProcess(service_config(tmp_path / "fresh", orthanc),
                        tmp_path / "serve-3.log") as fresh:
        sent = storescu(fresh.port, [film], called_ae="PACS_AI", calling_ae="XRAY_ROOM_1")
        assert sent.acknowledged == [str(film)], sent.output
        assert wait_until(lambda: len([e for e in fresh.events()
                                       if e.get("event") == "report_delivered"]) == 2,
                          TIMEOUT_S), (tmp_path / "serve-3.log").read_text()[-3000:]
    assert study_objects(orthanc, study) == {"sr": [expected_sr], "sc": [expected_sc]}

    # what Orthanc holds is valid, and says the same thing in both objects
    sr_path, sc_path = fetch(orthanc, expected_sr, tmp_path), fetch(orthanc, expected_sc, tmp_path)
    for path in (sr_path, sc_path):
        validated = run_dciodvfy(path)
        print(validated.report())
        assert validated.errors == [], validated.output
    dumped = run_dsrdump(sr_path)
    print(dumped.report())
    assert dumped.returncode == 0 and dumped.errors == [], dumped.output
    assert [w for w in dumped.warnings if w != DSRDUMP_NO_UTF8_VR_CHECK] == [], dumped.output
    assert "TID 1410" in dumped.stdout
    summary = report_summary(pydicom.dcmread(sr_path))
    assert summary["finding"] == "pneumonia" and summary["region"] is not None
    image = pydicom.dcmread(sc_path)
    assert image.StudyInstanceUID == source.StudyInstanceUID
    assert image.PatientID == source.PatientID and image.PatientName == source.PatientName
    assert image.BurnedInAnnotation == "YES"
    check_rendered_colour(sc_path, summary["region"], source, tmp_path)


def check_rendered_colour(path: Path, region, source, folder: Path) -> None:
    """dcmj2pnm's PNG of the stored image: colour on the film part, all of the SR's region
    coloured (the map is shown from SHOWN_FROM, the region is its >= 0.5 part)."""
    png = folder / "stored-heatmap.png"
    completed = subprocess.run([require_tool("dcmj2pnm"), "--write-png", str(path), str(png)],
                               capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(np.int16)
    rows, film_columns = picture_size(int(source.Rows), int(source.Columns))
    # the scale's strip beside the film, the words' band below it: neither covers the film
    assert pixels.shape[0] > rows and pixels.shape[1] > film_columns
    colour = (pixels.max(axis=2) - pixels.min(axis=2)) > 8
    film_colour = colour[:rows, :film_columns]
    assert 0 < film_colour.sum() < 0.5 * film_colour.size
    scale = np.array([film_columns / int(source.Columns), rows / int(source.Rows)])
    inside = heatmap.region_mask(np.asarray(region) * scale, rows, film_columns)
    share = (inside & film_colour).sum() / inside.sum()
    print(f"region pixels coloured in Orthanc's copy: {share:.2%}")
    assert share >= 0.95


def test_show_heatmaps_says_why_the_default_outbox_has_none_and_renders_them_from_the_pacs(
        orthanc, tmp_path):
    """Issue 23 item 8: with the default keep_reports = false, scripts/show-heatmaps.sh found
    nothing in the spool's outbox and exited 0. It now exits 1 and says why; given the heat-map
    image taken from the PACS, as its message suggests, it renders it."""
    require_tool("dcmj2pnm")
    film = renamed_copy(PNEUMONIA_SAMPLE, tmp_path / "film.dcm")
    study = str(pydicom.dcmread(film, stop_before_pixels=True).StudyInstanceUID)
    folder = tmp_path / "service"
    folder.mkdir()
    config = write_service_config(
        folder, model=default_model_path(), destinations=[orthanc_destination(orthanc)],
        tables={"workers": {"torch_threads": 1}, "model": open_model_table(),
                "storage": {"keep_reports": False}})  # the default, as installed
    with ServiceProcess(config, folder / "serve.log") as service:
        sent = storescu(service.port, [film], called_ae="PACS_AI", calling_ae="XRAY_ROOM_1")
        assert sent.acknowledged == [str(film)], sent.output
        assert wait_until(lambda: [j.state for j in spool_jobs(folder / "spool").values()]
                          == ["done"], TIMEOUT_S), service.log_path.read_text()[-3000:]
    script = REPO_ROOT / "scripts" / "show-heatmaps.sh"
    outbox = subprocess.run(["bash", str(script), str(folder / "spool" / "outbox"),
                             str(tmp_path / "png")], capture_output=True, text=True)
    assert outbox.returncode == 1, outbox.stdout + outbox.stderr
    assert "keep_reports = true" in outbox.stderr and outbox.stdout == ""

    [image_uid] = study_objects(orthanc, study)["sc"]
    from_pacs = tmp_path / "from-pacs"
    from_pacs.mkdir()
    fetch(orthanc, image_uid, from_pacs)
    rendered = subprocess.run(["bash", str(script), str(from_pacs), str(tmp_path / "png")],
                              capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    assert rendered.stdout.split() == [str(tmp_path / "png" / f"{image_uid}.png")]
