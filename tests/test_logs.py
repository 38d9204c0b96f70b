"""Log set-up: JSON in the journal, and no patient-identifying values ever."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import logging, structlog
from pacs_ai.ops.logs import configure_logging
configure_logging(fmt="json")
logging.getLogger("pydicom").warning("Invalid value for VR DA: '19991231'")
structlog.get_logger().info("received", sop_instance_uid="1.2.3", PatientName="Doe^Jane",
                            patient_id="PID-4711", patient_birth_date="19991231")
"""


def test_json_lines_without_patient_values():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            timeout=60, check=True)
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    event = lines[0]
    assert event["event"] == "received" and event["sop_instance_uid"] == "1.2.3"
    assert {"timestamp", "level"} <= set(event)
    for secret in ("Doe^Jane", "PID-4711", "19991231"):
        assert secret not in result.stderr


VALUES_SCRIPT = """
import io, sys
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pacs_ai.ops.logs import configure_logging
if sys.argv[1] == "configured":
    configure_logging(fmt="json")
ds = Dataset()
ds.file_meta = FileMetaDataset()
ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
ds.PatientBirthDate = "31.12.1987"  # not a DA: pydicom's warning quotes it
ds.PatientAge = "77 Y"  # not an AS
buf = io.BytesIO()
ds.save_as(buf, enforce_file_format=True)
buf.seek(0)
read = pydicom.dcmread(buf)
print(read.PatientBirthDate, read.PatientAge, file=open("/dev/null", "w"))
"""


@pytest.mark.parametrize("configured", [True, False], ids=["logging configured", "bare"])
def test_pydicoms_warnings_quoting_values_never_reach_stderr(configured):
    """pydicom warns through `warnings` too, quoting the value (a birth date, a name): printed to
    stderr, the journal, for every film with a malformed one. Bare, the script shows that it
    does; with the service's logging, nothing of it appears."""
    result = subprocess.run([sys.executable, "-c", VALUES_SCRIPT,
                             "configured" if configured else "bare"],
                            capture_output=True, text=True, timeout=60, check=True)
    leaked = [value for value in ("31.12.1987", "77 Y") if value in result.stderr]
    assert leaked == ([] if configured else ["31.12.1987", "77 Y"]), result.stderr


LEVELS_SCRIPT = """
import sys, structlog
from pacs_ai.ops.logs import configure_logging
configure_logging(fmt="json", priority_prefix=sys.argv[1])
log = structlog.get_logger()
log.info("service_started")
log.warning("delivery_retry_scheduled", destination="pacs")
log.error("delivery_failed")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("store_failed_unexpectedly")
"""


def run_with_stderr_in(tmp_path, priority_prefix: str, journal_stream: str | None) -> list[str]:
    """Run LEVELS_SCRIPT with stderr in a file; JOURNAL_STREAM as systemd sets it for the
    stream it hands the service ("device:inode"): "match" names that very file."""
    path = tmp_path / "stderr"
    with open(path, "w") as stderr:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        if journal_stream == "match":
            stat = os.fstat(stderr.fileno())
            env["JOURNAL_STREAM"] = f"{stat.st_dev}:{stat.st_ino}"
        elif journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        subprocess.run([sys.executable, "-c", LEVELS_SCRIPT, priority_prefix], stderr=stderr,
                       env=env, timeout=60, check=True)
    return path.read_text().splitlines()


def test_under_systemd_each_json_line_carries_its_syslog_priority(tmp_path):
    """Issue 14 item 5: `journalctl -p warning` could not work, every line was stored at the
    journal's default priority. journald reads a leading <N> (sd-daemon(3)) as the priority."""
    lines = run_with_stderr_in(tmp_path, "auto", "match")
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>", "<3>"]
    events = [json.loads(line[3:]) for line in lines]  # the JSON stays whole after the prefix
    assert [e["event"] for e in events] == ["service_started", "delivery_retry_scheduled",
                                            "delivery_failed", "store_failed_unexpectedly"]
    assert events[1]["level"] == "warning" and events[1]["destination"] == "pacs"
    assert "ZeroDivisionError" in events[3]["exception"]


def test_no_priority_prefix_off_the_journal_unless_asked(tmp_path):
    # not under systemd; JOURNAL_STREAM inherited by a process whose stderr goes elsewhere
    for journal_stream in (None, "1:2", "garbage"):
        lines = run_with_stderr_in(tmp_path, "auto", journal_stream)
        assert all(line.startswith("{") for line in lines), (journal_stream, lines)
    assert run_with_stderr_in(tmp_path, "off", "match")[0].startswith("{")
    on = run_with_stderr_in(tmp_path, "on", None)
    assert on[0].startswith("<6>{") and on[1].startswith("<4>{")


def test_a_config_error_reaches_the_journal_as_an_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[listener]\nport = 0\n")
    path = tmp_path / "stderr"
    with open(path, "w") as stderr:
        stat = os.fstat(stderr.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{stat.st_dev}:{stat.st_ino}")
        result = subprocess.run([sys.executable, "-m", "pacs_ai", "serve", "--config", str(bad)],
                                stderr=stderr, env=env, timeout=60)
    assert result.returncode == 2
    assert path.read_text().startswith("<3>pacs-ai serve: error: ")
    assert "[listener] port" in path.read_text()


PROCESSES_SCRIPT = """
import multiprocessing, structlog
from pacs_ai.ops.logs import configure_logging

def log_lines(who):
    configure_logging(fmt="json")
    log = structlog.get_logger()
    for n in range(3000):
        log.info("line", who=who, n=n, padding="x" * 200)

if __name__ == "__main__":
    processes = [multiprocessing.Process(target=log_lines, args=(who,)) for who in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
"""


@pytest.mark.parametrize("unbuffered", [True, False], ids=["unbuffered", "buffered"])
def test_processes_sharing_stderr_never_merge_two_lines(tmp_path, unbuffered):
    """The service's helper processes log to the stderr they share with it (the journal's
    stream, or a file opened for appending): each event must reach it in one write, or another
    process's event lands between an event and its newline and both lines are lost to a
    parser."""
    script = tmp_path / "many.py"
    script.write_text(PROCESSES_SCRIPT)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"  # as the systemd unit and the container run the service
    path = tmp_path / "stderr"
    with open(path, "ab") as stderr:
        subprocess.run([sys.executable, str(script)], stderr=stderr, env=env, timeout=120,
                       check=True)
    lines = path.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line one whole event
    assert sorted((e["who"], e["n"]) for e in events) == [
        (who, n) for who in range(3) for n in range(3000)]
