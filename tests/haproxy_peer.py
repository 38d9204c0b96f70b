"""HAProxy in front of several `pacs-ai serve` replicas, for tests: the shipped sample
configuration (deploy/haproxy/pacs-ai.cfg) with this machine's loopback addresses and ports put
in, HAProxy started in the foreground, and its view of each replica read from its stats socket.

    replicas = [Backend("pacs-ai-1", dicom_port=..., health_port=...), ...]
    with HAProxy(tmp_path / "haproxy", replicas) as proxy:
        SimulatedModality(proxy.port).send([...])
        proxy.wait_for_state("pacs-ai-2", "DOWN", timeout=15)

Every wait is bounded; mark tests that use it ``@pytest.mark.real_peer`` (HAProxy is Debian's
`haproxy` package, installed by scripts/test.sh).
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.dicom_peers import LOCALHOST, free_port
from testbed.environment import REPO_ROOT, require_tool
from testbed.real_peers import stop_process, wait_for_port

SAMPLE_CONFIG = REPO_ROOT / "deploy" / "haproxy" / "pacs-ai.cfg"
FRONTEND = "pacs_ai_dicom"
BACKEND = "pacs_ai_replicas"


@dataclass(frozen=True)
class Backend:
    """One replica as HAProxy sees it: its name, DICOM port and /readyz (metrics) port."""

    name: str
    dicom_port: int
    health_port: int
    host: str = LOCALHOST


def sample_config_for(backends: list[Backend], *, port: int, host: str = LOCALHOST) -> str:
    """deploy/haproxy/pacs-ai.cfg as an admin would edit it: the frontend bound to host:port
    and one `server` line per backend (its own health-check port) instead of the examples.
    Everything else (timeouts, checks, balancing) is the sample's, unchanged."""
    text = SAMPLE_CONFIG.read_text()
    text, bound = re.subn(r"^(\s*)bind :11112$", rf"\g<1>bind {host}:{port}", text, flags=re.M)
    assert bound == 1, "the sample config no longer binds :11112"
    servers = re.findall(r"^(\s*)server \S+ \S+$", text, flags=re.M)
    assert servers, "the sample config has no server lines"
    indent = servers[0]
    lines = [f"{indent}server {b.name} {b.host}:{b.dicom_port} port {b.health_port}"
             for b in backends]
    text = re.sub(r"(^\s*server \S+ \S+\n)+", "\n".join(lines) + "\n", text, count=1,
                  flags=re.M)
    return text


def global_config(stats_socket: Path) -> str:
    """What Debian's /etc/haproxy/haproxy.cfg adds around the sample, minus chroot, user and
    daemon (the test runs HAProxy in the foreground as itself): its log (one line per
    association, naming the replica) to stderr, and a stats socket to read the replicas' states
    from."""
    return (f"global\n    log stderr format raw local0\n"
            f"    stats socket {stats_socket} mode 600 level admin\n    stats timeout 30s\n")


def haproxy_program() -> str:
    """HAProxy's path: Debian puts it in /usr/sbin, which a user's PATH may lack."""
    if shutil.which("haproxy") is None and Path("/usr/sbin/haproxy").is_file():
        return "/usr/sbin/haproxy"
    return require_tool("haproxy")


def check_config(*paths: Path) -> subprocess.CompletedProcess[str]:
    """`haproxy -c` on the given files, in order."""
    tool = haproxy_program()
    argv = [tool, "-c"]
    for path in paths:
        argv += ["-f", str(path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


class HAProxy:
    """`haproxy -db` (foreground) with the sample config for `backends`; stderr to a log."""

    def __init__(self, folder: Path, backends: list[Backend], *, port: int | None = None):
        self.folder = Path(folder)
        self.backends = list(backends)
        self.port = port or free_port()
        self.stats_socket = self.folder / "admin.sock"
        self.log_path = self.folder / "haproxy.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "HAProxy":
        tool = haproxy_program()
        self.folder.mkdir(parents=True, exist_ok=True)
        global_path = self.folder / "global.cfg"
        global_path.write_text(global_config(self.stats_socket))
        config_path = self.folder / "pacs-ai.cfg"
        config_path.write_text(sample_config_for(self.backends, port=self.port))
        checked = check_config(global_path, config_path)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [tool, "-db", "-f", str(global_path), "-f", str(config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        wait_for_port(self.port, process=self.process, what="haproxy")
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def __enter__(self) -> "HAProxy":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # the stats socket -------------------------------------------------------------------------

    def command(self, line: str) -> str:
        """One command on the stats socket (e.g. "show stat"), its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(5)
            connection.connect(str(self.stats_socket))
            connection.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := connection.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def servers(self) -> dict[str, dict[str, str]]:
        """Per replica, HAProxy's stats row: "status" (UP, DOWN, "UP 1/2"...), "scur" (open
        sessions), "stot" (sessions so far), "check_status"..."""
        answer = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(answer))
        return {row["svname"]: row for row in rows
                if row["pxname"] == BACKEND and row["svname"] not in ("BACKEND", "FRONTEND")}

    def state(self, name: str) -> str:
        return self.servers()[name]["status"]

    def wait_for_state(self, name: str, state: str, timeout: float) -> bool:
        """Wait until HAProxy says `state` (exactly "UP" or "DOWN") for replica `name`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state(name) == state:
                return True
            time.sleep(0.1)
        return self.state(name) == state
