"""Log set-up: JSON in the journal, and no patient-identifying values ever."""

import json
import logging
import subprocess
import sys

SCRIPT = """
import logging, structlog
from pacs_ai.logs import configure_logging
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
