"""[workers] count / processes = "auto" (issue 16 item 1): derived from the CPUs and memory the
service may use, read from fake cgroup v2 files and affinity sets; explicit numbers win."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog

from pacs_ai.classify.capacity import (FILM_IN_FLIGHT_MB, HELPER_PROCESS_MB, MAIN_PROCESS_MB,
                                       MAX_AUTO_HELPERS, Resources, available_resources,
                                       size_workers, sized_config)
from pacs_ai.config import AUTO, ConfigError, WorkersConfig, load_config, parse_config

GIB = 2**30
MB = 2**20


def fake_cgroups(root: Path, own: str, files: dict[str, dict[str, str]]) -> Path:
    """A cgroup v2 tree under `root` (files per folder relative to it) and a /proc/self/cgroup
    naming `own` as this process's cgroup; returns the latter's path."""
    for folder, contents in files.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, text in contents.items():
            (root / folder / name).write_text(text + "\n")
    proc = root.parent / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return proc


def resources(cpus: float, memory_gib: float = 64) -> Resources:
    return Resources(cpus=cpus, affinity_cpus=int(cpus), cpu_quota=None,
                     memory_bytes=int(memory_gib * GIB), memory_source="physical memory")


# --- reading what the service may use ---------------------------------------------------------

def test_affinity_alone_without_cgroup_limits(tmp_path):
    root = tmp_path / "cgroup"
    proc = fake_cgroups(root, "/", {".": {"cgroup.controllers": "cpu memory"}})
    found = available_resources(cgroup_root=root, proc_cgroup=proc, affinity={0, 1, 2, 3},
                                physical_memory=16 * GIB)
    assert (found.cpus, found.affinity_cpus, found.cpu_quota) == (4.0, 4, None)
    assert (found.memory_bytes, found.memory_source) == (16 * GIB, "physical memory")


def test_container_quota_and_memory_max_at_the_cgroup_root(tmp_path):
    # a container sees its own cgroup as the root: `docker run --cpus 2.5 --memory 3g`
    root = tmp_path / "cgroup"
    proc = fake_cgroups(root, "/", {".": {"cpu.max": "250000 100000",
                                          "memory.max": str(3 * GIB)}})
    found = available_resources(cgroup_root=root, proc_cgroup=proc, affinity=set(range(16)),
                                physical_memory=128 * GIB)
    assert found.cpus == 2.5 and found.cpu_quota == 2.5 and found.affinity_cpus == 16
    assert (found.memory_bytes, found.memory_source) == (3 * GIB, "cgroup memory.max")


def test_systemd_unit_limits_and_the_tighter_of_unit_and_slice(tmp_path):
    # MemoryMax= and CPUQuota= of the unit, a tighter memory limit on its slice
    root = tmp_path / "cgroup"
    proc = fake_cgroups(root, "/system.slice/pacs-ai.service", {
        "system.slice": {"memory.max": str(1 * GIB), "cpu.max": "max 100000"},
        "system.slice/pacs-ai.service": {"memory.max": str(1536 * MB), "cpu.max": "400000 100000"},
    })
    found = available_resources(cgroup_root=root, proc_cgroup=proc, affinity=set(range(8)),
                                physical_memory=32 * GIB)
    assert found.cpus == 4.0 and found.cpu_quota == 4.0
    assert found.memory_bytes == 1 * GIB


def test_unlimited_files_and_no_cgroup_v2(tmp_path):
    root = tmp_path / "cgroup"
    proc = fake_cgroups(root, "/a", {"a": {"cpu.max": "max 100000", "memory.max": "max"}})
    found = available_resources(cgroup_root=root, proc_cgroup=proc, affinity={0, 1},
                                physical_memory=8 * GIB)
    assert (found.cpus, found.cpu_quota, found.memory_source) == (2.0, None, "physical memory")
    # cgroup v1 only (no "0::" line): affinity and physical memory
    proc.write_text("4:memory:/user.slice\n")
    found = available_resources(cgroup_root=root, proc_cgroup=proc, affinity={0, 1, 2},
                                physical_memory=8 * GIB)
    assert (found.cpus, found.memory_bytes) == (3.0, 8 * GIB)


def test_a_quota_above_the_affinity_cpus_does_not_add_cpus(tmp_path):
    root = tmp_path / "cgroup"
    proc = fake_cgroups(root, "/", {".": {"cpu.max": "800000 100000"}})
    found = available_resources(cgroup_root=root, proc_cgroup=proc, affinity={0, 1},
                                physical_memory=8 * GIB)
    assert found.cpus == 2.0


def test_the_real_machine_is_readable():
    found = available_resources()
    assert found.cpus >= 1 and found.affinity_cpus >= 1 and found.memory_bytes > 256 * MB


# --- the rule ----------------------------------------------------------------------------------

AUTO_WORKERS = WorkersConfig(count=AUTO, processes=AUTO, batch_size=4)


@pytest.mark.parametrize("cpus, count, processes, limited_by", [
    (1, 1, 1, "cpu"),     # one helper even on one CPU: a crashing decoder takes only it down
    (1.5, 1, 1, "cpu"),
    (2, 1, 1, "cpu"),     # the development machine: as the shipped default was
    (3, 1, 2, "cpu"),
    (4, 1, 3, "cpu"),
    (5, 1, 4, "cpu"),
    (8, 2, 3, "cpu"),     # 7 helpers over two workers of at most batch_size helpers
    (9, 2, 4, "cpu"),
    (16, 2, 4, "cap"),
    (64, 2, 4, "cap"),
])
def test_helpers_follow_the_cpus(cpus, count, processes, limited_by):
    sizing = size_workers(AUTO_WORKERS, resources(cpus), max_associations=10)
    assert (sizing.count, sizing.processes, sizing.limited_by) == (count, processes, limited_by)
    assert sizing.helpers <= max(1, min(MAX_AUTO_HELPERS, int(cpus) - 1))


def test_memory_limits_the_helpers():
    # the shipped unit's MemoryMax=1536M on 16 CPUs: (1536 - 650 - 10 x 30) / 210 = 2.8
    sizing = size_workers(AUTO_WORKERS, resources(16, memory_gib=1.5), max_associations=10)
    assert (sizing.count, sizing.processes, sizing.limited_by) == (1, 2, "memory")
    expected = (1536 - MAIN_PROCESS_MB - 10 * FILM_IN_FLIGHT_MB) // HELPER_PROCESS_MB
    assert sizing.helpers == expected
    # 3 GiB: 10 helpers would fit, the CPUs allow 8
    assert size_workers(AUTO_WORKERS, resources(16, 3), max_associations=10).helpers == 8
    # more associations in flight leave room for fewer helpers
    assert size_workers(AUTO_WORKERS, resources(16, 1.5), max_associations=20).helpers == 1


def test_too_little_memory_for_a_helper_decodes_in_the_worker_thread():
    sizing = size_workers(AUTO_WORKERS, resources(8, memory_gib=1.0), max_associations=10)
    assert (sizing.count, sizing.processes, sizing.limited_by) == (1, 0, "memory")


def test_explicit_numbers_win():
    both = WorkersConfig(count=3, processes=0)
    assert size_workers(both, resources(64), 10) == size_workers(both, resources(1, 0.5), 10)
    sizing = size_workers(both, resources(64), 10)
    assert (sizing.count, sizing.processes, sizing.limited_by) == (3, 0, "config")
    # processes fixed, count derived: as many workers as the helpers allow, one at least
    assert size_workers(WorkersConfig(count=AUTO, processes=2), resources(8), 10).count == 3
    assert size_workers(WorkersConfig(count=AUTO, processes=2), resources(2), 10).count == 1
    assert size_workers(WorkersConfig(count=AUTO, processes=0), resources(8), 10).count == 1
    # count fixed, processes derived: the helpers shared out over the workers
    assert size_workers(WorkersConfig(count=2, processes=AUTO), resources(8), 10).processes == 3
    assert size_workers(WorkersConfig(count=4, processes=AUTO), resources(2), 10).processes == 1


# --- the config and the start-up log -----------------------------------------------------------

def test_auto_is_the_default_and_explicit_integers_parse(tmp_path):
    assert parse_config({}, base_dir=tmp_path).workers.count == AUTO
    assert parse_config({}, base_dir=tmp_path).workers.processes == AUTO
    workers = parse_config({"workers": {"count": 2, "processes": 0}}, base_dir=tmp_path).workers
    assert (workers.count, workers.processes) == (2, 0)
    workers = parse_config({"workers": {"count": "auto", "processes": "Auto"}},
                           base_dir=tmp_path).workers
    assert (workers.count, workers.processes) == (AUTO, AUTO)


@pytest.mark.parametrize("value", ['"many"', "0", "1.5", "true"])
def test_a_bad_count_names_the_key_and_auto(tmp_path, value):
    path = tmp_path / "pacs-ai.toml"
    path.write_text(f"[workers]\ncount = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "[workers] count" in str(caught.value)


def test_sized_config_logs_the_figures_it_used(tmp_path):
    config = parse_config({}, base_dir=tmp_path)
    with structlog.testing.capture_logs() as logs:
        sized = sized_config(config, resources(4, memory_gib=8))
    assert (sized.workers.count, sized.workers.processes) == (1, 3)
    assert sized.workers.batch_size == config.workers.batch_size
    [event] = [e for e in logs if e["event"] == "workers_sized"]
    assert event["count"] == 1 and event["processes"] == 3 and event["helper_processes"] == 3
    assert event["cpus"] == 4 and event["memory_mb"] == 8192
    assert event["configured_count"] == "auto" and event["limited_by"] == "cpu"
    json.dumps(event)  # a JSON log line


@pytest.mark.parametrize("cpus, processes, threads", [
    (1, "auto", 1),   # one helper: one thread still
    (2, "auto", 1),   # the development machine: 1 helper, the model keeps one CPU
    (4, "auto", 1),   # 1 x 3 helpers
    (8, "auto", 2),   # 2 x 3 helpers
    (16, "auto", 8),  # 8 helpers (the cap)
    (2, 0, 2),        # no helper: the model may use both
])
def test_the_models_threads_are_the_cpus_the_helpers_leave(tmp_path, cpus, processes, threads):
    """torch's default (a thread per core) had the model wait for cores the helper and the
    listener held; [workers] torch_threads = 0 now means what the helpers leave (issue 25)."""
    config = parse_config({"workers": {"processes": processes}}, base_dir=tmp_path)
    assert config.workers.torch_threads == 0
    with structlog.testing.capture_logs() as logs:
        sized = sized_config(config, resources(cpus, memory_gib=64))
    assert sized.workers.torch_threads == threads
    [event] = [e for e in logs if e["event"] == "workers_sized"]
    assert event["torch_threads"] == threads and event["configured_torch_threads"] == 0


def test_a_configured_number_of_model_threads_wins(tmp_path):
    config = parse_config({"workers": {"torch_threads": 3}}, base_dir=tmp_path)
    assert sized_config(config, resources(16, memory_gib=64)).workers.torch_threads == 3
    assert sized_config(config, resources(1, memory_gib=64)).workers.torch_threads == 3


@pytest.mark.real_peer
def test_the_service_sizes_itself_under_taskset(tmp_path):
    """`taskset -c 0` restricts the service to one CPU: its log says what it chose from it."""
    import os
    import shutil
    import subprocess
    import sys

    from testbed.environment import REPO_ROOT, require_tool

    require_tool("taskset")
    if len(os.sched_getaffinity(0)) < 1:
        pytest.skip("no CPU to pin to")
    cpu = min(os.sched_getaffinity(0))
    code = ("import structlog, json, sys\n"
            "from pacs_ai.ops.logs import configure_logging\n"
            "configure_logging('info', 'json')\n"
            "from pacs_ai.config import parse_config\n"
            "from pacs_ai.classify.capacity import sized_config\n"
            "from pathlib import Path\n"
            "sized_config(parse_config({}, base_dir=Path('.')))\n")
    result = subprocess.run([shutil.which("taskset"), "-c", str(cpu), sys.executable, "-c", code],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    line = next(json.loads(text) for text in (result.stdout + result.stderr).splitlines()
                if '"workers_sized"' in text)
    assert line["affinity_cpus"] == 1 and (line["count"], line["processes"]) == (1, 1)
