"""deploy/: the systemd unit (checked by systemd-analyze where present) and install.sh.

install.sh runs for real, into a scratch root (--destdir), from a copy of deploy/ so the test
controls whether a shipped model is present. --venv-from points it at a stand-in environment
whose bin/pacs-ai runs this checkout's CLI, so no torch venv is built (fast, offline).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from pacs_ai.config import LimitsConfig, parse_config
from testbed.environment import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
UNIT = DEPLOY / "pacs-ai.service"
PREFIX = "/opt/pacs-ai"
INSTALLED_MODEL = f"{PREFIX}/models/pacs-ai-pneumonia.pt"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


# --- the unit --------------------------------------------------------------------------------

def unit_service_section(path: Path = UNIT) -> dict[str, list[str]]:
    """[Service] key -> every value given (systemd allows repeated keys)."""
    values: dict[str, list[str]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def seconds(timespan: str) -> float:
    units = {"s": 1, "sec": 1, "min": 60, "m": 60}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if timespan.endswith(suffix):
            return float(timespan[: -len(suffix)]) * factor
    return float(timespan)


def test_unit_runs_serve_as_its_own_user_with_restart_and_graceful_stop():
    service = unit_service_section()
    assert service["ExecStart"] == [f"{PREFIX}/venv/bin/pacs-ai serve --config /etc/pacs-ai/pacs-ai.toml"]
    assert service["User"] == ["pacs-ai"] and service["Group"] == ["pacs-ai"]
    assert service["Restart"] == ["on-failure"]
    assert service["KillSignal"] == ["SIGTERM"]
    # systemd must wait longer than the listener's own shutdown grace before it sends SIGKILL.
    assert seconds(service["TimeoutStopSec"][0]) > LimitsConfig().shutdown_grace_seconds * 2


def test_unit_has_the_journal_read_the_priority_prefixes():
    """pacs_ai.ops.logs writes "<4>{...}" under systemd; journald reads it only with
    SyslogLevelPrefix=yes (the default, stated in the unit so a drop-in cannot lose it quietly),
    and the service must keep stderr (not StandardError=null/file) for it to reach the journal."""
    service = unit_service_section()
    assert service.get("SyslogLevelPrefix") == ["yes"]
    assert "StandardError" not in service and "StandardOutput" not in service


def test_unit_is_hardened_with_the_spool_as_the_only_writable_path():
    service = unit_service_section()
    expected = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "StateDirectory": "pacs-ai", "ReadWritePaths": "/var/lib/pacs-ai",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
    }
    for key, value in expected.items():
        assert service.get(key) == [value], f"{key}={value} expected in the unit"
    assert "MemoryDenyWriteExecute" not in service, "breaks libffi/PyTorch"


def test_unit_caps_memory_and_tasks_above_the_measured_peaks():
    """MemoryMax and TasksMax are backstops sized from docs/benchmarks.md (peak 670 MB with two
    helper processes) and a thread count (34 at 10 associations): well above both, not off."""
    service = unit_service_section()
    [memory] = service["MemoryMax"]
    assert re.fullmatch(r"\d+M", memory), "MemoryMax in MiB, as the comment sizes it"
    assert int(memory[:-1]) >= 2 * 670
    [tasks] = service["TasksMax"]
    assert tasks.isdigit() and 10 * 34 <= int(tasks)
    guide = (DEPLOY / "README.md").read_text()
    assert f"MemoryMax={memory}" in guide and f"TasksMax={tasks}" in guide


def systemd_analyze() -> str:
    """systemd-analyze, or a skip: systemd is not installed in every container (scripts/test.sh
    installs it in CI)."""
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    return path


def scratch_root_with_unit(root: Path) -> Path:
    """A file-system root holding the unit, a stand-in for the program it starts and systemd's
    own units, so `systemd-analyze verify --root` checks the unit as it would run."""
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    shutil.copy(UNIT, unit_dir / UNIT.name)
    program = root / f"{PREFIX.lstrip('/')}/venv/bin/pacs-ai"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    return root


def test_systemd_analyze_verify_accepts_the_unit_without_warnings(tmp_path):
    tool = systemd_analyze()
    if not SYSTEM_UNITS.is_dir():
        pytest.skip(f"{SYSTEM_UNITS} missing: systemd is not fully installed")
    root = scratch_root_with_unit(tmp_path / "root")
    result = subprocess.run([tool, "verify", f"--root={root}", UNIT.name],
                            capture_output=True, text=True, timeout=60)
    # Unknown keys and bad values are only warnings (exit 0), so any output is a failure too.
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a misspelt key is reported."""
    tool = systemd_analyze()
    if not SYSTEM_UNITS.is_dir():
        pytest.skip(f"{SYSTEM_UNITS} missing: systemd is not fully installed")
    root = scratch_root_with_unit(tmp_path / "root")
    unit = root / "etc/systemd/system" / UNIT.name
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
    result = subprocess.run([tool, "verify", f"--root={root}", UNIT.name],
                            capture_output=True, text=True, timeout=60)
    assert "ProtectSystm" in result.stderr


