"""deploy/kubernetes/ and the Containerfile (issue 16, item 3).

The manifests are validated against Kubernetes' own OpenAPI schemas with kubernetes-validate
(its schemas ship inside the package: no cluster, no network), strictly (an unknown field is an
error). The ConfigMap's TOML goes through pacs-ai's own config parser, and the pieces that must
agree (ports, probe paths, volume paths, names, the stop grace, the memory ceiling) are checked
against each other, the systemd unit and the config. The files the Containerfile copies are
built and installed as its pip does, and that install serves the image's config, outside a
container. Building and running the image itself needs podman, a base image and PyPI: where this
machine cannot, that test says why and skips.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
import tomllib
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pacs_ai.config import parse_config
from testbed.environment import REPO_ROOT
from tests.test_deploy import seconds, unit_service_section

MANIFESTS = REPO_ROOT / "deploy" / "kubernetes"
CONTAINERFILE = REPO_ROOT / "Containerfile"
IMAGE_CONFIG = MANIFESTS / "pacs-ai.toml"
# The oldest Kubernetes the manifests are written for (policy/v1 PDBs, probes by port name).
KUBERNETES_VERSION = "1.30"


def documents() -> list[dict]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def one(kind: str, name: str | None = None) -> dict:
    found = [doc for doc in documents() if doc["kind"] == kind
             and (name is None or doc["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container() -> dict:
    return one("StatefulSet")["spec"]["template"]["spec"]["containers"][0]


def parsed_image_config(tmp_path: Path, text: str | None = None):
    """The image's config through pacs-ai's parser, its absolute paths (the model in the image,
    the TLS files from the Secret) put under tmp_path with placeholder files."""
    text = IMAGE_CONFIG.read_text() if text is None else text
    for absolute in set(re.findall(r'"(/(?:opt|etc)/pacs-ai/[^"]+)"', text)):
        placeholder = tmp_path / absolute.lstrip("/")
        placeholder.parent.mkdir(parents=True, exist_ok=True)
        placeholder.write_text("placeholder\n")
        text = text.replace(f'"{absolute}"', f'"{placeholder}"')
    return parse_config(tomllib.loads(text), base_dir=tmp_path)


# --- the manifests are valid Kubernetes ---------------------------------------------------------

def test_every_manifest_is_valid_kubernetes_with_the_bundled_schemas():
    kinds = []
    for doc in documents():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["ConfigMap", "PodDisruptionBudget", "Secret", "Service", "Service",
                             "StatefulSet"]


def test_the_validator_refuses_a_misspelt_field_and_a_wrong_type():
    """The check above could fail: a typo a human makes, and a value of the wrong type."""
    statefulset = one("StatefulSet")
    misspelt = copy.deepcopy(statefulset)
    probe = misspelt["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe")
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = probe
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    wrong_type = copy.deepcopy(statefulset)
    wrong_type["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)


def test_the_secret_holds_placeholders_not_keys():
    secret = one("Secret", "pacs-ai-tls")
    for name, value in secret["stringData"].items():
        assert "PRIVATE KEY-----" not in value and "BEGIN CERTIFICATE" not in value, name
        assert value.startswith("REPLACE WITH"), name


# --- the config the pods run --------------------------------------------------------------------

def test_the_configmap_carries_the_image_config_and_pacs_ai_accepts_it(tmp_path):
    configmap = one("ConfigMap", "pacs-ai-config")
    assert configmap["data"]["pacs-ai.toml"] == IMAGE_CONFIG.read_text(), \
        "configmap.yaml and deploy/kubernetes/pacs-ai.toml differ: keep them the same"
    config = parsed_image_config(tmp_path)
    assert config.listener.host == "0.0.0.0" and config.metrics.host == "0.0.0.0"
    assert config.metrics.enabled and not config.tls.enabled


def test_the_configmap_tls_lines_name_the_secret_files(tmp_path):
    """Uncommenting the [tls] file lines turns TLS on with the files the Secret provides."""
    text = re.sub(r"^# ((?:cert|key|ca)_file = )", r"\1", IMAGE_CONFIG.read_text(), flags=re.M)
    config = parsed_image_config(tmp_path, text)
    assert config.tls.enabled
    mount = next(m for m in container()["volumeMounts"] if m["name"] == "tls")["mountPath"]
    files = {config.tls.cert_file.name, config.tls.key_file.name, config.tls.ca_file.name}
    assert files == set(one("Secret", "pacs-ai-tls")["stringData"])
    for path in (config.tls.cert_file, config.tls.key_file, config.tls.ca_file):
        assert str(path).endswith(f"{mount}/{path.name}")


def test_ports_probes_and_volumes_agree_with_the_config(tmp_path):
    config = parsed_image_config(tmp_path)
    statefulset = one("StatefulSet")
    pod = statefulset["spec"]["template"]
    main = container()
    ports = {port["name"]: port["containerPort"] for port in main["ports"]}
    assert ports == {"dicom": config.listener.port, "metrics": config.metrics.port}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert main["args"] == ["serve", "--config", "/etc/pacs-ai/pacs-ai.toml"]
    mounts = {mount["name"]: mount["mountPath"] for mount in main["volumeMounts"]}
    assert mounts["config"] == "/etc/pacs-ai/pacs-ai.toml"
    # The spool is the replica's own claim, not an emptyDir that a rescheduled pod would lose.
    claims = [claim["metadata"]["name"] for claim in statefulset["spec"]["volumeClaimTemplates"]]
    assert claims == ["spool"] and mounts["spool"] == IMAGE_CONFIG.read_text().split(
        'spool_dir = "', 1)[1].split('"', 1)[0]
    assert config.storage.spool_dir == Path(mounts["spool"])
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    assert "spool" not in volumes
    assert volumes["config"]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    assert volumes["tls"]["secret"]["secretName"] == one("Secret")["metadata"]["name"]
    # Services and the PDB select the pods; the headless one governs the StatefulSet.
    labels = pod["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in (one("Service", "pacs-ai-dicom"), one("Service", "pacs-ai-metrics")):
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    assert one("Service", "pacs-ai-dicom")["spec"]["ports"][0]["port"] == config.listener.port
    assert statefulset["spec"]["serviceName"] == "pacs-ai-metrics"
    assert one("Service", "pacs-ai-metrics")["spec"]["clusterIP"] == "None"
    assert one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] != 0


def test_termination_grace_covers_the_service_stop_like_the_unit(tmp_path):
    """The kubelet's SIGKILL comes after terminationGracePeriodSeconds, systemd's after
    TimeoutStopSec: the same time, more than twice the listener's grace plus the preStop
    pause."""
    config = parsed_image_config(tmp_path)
    pod = one("StatefulSet")["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace == seconds(unit_service_section()["TimeoutStopSec"][0])
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert grace > 2 * config.limits.shutdown_grace_seconds + float(pre_stop[1])


def quantity_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 2**10, "M": 2**20, "G": 2**30}
    number, unit = re.fullmatch(r"(\d+)([KMG]i?)", quantity).groups()
    return int(number) * units[unit]  # systemd's K/M/G are powers of 1024 too


def test_memory_limit_is_the_units_memory_max_and_the_request_is_below_it():
    resources = container()["resources"]
    memory_max = unit_service_section()["MemoryMax"][0]
    assert quantity_bytes(resources["limits"]["memory"]) == quantity_bytes(memory_max)
    assert quantity_bytes(resources["requests"]["memory"]) < quantity_bytes(memory_max)
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]


# --- the Containerfile ------------------------------------------------------------------------

def containerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", CONTAINERFILE.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_containerfile_is_debian_slim_non_root_with_the_model_and_the_image_config(tmp_path):
    instructions = containerfile_instructions()
    arguments = {name: [args for n, args in instructions if n == name]
                 for name, _ in instructions}
    assert arguments["FROM"] == ["docker.io/library/debian:bookworm-slim"]  # Python 3.11
    assert arguments["USER"] == ["10001:10001"]
    assert one("StatefulSet")["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
    for copy_args in arguments["COPY"]:
        *sources, target = copy_args.split()
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
    assert "deploy/kubernetes/pacs-ai.toml /etc/pacs-ai/pacs-ai.toml" in arguments["COPY"]
    config = parsed_image_config(tmp_path)
    assert f"{config.model.path}".endswith("/opt/pacs-ai/models/pacs-ai-pneumonia.pt")
    build = " ".join(arguments["RUN"])
    assert "/opt/pacs-ai/models/pacs-ai-pneumonia.pt" in build
    # The same PyTorch build as the installer and the test venv.
    torch_pin = re.search(r'"torch==([\d.]+)"', (REPO_ROOT / "scripts/setup-venv.sh").read_text())
    assert arguments["ARG"].count(f"TORCH_VERSION={torch_pin.group(1)}") == 1
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in arguments["ARG"]
    assert arguments["ENTRYPOINT"] == ['["/opt/pacs-ai/venv/bin/pacs-ai"]']
    assert arguments["CMD"] == [str(["serve", "--config", "/etc/pacs-ai/pacs-ai.toml"])
                                .replace("'", '"')]


def copy_like_the_containerfile(root: Path) -> None:
    """Carry out the Containerfile's COPY lines with `root` as the image's /."""
    for copy_args in [args for name, args in containerfile_instructions() if name == "COPY"]:
        *sources, target = copy_args.split()
        destination = root / target.lstrip("/")
        for source in sources:
            path = REPO_ROOT / source
            into = destination / path.name if target.endswith("/") else destination
            into.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, into, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, into)


@pytest.mark.slow
def test_the_image_contents_install_and_serve_the_image_config_outside_a_container(tmp_path):
    """What podman cannot check here, short of a container: the files the Containerfile copies
    build pacs-ai (a wheel, installed as the image's pip does, not editable), and that install
    serves the image's config (its addresses, ports and paths moved to loopback and tmp_path):
    /readyz 200 with the shipped model, C-ECHO answered from the calling AE title named in
    allowed_calling_ae_titles and refused from another, SIGTERM ends it with status 0."""
    import os
    import signal
    import sys

    from testbed.dicom_peers import SimulatedModality, free_port

    image = tmp_path / "image"
    copy_like_the_containerfile(image)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # Offline with this environment's setuptools when it is as new as pyproject.toml asks;
    # else pip fetches one, as the image's build does.
    from importlib.metadata import version
    isolation = [] if int(version("setuptools").split(".")[0]) < 68 else ["--no-build-isolation"]
    built = subprocess.run([*pip, "wheel", "--no-deps", *isolation, "-w",
                            str(tmp_path / "dist"), str(image / "src")],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("pacs_ai-*.whl"))
    site = tmp_path / "site"
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    environment = {**os.environ, "PYTHONPATH": str(site), "PYTHONUNBUFFERED": "1"}
    where = subprocess.run([sys.executable, "-c", "import pacs_ai; print(pacs_ai.__file__)"],
                           cwd=tmp_path, env=environment, capture_output=True, text=True)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr

    dicom_port, metrics_port = free_port(), free_port()
    text = (image / "etc/pacs-ai/pacs-ai.toml").read_text()
    for written, here in (("port = 11112", f"port = {dicom_port}"),
                          ("port = 9108", f"port = {metrics_port}"),
                          ('host = "0.0.0.0"', 'host = "127.0.0.1"'),
                          # the admin names the modalities; until then every caller is refused
                          ("allowed_calling_ae_titles = []",
                           'allowed_calling_ae_titles = ["MODALITY"]'),
                          ('"/var/lib/pacs-ai"', f'"{tmp_path / "spool"}"'),
                          ('"/opt/pacs-ai/models/', f'"{image / "src/deploy/models"}/')):
        assert written in text, written
        text = text.replace(written, here)
    config = tmp_path / "pacs-ai.toml"
    config.write_text(text)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        service = subprocess.Popen([sys.executable, "-m", "pacs_ai", "serve", "--config",
                                    str(config)], cwd=tmp_path, env=environment,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, ready = time.monotonic() + 120, None
        while time.monotonic() < deadline and service.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz",
                                            timeout=2) as response:
                    ready = json.loads(response.read())
                    break
            except OSError:
                time.sleep(0.5)
        assert ready is not None and ready["ok"], log_path.read_text()[-3000:]
        assert ready["model"].startswith("pacs-ai-pneumonia ")
        assert SimulatedModality(dicom_port).echo() == 0x0000
        assert not SimulatedModality(dicom_port, calling_ae_title="STRANGER"
                                     ).association_accepted()
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=90) == 0, log_path.read_text()[-3000:]
    finally:
        if service.poll() is None:
            service.kill()
            service.wait(timeout=30)


def podman_problem() -> str | None:
    """Why this machine cannot build and run the image with podman, or None."""
    podman = shutil.which("podman")
    if podman is None:
        return "podman not installed"
    pulled = subprocess.run([podman, "pull", "docker.io/library/debian:bookworm-slim"],
                            capture_output=True, text=True, timeout=120)
    if pulled.returncode != 0:
        return f"podman cannot pull the base image: {pulled.stderr.strip()[-300:]}"
    ran = subprocess.run([podman, "run", "--rm", "docker.io/library/debian:bookworm-slim",
                          "true"], capture_output=True, text=True, timeout=120)
    if ran.returncode != 0:
        return f"podman cannot run a container here: {ran.stderr.strip()[-300:]}"
    return None


@pytest.mark.slow
def test_the_image_builds_and_serves_with_podman(tmp_path):
    """Build the image, start it, wait for /readyz, see an association refused (its config
    names no calling AE title yet), stop it with SIGTERM within the grace. Needs podman that can
    pull the base image, reach PyPI and run containers."""
    problem = podman_problem()
    if problem is not None:
        pytest.skip(problem)
    from testbed.dicom_peers import SimulatedModality, free_port

    tag = "localhost/pacs-ai:test"
    built = subprocess.run(["podman", "build", "-t", tag, "-f", str(CONTAINERFILE),
                            str(REPO_ROOT)], capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    dicom_port, metrics_port = free_port(), free_port()
    name = f"pacs-ai-test-{dicom_port}"
    started = subprocess.run(["podman", "run", "-d", "--name", name,
                              "-p", f"127.0.0.1:{dicom_port}:11112",
                              "-p", f"127.0.0.1:{metrics_port}:9108", tag],
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline and status != 200:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz",
                                            timeout=2) as response:
                    status = response.status
            except OSError:
                time.sleep(1)
        assert status == 200, subprocess.run(["podman", "logs", name], capture_output=True,
                                             text=True).stderr[-3000:]
        # the image's config names no calling AE title yet: every caller is refused
        assert not SimulatedModality(dicom_port).association_accepted()
        stopped = subprocess.run(["podman", "stop", "-t", "90", name], capture_output=True,
                                 text=True, timeout=120)
        assert stopped.returncode == 0
        exit_code = subprocess.run(["podman", "inspect", "-f", "{{.State.ExitCode}}", name],
                                   capture_output=True, text=True).stdout.strip()
        assert exit_code == "0"
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, timeout=60)
