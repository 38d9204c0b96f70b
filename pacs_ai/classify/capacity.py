"""How many workers and helper processes to run: `[workers] count` / `processes` = "auto".

The service scales up with the machine without hand-tuning (issue 16): from the CPUs it may use
and the memory it may use, both as the kernel enforces them, so a container or a systemd unit
with a quota gets what fits in it rather than what the host has.

- CPUs: the CPUs of the process's affinity mask (`taskset`, systemd CPUAffinity=, a container's
  cpuset), and the cgroup v2 CPU quota (`cpu.max`, "QUOTA PERIOD" or "max"; a container's
  `--cpus`, systemd CPUQuota=) of the service's cgroup and each cgroup above it; the smaller.
- Memory: the cgroup v2 `memory.max` (systemd MemoryMax=, a container's `--memory`) of the
  service's cgroup and those above it, else the machine's physical memory.

The rule: one CPU for the main process (the listener, which receives in one Python process, the
model and the senders), one helper process for each further CPU, at most MAX_AUTO_HELPERS, and
no more than the memory holds after the main process and a film per association in flight.
The helpers are shared out over workers of at most `batch_size` helpers each, since a worker
hands one batch at a time to its own helpers. The model (in the main process) gets as many
threads as the CPUs the helpers leave, one at least (`[workers] torch_threads = 0`). An
explicit number in the config always wins.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from pacs_ai.config import AUTO, Config, WorkersConfig

log = structlog.get_logger()

# Peak memory per part, docs/benchmarks.md ("1 to 16 cores", heat maps on, the sum of each
# process's peak): 850-880 MB with one helper, each further helper 203-213 MB more (decoding a
# 10 MB film, its report and heat map), so the main process with its model about 640 MB (the
# 2-core VM measured less: 490-530 MB with one helper); and a film in flight per association
# (the systemd unit's sizing: 30 MB for a large film).
MAIN_PROCESS_MB = 650
HELPER_PROCESS_MB = 210
FILM_IN_FLIGHT_MB = 30
# The listener receives in one Python process (about 25 films/s of 10 MB on one core) and a
# helper prepares and reports a plain film in about 40 ms of CPU: beyond a few helpers only
# compressed films gain. Measured (docs/benchmarks.md, "1 to 16 cores"): 8 helpers at 8 and 16
# cores reported as fast as the bare receiver received at 4 associations; more cost memory.
MAX_AUTO_HELPERS = 8

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class Resources:
    """What the service may use, and where each figure came from (logged at start-up)."""
    cpus: float  # the smaller of the affinity CPUs and the quota (may be fractional)
    affinity_cpus: int
    cpu_quota: float | None  # CPUs' worth of the cgroup quota; None: no quota
    memory_bytes: int
    memory_source: str  # "cgroup memory.max" or "physical memory"


@dataclass(frozen=True)
class WorkerSizing:
    count: int
    processes: int
    limited_by: str  # what set the number of helpers: config, cpu, memory or cap

    @property
    def helpers(self) -> int:
        return self.count * self.processes


def available_resources(*, cgroup_root: Path = CGROUP_ROOT,
                        proc_cgroup: Path = PROC_SELF_CGROUP,
                        affinity: set[int] | None = None,
                        physical_memory: int | None = None) -> Resources:
    """The CPUs and memory this process may use (see the module's docstring); the parameters
    stand in for the system's files and calls in tests."""
    affinity_cpus = len(affinity if affinity is not None else os.sched_getaffinity(0))
    quota, memory = None, None
    for folder in _own_cgroups(cgroup_root, proc_cgroup):
        folder_quota = _cpu_quota(folder / "cpu.max")
        if folder_quota is not None:
            quota = folder_quota if quota is None else min(quota, folder_quota)
        folder_memory = _memory_max(folder / "memory.max")
        if folder_memory is not None:
            memory = folder_memory if memory is None else min(memory, folder_memory)
    if physical_memory is None:
        physical_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpus = float(affinity_cpus) if quota is None else min(float(affinity_cpus), quota)
    if memory is None or memory >= physical_memory:
        return Resources(cpus, affinity_cpus, quota, physical_memory, "physical memory")
    return Resources(cpus, affinity_cpus, quota, memory, "cgroup memory.max")


def size_workers(workers: WorkersConfig, resources: Resources,
                 max_associations: int) -> WorkerSizing:
    """Integers for `count` and `processes`: the configured ones, "auto" derived as above."""
    count_auto, processes_auto = workers.count == AUTO, workers.processes == AUTO
    if not count_auto and not processes_auto:
        return WorkerSizing(int(workers.count), int(workers.processes), "config")
    cpu_helpers = math.floor(resources.cpus) - 1  # one CPU for the main process
    by_cpu = max(1, min(MAX_AUTO_HELPERS, cpu_helpers))
    spare_mb = (resources.memory_bytes / 2**20 - MAIN_PROCESS_MB
                - max_associations * FILM_IN_FLIGHT_MB)
    by_memory = max(0, math.floor(spare_mb / HELPER_PROCESS_MB))
    helpers = min(by_cpu, by_memory)
    limited_by = ("memory" if by_memory < by_cpu
                  else "cap" if cpu_helpers > MAX_AUTO_HELPERS else "cpu")
    if not processes_auto:  # a fixed number of helpers per worker: as many workers as fit
        processes = int(workers.processes)
        count = 1 if processes == 0 else max(1, helpers // processes)
        return WorkerSizing(count, processes, limited_by)
    if not count_auto:  # a fixed number of workers: the helpers shared out, one each at least
        count = int(workers.count)
        return WorkerSizing(count, max(1, helpers // count) if helpers else 0, limited_by)
    if helpers == 0:  # not even one helper fits: decode in the worker thread
        return WorkerSizing(1, 0, limited_by)
    count = math.ceil(helpers / workers.batch_size)
    return WorkerSizing(count, helpers // count, limited_by)


def _own_cgroups(cgroup_root: Path, proc_cgroup: Path) -> list[Path]:
    """The cgroup v2 folder of this process and each folder above it up to the root (a quota
    on a parent slice limits its children too); [] without cgroup v2."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    relative = next((line[3:] for line in lines if line.startswith("0::")), None)
    if relative is None:
        return []
    folder = cgroup_root / relative.strip().lstrip("/")
    folders = [folder]
    while folder != cgroup_root and cgroup_root in folder.parents:
        folder = folder.parent
        folders.append(folder)
    return folders


def _cpu_quota(path: Path) -> float | None:
    """CPUs' worth of a cgroup v2 `cpu.max` ("QUOTA PERIOD"); None for "max" or no file."""
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _memory_max(path: Path) -> int | None:
    """Bytes of a cgroup v2 `memory.max`; None for "max" or no file."""
    try:
        value = path.read_text().strip()
        return None if value == "max" else int(value)
    except (OSError, ValueError):
        return None


def model_threads(workers: WorkersConfig, resources: Resources, helpers: int) -> int:
    """[workers] torch_threads, 0 derived: the CPUs the helpers leave the main process, one at
    least. torch's own default, a thread per core, has the model's threads wait for cores the
    helpers and the listener hold: on the 2-core VM one thread cost 11 ms less CPU per film in
    a burst than two (mean of four pairs, 0 to 19), latency and throughput no worse
    (docs/benchmarks.md, "The model's threads")."""
    if workers.torch_threads:
        return workers.torch_threads
    return max(1, math.floor(resources.cpus) - helpers)


def sized_config(config: Config, resources: Resources | None = None) -> Config:
    """`config` with integers for [workers] count and processes, logged (`workers_sized`) with
    the figures they came from."""
    resources = resources or available_resources()
    sizing = size_workers(config.workers, resources, config.limits.max_associations)
    torch_threads = model_threads(config.workers, resources, sizing.helpers)
    log.info("workers_sized", count=sizing.count, processes=sizing.processes,
             helper_processes=sizing.helpers, limited_by=sizing.limited_by,
             torch_threads=torch_threads, configured_torch_threads=config.workers.torch_threads,
             configured_count=config.workers.count,
             configured_processes=config.workers.processes,
             cpus=round(resources.cpus, 2), affinity_cpus=resources.affinity_cpus,
             cpu_quota=None if resources.cpu_quota is None else round(resources.cpu_quota, 2),
             memory_mb=round(resources.memory_bytes / 2**20),
             memory_source=resources.memory_source)
    workers = dataclasses.replace(config.workers, count=sizing.count, processes=sizing.processes,
                                  torch_threads=torch_threads)
    return dataclasses.replace(config, workers=workers)