def test_systemd_analyze_security_rates_the_unit_well_hardened(tmp_path):
    tool = systemd_analyze()
    unit = tmp_path / UNIT.name
    shutil.copy(UNIT, unit)
    # Exposure is 0.0 (locked down) to 10.0 (unprotected); --threshold is in tenths.
    result = subprocess.run([tool, "security", "--offline=true", "--threshold=20", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


# --- install.sh ------------------------------------------------------------------------------

@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of deploy/ in a scratch checkout, without any shipped model."""
    repo = tmp_path / "checkout"
    (repo / "deploy" / "models").mkdir(parents=True)
    for name in ("install.sh", "pacs-ai.service", "pacs-ai.toml", "README.md"):
        shutil.copy(DEPLOY / name, repo / "deploy" / name)
    return repo


@pytest.fixture
def stand_in_venv(tmp_path) -> Path:
    """A folder shaped like a virtual environment whose bin/pacs-ai runs this checkout's CLI."""
    venv = tmp_path / "prebuilt-venv"
    (venv / "bin").mkdir(parents=True)
    program = venv / "bin" / "pacs-ai"
    program.write_text(f"#!/bin/sh\nexec {sys.executable} -m pacs_ai \"$@\"\n")
    program.chmod(0o755)
    return venv


def install(checkout: Path, destdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(checkout / "deploy" / "install.sh"), "--destdir",
                           str(destdir), *args], capture_output=True, text=True, timeout=60)


def tree(root: Path) -> dict[str, str]:
    """Relative path -> content hash (or link target) of every file under root."""
    listing = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            listing[key] = "-> " + os.readlink(path)
        elif path.is_file():
            listing[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return listing


def test_install_into_a_scratch_root_twice_is_idempotent_and_keeps_an_edited_config(
        checkout, stand_in_venv, tiny_model, tmp_path):
    root = tmp_path / "root"
    first = install(checkout, root, "--venv-from", str(stand_in_venv), "--model", str(tiny_model))
    assert first.returncode == 0, first.stderr

    # Nothing touched the real system: the privileged steps were printed instead.
    for planned in ("would run: useradd --system --user-group", "would run: systemctl enable pacs-ai.service",
                    "would run: systemctl daemon-reload", "would run: chown pacs-ai:pacs-ai /var/lib/pacs-ai"):
        assert planned in first.stdout
    assert (root / "var/lib/pacs-ai").is_dir()
    assert (root / "etc/systemd/system/pacs-ai.service").read_text() == UNIT.read_text()
    assert (root / INSTALLED_MODEL.lstrip("/")).read_bytes() == tiny_model.read_bytes()
    assert os.readlink(root / "usr/local/bin/pacs-ai") == f"{PREFIX}/venv/bin/pacs-ai"
    assert (root / "opt/pacs-ai/share/doc/README.md").is_file()

    config_file = root / "etc/pacs-ai/pacs-ai.toml"
    config = tomllib.loads(config_file.read_text())
    assert config["model"]["path"] == INSTALLED_MODEL
    # The installed config is one the listener accepts (model path re-rooted into the scratch root).
    config["model"]["path"] = str(root / INSTALLED_MODEL.lstrip("/"))
    parse_config(config, base_dir=config_file.parent)

    # The installed program runs and reads the installed model.
    card = subprocess.run([str(root / "opt/pacs-ai/venv/bin/pacs-ai"), "model", "--model",
                           str(root / INSTALLED_MODEL.lstrip("/"))],
                          capture_output=True, text=True, timeout=120)
    assert card.returncode == 0, card.stderr
    assert "threshold:" in card.stdout

    edited = config_file.read_text() + "\n# edited by the site admin\n"
    config_file.write_text(edited)
    before = tree(root)
    second = install(checkout, root, "--venv-from", str(stand_in_venv), "--model", str(tiny_model))
    assert second.returncode == 0, second.stderr
    assert "keeping /etc/pacs-ai/pacs-ai.toml" in second.stdout
    assert config_file.read_text() == edited
    assert tree(root) == before


def test_install_warns_while_the_config_names_no_calling_ae_title(
        checkout, stand_in_venv, tiny_model, tmp_path):
    """Issue 23 item 4: a config with no calling AE title (the fresh one, or one kept from
    before, when empty meant any caller) makes the service reject every modality; install.sh
    says so, and agrees with the service's own parser on each edit an admin might make."""
    root = tmp_path / "root"
    config_file = root / "etc/pacs-ai/pacs-ai.toml"
    warning = "names no calling AE title"
    first = install(checkout, root, "--venv-from", str(stand_in_venv), "--model", str(tiny_model))
    assert first.returncode == 0 and warning in first.stderr, first.stderr
    installed = config_file.read_text()
    multi_line = '[\n  "CR1",\n  { ae_title = "DX", address = "10.1.2.0/24" },\n]'
    for key, value in (("allowed_calling_ae_titles", '["CR1"]'),
                       ("allowed_calling_ae_titles", multi_line),
                       ("allowed_calling_ae_titles", "[ ]   # none yet"),
                       ("accept_any_calling_ae", "true"),
                       ("accept_any_calling_ae", "false")):
        text = set_config_key(installed, "listener", key, value)
        config_file.write_text(text)
        again = install(checkout, root, "--venv-from", str(stand_in_venv),
                        "--model", str(tiny_model))
        assert again.returncode == 0, again.stderr
        data = tomllib.loads(text)
        data["model"]["path"] = str(tiny_model)
        refuses = parse_config(data, base_dir=tmp_path).listener.refuses_every_caller
        assert (warning in again.stderr) == refuses, (key, value, again.stderr)


def test_uninstall_removes_program_and_unit_but_keeps_config_and_spool(
        checkout, stand_in_venv, tiny_model, tmp_path):
    root = tmp_path / "root"
    assert install(checkout, root, "--venv-from", str(stand_in_venv),
                   "--model", str(tiny_model)).returncode == 0
    queued = root / "var/lib/pacs-ai/spool/incoming/1.2.3.4.dcm"
    queued.parent.mkdir(parents=True)
    queued.write_bytes(b"an acknowledged image")
    config_before = (root / "etc/pacs-ai/pacs-ai.toml").read_text()

    result = install(checkout, root, "--uninstall")
    assert result.returncode == 0, result.stderr
    assert "would run: systemctl disable --now pacs-ai.service" in result.stdout
    assert not (root / "opt/pacs-ai").exists()
    assert not (root / "etc/systemd/system/pacs-ai.service").exists()
    assert not (root / "usr/local/bin/pacs-ai").is_symlink()
    assert queued.read_bytes() == b"an acknowledged image"
    assert (root / "etc/pacs-ai/pacs-ai.toml").read_text() == config_before
    # The environment given by --venv-from was only linked, never deleted.
    assert (stand_in_venv / "bin/pacs-ai").is_file()

    again = install(checkout, root, "--uninstall")
    assert again.returncode == 0, again.stderr


def test_uninstall_refuses_to_delete_a_prefix_it_did_not_create(checkout, tmp_path):
    root = tmp_path / "root"
    precious = root / "srv/other-app/data.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("not ours")
    result = install(checkout, root, "--uninstall", "--prefix", "/srv/other-app")
    assert result.returncode != 0
    assert "not installed by this script" in result.stderr
    assert precious.read_text() == "not ours"


def test_missing_shipped_model_is_a_clear_warning_and_a_shipped_one_is_installed(
        checkout, stand_in_venv, tiny_model, tmp_path):
    without = install(checkout, tmp_path / "a", "--venv-from", str(stand_in_venv))
    assert without.returncode == 0, without.stderr
    assert "no trained model" in without.stderr and INSTALLED_MODEL in without.stderr
    assert "install a model" in without.stdout

    shutil.copy(tiny_model, checkout / "deploy/models/pacs-ai-pneumonia.pt")
    shipped = install(checkout, tmp_path / "b", "--venv-from", str(stand_in_venv))
    assert shipped.returncode == 0, shipped.stderr
    assert "no trained model" not in shipped.stderr
    assert (tmp_path / "b" / INSTALLED_MODEL.lstrip("/")).read_bytes() == tiny_model.read_bytes()


def test_an_upgrade_keeps_a_model_installed_with_model_until_the_shipped_one_is_chosen(
        checkout, stand_in_venv, tiny_model, tmp_path):
    """A promoted candidate (install.sh --model) stays the model in use through a plain upgrade:
    replacing it with the shipped file would change the model, or stop the service on the
    threshold lines bound to the candidate, without anyone choosing it."""
    root = tmp_path / "root"
    installed = root / INSTALLED_MODEL.lstrip("/")
    shipped = checkout / "deploy/models/pacs-ai-pneumonia.pt"
    shipped.write_bytes(tiny_model.read_bytes() + b"another version")  # install.sh only copies it
    candidate = tmp_path / "candidate.pt"
    shutil.copy(tiny_model, candidate)

    assert install(checkout, root, "--venv-from", str(stand_in_venv)).returncode == 0
    assert installed.read_bytes() == shipped.read_bytes()
    chosen = install(checkout, root, "--venv-from", str(stand_in_venv), "--model", str(candidate))
    assert chosen.returncode == 0, chosen.stderr
    assert installed.read_bytes() == candidate.read_bytes()

    upgrade = install(checkout, root, "--venv-from", str(stand_in_venv))
    assert upgrade.returncode == 0, upgrade.stderr
    assert installed.read_bytes() == candidate.read_bytes()  # kept
    assert "keeping /opt/pacs-ai/models/pacs-ai-pneumonia.pt, the site's choice" in upgrade.stdout
    assert f"install it with --model {shipped}" in upgrade.stdout

    installed.write_bytes(b"edited by hand")  # no longer the file --model put there
    assert install(checkout, root, "--venv-from", str(stand_in_venv)).returncode == 0
    assert installed.read_bytes() == shipped.read_bytes()

    install(checkout, root, "--venv-from", str(stand_in_venv), "--model", str(candidate))
    back = install(checkout, root, "--venv-from", str(stand_in_venv), "--model", str(shipped))
    assert back.returncode == 0 and installed.read_bytes() == shipped.read_bytes()
    shipped.write_bytes(tiny_model.read_bytes() + b"the next version")
    assert install(checkout, root, "--venv-from", str(stand_in_venv)).returncode == 0
    assert installed.read_bytes() == shipped.read_bytes()  # the shipped one again follows


def test_another_prefix_is_written_into_unit_and_config(checkout, stand_in_venv, tiny_model, tmp_path):
    root = tmp_path / "root"
    result = install(checkout, root, "--prefix", "/srv/pacs-ai", "--venv-from", str(stand_in_venv),
                     "--model", str(tiny_model))
    assert result.returncode == 0, result.stderr
    unit = root / "etc/systemd/system/pacs-ai.service"
    assert unit_service_section(unit)["ExecStart"] == [
        "/srv/pacs-ai/venv/bin/pacs-ai serve --config /etc/pacs-ai/pacs-ai.toml"]
    config = tomllib.loads((root / "etc/pacs-ai/pacs-ai.toml").read_text())
    assert config["model"]["path"] == "/srv/pacs-ai/models/pacs-ai-pneumonia.pt"


def test_without_systemd_it_installs_runs_no_systemctl_and_says_how_to_start(
        checkout, stand_in_venv, tiny_model, tmp_path):
    """Issue 14 item 6: on a machine without systemd (a container) systemctl failed half-way
    with "System has not been booted with systemd". Without systemd running (auto-detected, or
    --no-systemd) the files are installed, no systemctl is run, and the output says so and
    gives the command to start the service by hand: the unit's own ExecStart, as its user."""
    root = tmp_path / "root"
    result = install(checkout, root, "--no-systemd", "--venv-from", str(stand_in_venv),
                     "--model", str(tiny_model))
    assert result.returncode == 0, result.stderr
    assert "systemctl" not in result.stdout.replace("ran no systemctl", ""), result.stdout
    assert "ran no systemctl" in result.stdout
    [exec_start] = unit_service_section(root / "etc/systemd/system/pacs-ai.service")["ExecStart"]
    assert f"cd /var/lib/pacs-ai && runuser -u pacs-ai -- {exec_start}" in result.stdout
    assert (root / "opt/pacs-ai/venv").is_symlink() and (root / "etc/pacs-ai/pacs-ai.toml").is_file()
    removed = install(checkout, root, "--no-systemd", "--uninstall")
    assert removed.returncode == 0, removed.stderr
    assert "systemctl" not in removed.stdout.replace("no systemctl", "")
    assert not (root / "etc/systemd/system/pacs-ai.service").exists()


@pytest.fixture
def public_folder():
    """A folder every user can reach (pytest's tmp_path is under a 0700 folder of root's)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="pacs-ai-install-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_the_service_user_must_be_able_to_run_the_installed_program(
        checkout, stand_in_venv, tiny_model, public_folder, tmp_path):
    """Issue 14 item 6: a virtual environment the service user cannot run (made from a Python
    under /root, as pyenv does, or --venv-from a private folder) installed without a word and
    then failed at each start. install.sh runs the program as that user (`--check-as` names
    the user in a scratch root, which has no pacs-ai user) and refuses with what to fix."""
    if shutil.which("runuser") is None or os.getuid() != 0:
        pytest.skip("needs root and runuser (util-linux) to run a program as another user")
    private = install(checkout, tmp_path / "root", "--venv-from", str(stand_in_venv),
                      "--model", str(tiny_model), "--check-as", "nobody")
    # stand_in_venv lies under pytest's 0700 folder: nobody cannot reach it
    assert private.returncode != 0
    assert "the service user nobody cannot run /opt/pacs-ai/venv/bin/pacs-ai" in private.stderr
    assert "Permission denied" in private.stderr and "--python" in private.stderr

    venv = public_folder / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "pacs-ai").write_text("#!/bin/sh\necho pacs-ai 0.0-stand-in\n")
    (venv / "bin" / "pacs-ai").chmod(0o755)
    reachable = install(checkout, public_folder / "root", "--venv-from", str(venv),
                        "--model", str(tiny_model), "--check-as", "nobody")
    assert reachable.returncode == 0, reachable.stderr
    assert "checked: the service user nobody can run /opt/pacs-ai/venv/bin/pacs-ai" in \
        reachable.stdout
    planned = install(checkout, public_folder / "plan", "--venv-from", str(venv),
                      "--model", str(tiny_model))  # a scratch root without --check-as: planned
    assert "would run: runuser -u pacs-ai -- /opt/pacs-ai/venv/bin/pacs-ai --version" in \
        planned.stdout


def test_bad_options_are_refused_with_a_message(checkout, stand_in_venv, tmp_path):
    unknown = install(checkout, tmp_path / "root", "--frobnicate")
    assert unknown.returncode != 0 and "unknown option '--frobnicate'" in unknown.stderr
    no_venv = install(checkout, tmp_path / "root", "--venv-from", str(tmp_path / "nowhere"))
    assert no_venv.returncode != 0 and "--venv-from" in no_venv.stderr
    no_model = install(checkout, tmp_path / "root", "--venv-from", str(stand_in_venv),
                       "--model", str(tmp_path / "missing.pt"))
    assert no_model.returncode != 0 and "--model: no file" in no_model.stderr


# --- the admin guide (deploy/README.md) agrees with the code ---------------------------------

GUIDE = DEPLOY / "README.md"


def guide_blocks(language: str) -> list[str]:
    """The fenced code blocks of one language in the admin guide."""
    blocks, current = [], None
    for line in GUIDE.read_text().splitlines():
        if current is None and line.strip() == f"```{language}":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_every_config_snippet_in_the_guide_is_accepted_by_the_listener(tmp_path):
    snippets = guide_blocks("toml")
    assert len(snippets) >= 4
    # The snippets name files in /etc/pacs-ai and model files in /opt/pacs-ai/models; the
    # config checks that they exist.
    folders = {"/etc/pacs-ai/": tmp_path / "etc-pacs-ai",
               "/opt/pacs-ai/models/": tmp_path / "opt-pacs-ai-models"}
    for folder in folders.values():
        folder.mkdir()
    for snippet in snippets:
        for installed, folder in folders.items():
            for name in re.findall(rf"{re.escape(installed)}([\w.-]+)", snippet):
                (folder / name).write_text("placeholder\n")
            snippet = snippet.replace(installed, f"{folder}/")
        parse_config(tomllib.loads(snippet), base_dir=tmp_path)


def test_the_guide_lists_exactly_the_metrics_the_service_exports():
    from prometheus_client import generate_latest

    from pacs_ai.ops.metrics import REGISTRY

    exposition = generate_latest(REGISTRY).decode()
    exported = {name for name in re.findall(r"^# TYPE (\S+) ", exposition, flags=re.M)
                if not name.endswith("_created")}  # prometheus-client's own timestamps
    documented = set(re.findall(r"^\| `(pacs_ai_[a-z_]+)", GUIDE.read_text(), flags=re.M))
    assert documented == exported


def _literal_head(node) -> str | None:
    """The text a string literal or f-string starts with (up to its first placeholder)."""
    import ast

    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def _reason_codes(path: Path, *, calls: tuple[str, ...] = (), functions: tuple[str, ...] = ()
                  ) -> set[str]:
    """The "code" of each "code: detail" string in `path` given to one of `calls` (by name) or
    anywhere inside one of `functions` (or the whole file when neither is given)."""
    import ast

    tree = ast.parse(path.read_text())
    roots: list = [tree]
    if functions:
        roots = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                 and node.name in functions]
    strings = []
    for root in roots:
        for node in ast.walk(root):
            if calls:
                if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(
                        node.func, "attr", None)) in calls:
                    strings += node.args
            else:
                strings.append(node)
    codes = set()
    for node in strings:
        head = _literal_head(node)
        if head and (match := re.match(r"([a-z][a-z0-9-]*): ", head)):
            codes.add(match.group(1))
    return codes


def label_values_in_code() -> dict[str, set[str]]:
    """Each closed set of metric label values, read from the code that sets them."""
    import ast

    source = REPO_ROOT / "pacs_ai"
    scp = ast.parse((source / "receive" / "scp.py").read_text())
    rejected = set()
    for node in ast.walk(scp):
        # metrics.REJECTED.labels(reason="...") and `reason = "..."` / `reason, limit = "...", n`
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "labels":
            rejected |= {k.value.value for k in node.keywords
                         if k.arg == "reason" and isinstance(k.value, ast.Constant)}
        if isinstance(node, ast.Assign):
            target, value = node.targets[0], node.value
            if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
                pairs = zip(target.elts, value.elts)
            else:
                pairs = [(target, value)]
            rejected |= {v.value for t, v in pairs if isinstance(t, ast.Name)
                         and t.id == "reason" and isinstance(v, ast.Constant)
                         and isinstance(v.value, str)}
    # C-STORE refusals: metrics.reason_code() of each StoreOutcome's reason
    rejected |= _reason_codes(source / "receive" / "scp.py", calls=("StoreOutcome",))
    rejected |= _reason_codes(source / "receive" / "received.py", calls=("ReceivedDataError",))
    skipped = (_reason_codes(source / "film" / "filters.py")
               | _reason_codes(source / "model" / "intended_use.py",
                               functions=("outside_reason", "unknown_age_reason"))
               | _reason_codes(source / "model" / "model.py", functions=("abstain_reason",)))
    from pacs_ai.queue.job_records import Stage

    def stage(node: ast.expr) -> set[str]:
        """The value of a `Stage.MEMBER` (or a string) passed as a stage; none for a variable."""
        if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "Stage":
            return {Stage[node.attr].value}
        return {node.value} if isinstance(node, ast.Constant) else set()

    failed: set[str] = set()
    for path in (source / "classify" / "worker.py", source / "deliver" / "sender.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "attr", None)
            if name == "_fail" and len(node.args) >= 2:
                failed |= stage(node.args[1])  # worker._fail(job, stage, reason)
            if name == "labels":
                for keyword in node.keywords:
                    if keyword.arg == "stage":
                        failed |= stage(keyword.value)
    from pacs_ai.finding import Finding

    finding = {str(member) for member in Finding}  # what model.finding returns
    from pacs_ai.ops import metrics
    from pacs_ai.receive import arrivals

    return {"pacs_ai_rejected_total{reason}": rejected, "pacs_ai_skipped_total{reason}": skipped,
            "pacs_ai_failed_total{stage}": failed,
            "pacs_ai_classified_total{finding}": finding,
            "pacs_ai_model_results_total{result}": finding | {metrics.RESULT_ABSTAINED},
            "pacs_ai_model_results_total{role}": {metrics.ROLE_LIVE, metrics.ROLE_SHADOW},
            "pacs_ai_arrivals_total{manufacturer}": {name for name, _ in arrivals.MANUFACTURERS}
            | {arrivals.NONE, arrivals.OTHER, arrivals.INVALID}}


def test_the_guide_lists_each_metric_label_value_the_code_sets():
    """Issue 14 item 6: the label values an admin alerts on are the ones the code sets, all of
    them. The guide's Metrics section has a bullet per labelled metric."""
    in_code = label_values_in_code()
    assert {"association-limit", "calling-ae-not-allowed", "truncated-pixel-data", "disk-full",
            "peer-address-not-allowed"} <= in_code["pacs_ai_rejected_total{reason}"]
    assert {"not-chest", "outside-intended-age", "unknown-age", "out-of-distribution"} <= \
        in_code["pacs_ai_skipped_total{reason}"]  # the scan finds them
    guide = GUIDE.read_text()
    start = guide.index("\n### Metrics\n")
    section = guide[start:guide.index("\n## ", start + 1)]
    for metric, values in in_code.items():
        bullet = re.search(rf"^- `{re.escape(metric)}`:(.*?)(?=^- |^\s*$)", section,
                           flags=re.M | re.S)
        assert bullet, f"no '- `{metric}`:' bullet in the guide's Metrics section"
        documented = set(re.findall(r"`([a-z][a-z0-9-]*)`", bullet.group(1)))
        assert documented == values, (metric, "missing:", sorted(values - documented),
                                      "not in the code:", sorted(documented - values))


def logged_events() -> dict[str, str]:
    """Every event the service's code logs ({name: "file:line"}), read from the source: each
    structlog call on a logger (`log.info("name", ...)`) in pacs_ai/."""
    import ast

    events: dict[str, str] = {}
    for path in sorted((REPO_ROOT / "pacs_ai").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("debug", "info", "warning", "error", "exception",
                                           "critical", "msg")
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "log"):
                continue
            where = f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
            assert node.args and isinstance(node.args[0], ast.Constant), \
                f"{where}: the event name must be a literal, so the guide can list it"
            events.setdefault(node.args[0].value, where)
    return events


def test_every_event_the_code_logs_is_in_the_guide():
    """Issue 14: the guide's event list (Logs) is what an admin greps the journal for."""
    events = logged_events()
    assert {"service_started", "association_rejected", "no_destination",
            "failed_files_purged"} <= set(events)  # the scan finds them
    guide = GUIDE.read_text()
    start = guide.index("\n### Logs\n")
    logs = guide[start:guide.index("\n#", start + 1)]
    for name, where in sorted(events.items()):
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), f"{where}: event {name!r} is not a name"
        assert f"`{name}`" in logs, f"{where} logs {name!r}, missing from the guide's events"


def test_the_install_options_in_the_guide_exist():
    help_text = subprocess.run(["bash", str(DEPLOY / "install.sh"), "--help"],
                               capture_output=True, text=True, timeout=30).stdout
    guide = GUIDE.read_text()
    mentioned = set(re.findall(r"install\.sh[^`\n]*?(--[a-z-]+)", guide))
    mentioned |= set(re.findall(r"`(--[a-z-]+)[ `]", guide))
    assert {"--uninstall", "--venv-from", "--model", "--destdir", "--torch-index"} <= mentioned
    # A bare `--option` in the guide reads as install.sh's; a pacs-ai command's option is written
    # with its command (`pacs-ai evaluate --sensitivity-floor`), which this check leaves alone.
    for option in mentioned:
        assert option in help_text, (f"the guide mentions {option} bare (an install.sh option), "
                                     "install.sh does not know it")


# --- the guide's commands, run as written against an installed service -------------------------

def guide_command(start: str) -> str:
    """The one command line in the guide's sh blocks that starts with `start`."""
    lines = [line.strip() for block in guide_blocks("sh") for line in block.splitlines()
             if line.strip().startswith(start)]
    assert len(lines) == 1, f"expected one guide command starting {start!r}, found {lines}"
    return lines[0]


def set_config_key(text: str, table: str, key: str, value: str) -> str:
    """Edit one `key = value` line (commented or not) of one [table], as an admin would."""
    header = re.search(rf"^\[{re.escape(table)}\][ \t]*$", text, flags=re.M)
    assert header, f"no [{table}] in the installed config"
    end = re.search(r"^\[", text[header.end():], flags=re.M)
    body_end = header.end() + (end.start() if end else len(text) - header.end())
    body, count = re.subn(rf"^#?[ \t]*{key}[ \t]*=.*$", f"{key} = {value}",
                          text[header.end():body_end], count=1, flags=re.M)
    assert count == 1, f"no {key} in [{table}] of the installed config"
    return text[:header.end()] + body + text[body_end:]


@pytest.mark.real_peer
@pytest.mark.slow
def test_the_guide_commands_work_against_an_installed_service(
        checkout, stand_in_venv, tiny_model, tmp_path):
    from testbed.dicom_peers import free_port
    from testbed.environment import SAMPLE_DICOMS, require_tool
    from testbed.real_peers import Modality, Orthanc, stop_process, wait_for_port

    for tool in ("echoscu", "storescu", "curl", "df", "du", "diff"):
        require_tool(tool)
    root = tmp_path / "root"
    assert install(checkout, root, "--venv-from", str(stand_in_venv),
                   "--model", str(tiny_model)).returncode == 0
    program = root / "opt/pacs-ai/venv/bin/pacs-ai"
    listener_port, metrics_port = free_port(), free_port()
    chest = SAMPLE_DICOMS / "cr_pneumonia_ap_12bit.dcm"
    pacs = Orthanc(tmp_path / "pacs", ae_title="PACS",
                   modalities=[Modality("PACS_AI", port=listener_port)])

    def run_as_written(command: str) -> subprocess.CompletedProcess:
        """The guide's command, with this test's host, ports and scratch root put in."""
        command = re.sub(r"^sudo (-u pacs-ai )?", "", command)
        command = re.sub(r"^pacs-ai ", f"{program} ", command)
        for written, here in (("pacs-ai-host 11112", f"127.0.0.1 {listener_port}"),
                              ("pacs.example.org 104", f"127.0.0.1 {pacs.dicom_port}"),
                              ("127.0.0.1:9108", f"127.0.0.1:{metrics_port}"),
                              ("chest.dcm", str(chest)),
                              (" /etc/pacs-ai/", f" {root}/etc/pacs-ai/"),
                              (" /opt/pacs-ai/", f" {root}/opt/pacs-ai/"),
                              (" /var/lib/pacs-ai", f" {root}/var/lib/pacs-ai")):
            command = command.replace(written, here)
        result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        return result

    # A fresh install: the config is the example.
    run_as_written(guide_command("diff /etc/pacs-ai/pacs-ai.toml"))

    with pacs:
        # The admin's edits (the guide's [listener] and [[destinations]] examples, this test's
        # ports) and the scratch root's paths.
        config_file = root / "etc/pacs-ai/pacs-ai.toml"
        text = config_file.read_text()
        for table, key, value in (
                ("listener", "host", '"127.0.0.1"'), ("listener", "port", str(listener_port)),
                ("listener", "allowed_calling_ae_titles", '["MODALITY"]'),
                ("storage", "spool_dir", f'"{root}/var/lib/pacs-ai"'),
                ("model", "path", f'"{root}{INSTALLED_MODEL}"'),
                ("metrics", "port", str(metrics_port))):
            text = set_config_key(text, table, key, value)
        text += ('\n[[destinations]]\nname = "main-pacs"\nae_title = "PACS"\n'
                 f'host = "127.0.0.1"\nport = {pacs.dicom_port}\n')
        config_file.write_text(text)
        card = run_as_written(guide_command("sudo pacs-ai model --config")).stdout
        assert "threshold:" in card and f"([model] path in {config_file})" in card

        # What systemd runs (ExecStart), with the installed program and config.
        log_path = tmp_path / "journal.log"
        with log_path.open("wb") as log:
            service = subprocess.Popen([str(program), "serve", "--config", str(config_file)],
                                       stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        try:
            wait_for_port(listener_port, process=service, what="installed pacs-ai serve")
            echo = run_as_written(guide_command("echoscu -v -aet MODALITY"))
            assert "Received Echo Response (Success)" in echo.stdout + echo.stderr
            run_as_written(guide_command("storescu -v -aet MODALITY"))
            run_as_written(guide_command("echoscu -v -aet PACS_AI -aec PACS"))

            def report_in_pacs() -> bool:
                return any(pacs.get(f"/series/{series}")["MainDicomTags"].get("SeriesDescription")
                           == "pacs-ai pneumonia (AI, not verified)"
                           for series in pacs.get("/series"))
            deadline = time.monotonic() + 90
            while not report_in_pacs():
                assert time.monotonic() < deadline and service.poll() is None, log_path.read_text()
                time.sleep(0.5)

            health = json.loads(run_as_written(guide_command("curl -s http://127.0.0.1:9108/healthz")).stdout)
            assert health["ok"] is True
            # The PACS holds the report a moment before the sender has recorded its answer.
            reported = re.compile(r'^pacs_ai_reported_total\{destination="main-pacs"\} [1-9]', re.M)
            deadline = time.monotonic() + 10
            while True:
                scrape = run_as_written(
                    guide_command("curl -s http://127.0.0.1:9108/metrics")).stdout
                if reported.search(scrape) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert re.search(r"^pacs_ai_received_total [1-9]", scrape, flags=re.M)
            assert reported.search(scrape), scrape
            assert "`curl -fsS http://127.0.0.1:9108/healthz`" in GUIDE.read_text()
            run_as_written("curl -fsS http://127.0.0.1:9108/healthz")
            ready = json.loads(run_as_written(guide_command("curl -s http://127.0.0.1:9108/readyz")).stdout)
            assert ready["ok"] is True and ready["problems"] == []
            assert "`curl -fsS http://127.0.0.1:9108/readyz`" in GUIDE.read_text()
            run_as_written("curl -fsS http://127.0.0.1:9108/readyz")
            queue = json.loads(run_as_written(
                guide_command("curl -s http://127.0.0.1:9108/api/queue")).stdout)
            assert queue["films"][0]["deliveries"]["main-pacs"]["state"] == "done", queue
            assert queue["films"][0]["calling_ae_title"] == "MODALITY"
            run_as_written(guide_command("sudo -u pacs-ai pacs-ai status"))
            run_as_written(guide_command("sudo -u pacs-ai pacs-ai retry"))
            run_as_written(guide_command("df -h /var/lib/pacs-ai"))
            run_as_written(guide_command("sudo du -sh /var/lib/pacs-ai/images"))
        finally:
            # systemctl stop: SIGTERM, well within the unit's TimeoutStopSec.
            status = stop_process(service, timeout_s=60)
        assert status == 0, log_path.read_text()[-4000:]


def serve_installed(program: Path, config_file: Path, log_path: Path,
                    port: int) -> subprocess.Popen:
    """What systemd runs (ExecStart), with the installed program and config; returns once the
    DICOM port listens."""
    from testbed.real_peers import wait_for_port

    with log_path.open("wb") as log:
        service = subprocess.Popen([str(program), "serve", "--config", str(config_file)],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_port(port, process=service, what="installed pacs-ai serve")
    return service


def log_events(log_path: Path) -> list[dict]:
    events = []
    for line in log_path.read_text().splitlines():
        line = line[line.find("{"):]  # after a "<4>" priority prefix, if any
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return events


@pytest.mark.real_peer
def test_the_installed_service_refuses_every_caller_until_the_admin_names_them(
        checkout, stand_in_venv, tiny_model, tmp_path):
    """Issue 23 item 4: the installed config listened on every interface with an empty
    calling-AE list, so any host could store. As installed (only this test's port, spool and
    model paths put in), a store from DCMTK's storescu is rejected at association, with a log
    line that says how to fix it; `accept_any_calling_ae = true` takes it, with a warning at
    the start."""
    from testbed.dicom_peers import free_port
    from testbed.environment import SAMPLE_DICOMS
    from testbed.real_peers import stop_process, storescu

    root = tmp_path / "root"
    assert install(checkout, root, "--venv-from", str(stand_in_venv),
                   "--model", str(tiny_model)).returncode == 0
    program = root / "opt/pacs-ai/venv/bin/pacs-ai"
    config_file = root / "etc/pacs-ai/pacs-ai.toml"
    port = free_port()
    text = config_file.read_text()
    for table, key, value in (
            ("listener", "host", '"127.0.0.1"'), ("listener", "port", str(port)),
            ("storage", "spool_dir", f'"{root}/var/lib/pacs-ai"'),
            ("model", "path", f'"{root}{INSTALLED_MODEL}"'), ("metrics", "enabled", "false")):
        text = set_config_key(text, table, key, value)
    config_file.write_text(text)
    chest = SAMPLE_DICOMS / "cr_pneumonia_ap_12bit.dcm"

    log_path = tmp_path / "as-installed.log"
    service = serve_installed(program, config_file, log_path, port)
    try:
        refused = storescu(port, [chest], called_ae="PACS_AI", calling_ae="CR_ROOM1")
    finally:
        assert stop_process(service, timeout_s=60) == 0, log_path.read_text()[-3000:]
    assert refused.returncode != 0 and refused.acknowledged == []
    assert "Calling AE Title Not Recognized" in refused.output, refused.output
    events = log_events(log_path)
    [warning] = [e for e in events if e["event"] == "listener_refuses_every_caller"]
    assert "allowed_calling_ae_titles" in warning["detail"]
    [rejected] = [e for e in events if e["event"] == "association_rejected"]
    assert rejected["reason"] == "calling-ae-not-allowed"
    assert rejected["calling_ae_title"] == "CR_ROOM1"
    assert 'allowed_calling_ae_titles (e.g. ["CR_ROOM1"])' in rejected["fix"]
    assert "accept_any_calling_ae = true" in rejected["fix"]
    assert str(config_file) in rejected["fix"]
    assert not any(e["event"] == "listener_accepts_any_calling_ae" for e in events)
    status = subprocess.run([str(program), "status", "--config", str(config_file)],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 1, status.stdout + status.stderr
    assert "listener-refuses-every-caller: " in status.stdout

    # The admin says any caller may store, as the example config shows.
    config_file.write_text(set_config_key(text, "listener", "accept_any_calling_ae", "true"))
    log_path = tmp_path / "any-caller.log"
    service = serve_installed(program, config_file, log_path, port)
    try:
        stored = storescu(port, [chest], called_ae="PACS_AI", calling_ae="CR_ROOM1")
    finally:
        assert stop_process(service, timeout_s=60) == 0, log_path.read_text()[-3000:]
    assert stored.acknowledged == [str(chest)], stored.output
    events = log_events(log_path)
    [warning] = [e for e in events if e["event"] == "listener_accepts_any_calling_ae"]
    assert warning["level"] == "warning"
    assert not any(e["event"] in ("association_rejected", "listener_refuses_every_caller")
                   for e in events)
    status = subprocess.run([str(program), "status", "--config", str(config_file)],
                            capture_output=True, text=True, timeout=120)
    assert "listener-refuses-every-caller" not in status.stdout, status.stdout


@pytest.mark.real_peer
def test_the_guide_tls_check_works_against_the_guide_tls_listener(tiny_model, tmp_path):
    """The guide's [tls] example (mutual TLS) and its echoscu +tls command, as written."""
    from testbed.dicom_peers import free_port
    from testbed.environment import require_tool
    from testbed.real_peers import stop_process, wait_for_port
    from tests.tls_material import make_tls_material

    require_tool("echoscu")
    material = make_tls_material(tmp_path / "tls")
    files = {"server.pem": material.server_cert, "server.key": material.server_key,
             "clients-ca.pem": material.ca_cert, "client.pem": material.client_cert,
             "client.key": material.client_key, "pacs-ai-ca.pem": material.ca_cert}
    etc = tmp_path / "etc-pacs-ai"
    etc.mkdir()
    for name, source in files.items():
        shutil.copy(source, etc / name)
    tls_snippet = next(block for block in guide_blocks("toml") if block.startswith("[tls]"))
    assert "require_client_cert" in tls_snippet
    port = free_port()
    config = tmp_path / "pacs-ai.toml"
    config.write_text(
        f'[listener]\nhost = "127.0.0.1"\nport = {port}\nallowed_calling_ae_titles = ["MODALITY"]\n'
        f'[storage]\nspool_dir = "{tmp_path / "spool"}"\nmin_free_bytes = 0\n'
        f'[model]\npath = "{tiny_model}"\n[metrics]\nenabled = false\n'
        + tls_snippet.replace("/etc/pacs-ai/", f"{etc}/").replace(
            "require_client_cert = false", "require_client_cert = true") + "\n")
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        service = subprocess.Popen([sys.executable, "-m", "pacs_ai", "serve", "--config",
                                    str(config)], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_for_port(port, process=service, what="pacs-ai serve with TLS")
        command = guide_command("echoscu -v +tls").replace("pacs-ai-host 2762", f"127.0.0.1 {port}")
        result = subprocess.run(["bash", "-c", command], cwd=etc, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr + log_path.read_text()[-3000:]
        assert "Received Echo Response (Success)" in result.stdout + result.stderr
        # The same echo without TLS is refused: the listener speaks only TLS.
        plain = subprocess.run(["bash", "-c", command.replace(
            "+tls client.key client.pem +cf pacs-ai-ca.pem ", "")], cwd=etc,
            capture_output=True, text=True, timeout=60)
        assert plain.returncode != 0
    finally:
        assert stop_process(service, timeout_s=60) == 0, log_path.read_text()[-3000:]
