"""Replicas that share nothing but the PACS (issue 16, item 2): three `pacs-ai serve` processes,
each with its own spool, behind HAProxy in TCP mode (deploy/haproxy/pacs-ai.cfg as shipped, with
loopback addresses put in), Orthanc as the PACS, four modality streams through HAProxy.

One replica is killed with SIGKILL in the middle of the streams. The modalities do what a modality
does: a film whose C-STORE got no Success is sent again (through HAProxy, so possibly to another
replica); the killed replica then restarts on its own spool and delivers what it had
acknowledged. Report UIDs derive from the source image (pacs_ai.report.uids), so a film classified by
two replicas (stored by the killed one but not acknowledged, then re-sent) gives the PACS the
same report twice, and it keeps one. Then one replica is stopped with SIGTERM while it still has
an association: it stops taking new associations at once, /readyz turns 503, HAProxy takes it
out and routes new associations to the others, and the running association still finishes.

Two smaller set-ups: a replica below its spool floor, which still answers TCP and C-ECHO, is kept
out by the /readyz check (why the sample does not check the DICOM port); and the metrics of two
replicas add up to what the modalities and the PACS saw (issue 16 item 4).
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from pacs_ai.model.model import PneumoniaModel
from pacs_ai.report.uids import report_uid
from testbed.dicom_peers import (CR_IMAGE_STORAGE, RecordingPacs, ServiceProcess, SimulatedModality,
                                 free_port, port_open, synthetic_radiograph, wait_until,
                                 write_service_config)
from testbed.environment import require_tool
from testbed.real_peers import Modality, Orthanc, orthanc_destination, spool_jobs
from tests.haproxy_peer import SAMPLE_CONFIG, Backend, HAProxy, check_config

pytestmark = pytest.mark.real_peer

REPLICAS = 3
STREAMS = 4
FILMS_PER_STREAM = 40
SECONDS_BETWEEN_FILMS = 0.05  # a stream lasts a few seconds, so the kill lands inside it
KILL_AFTER_ACKNOWLEDGED = 40
RESEND_PAUSE_S = 0.5  # a modality waits a moment before it sends again
# The sample's checks (every 2 s, out after 2 failures, back after 2 successes) plus slack for
# a loaded machine.
HAPROXY_SETTLE_S = 20
REPORTS_TIMEOUT_S = 120


@dataclass
class Replica:
    name: str
    folder: Path
    config: Path
    health_port: int
    service: ServiceProcess | None = None

    @property
    def spool(self) -> Path:
        return self.folder / "spool"

    @property
    def dicom_port(self) -> int:
        assert self.service is not None
        return self.service.port

    def start(self) -> "Replica":
        self.service = ServiceProcess(self.config, self.folder / "serve.log").start()
        return self

    def backend(self) -> Backend:
        return Backend(self.name, self.dicom_port, self.health_port)

    def readyz(self) -> tuple[int | None, dict]:
        """(HTTP status, JSON) of its /readyz; (None, {}) when nothing answers."""
        url = f"http://127.0.0.1:{self.health_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())
        except OSError:
            return None, {}


@dataclass
class Stream:
    """One modality: sends its films through HAProxy and sends again whatever got no Success,
    each time over a new association, until every film is acknowledged."""

    calling_ae_title: str
    films: list[Dataset]
    acknowledged: set[str] = field(default_factory=set)
    associations: int = 0
    # Films that got no Success in an attempt (on a cut association: the one in flight and
    # those after it), each sent again in the next.
    not_acknowledged: int = 0

    def run(self, port: int, deadline: float) -> None:
        while len(self.acknowledged) < len(self.films) and time.monotonic() < deadline:
            pending = [ds for ds in self.films if ds.SOPInstanceUID not in self.acknowledged]
            self.associations += 1
            modality = SimulatedModality(port, calling_ae_title=self.calling_ae_title,
                                         timeout=10)
            for result in modality.send(pending, interval=SECONDS_BETWEEN_FILMS):
                if result.acknowledged:
                    self.acknowledged.add(result.sop_instance_uid)
                else:
                    self.not_acknowledged += 1
            if len(self.acknowledged) < len(self.films):
                time.sleep(RESEND_PAUSE_S)


def films_of_one_study(count: int, seed: int) -> list[Dataset]:
    study = generate_uid()
    return [synthetic_radiograph(seed=seed + index, rows=128, columns=128,
                                 study_instance_uid=study) for index in range(count)]


def expected_reports(model_path: Path, films: list[Dataset]) -> dict[str, list[str]]:
    """Study UID -> the report UIDs it must hold at the end, one per film, sorted."""
    info = PneumoniaModel.load(model_path).info
    studies: dict[str, list[str]] = {}
    for ds in films:
        studies.setdefault(str(ds.StudyInstanceUID), []).append(
            report_uid(str(ds.SOPInstanceUID), info.name, info.version))
    return {study: sorted(uids) for study, uids in studies.items()}


def reports_at_pacs(orthanc: Orthanc, studies: list[str]) -> dict[str, list[str]]:
    """Study UID -> the SR SOP Instance UIDs Orthanc holds in it, sorted (a UID stored twice
    would appear twice)."""
    return {study: sorted(orthanc.study_sop_instance_uids(study, modality="SR"))
            for study in studies}


def start_all(replicas: list[Replica]) -> None:
    """Start the replicas at once (each waits for its model and its first C-ECHO)."""
    with ThreadPoolExecutor(len(replicas)) as pool:
        list(pool.map(Replica.start, replicas))


def kill_all(replicas: list[Replica]) -> None:
    for replica in replicas:
        if replica.service is not None:
            replica.service.kill()


def all_jobs(replicas: list[Replica]) -> dict[str, dict]:
    """Replica name -> its spool's jobs by SOP Instance UID."""
    return {replica.name: spool_jobs(replica.spool) for replica in replicas}


def test_the_sample_haproxy_config_is_valid_appended_to_debians_default():
    """The guide says: append deploy/haproxy/pacs-ai.cfg to Debian's /etc/haproxy/haproxy.cfg."""
    debian_default = Path("/etc/haproxy/haproxy.cfg")
    if not debian_default.is_file():
        pytest.skip("no /etc/haproxy/haproxy.cfg (Debian's haproxy package) here")
    checked = check_config(debian_default, SAMPLE_CONFIG)
    output = checked.stdout + checked.stderr
    assert checked.returncode == 0 and "[WARNING]" not in output and "[ALERT]" not in output, \
        output


@pytest.mark.slow
def test_three_replicas_behind_haproxy_a_kill_9_and_a_drain_lose_no_film(tmp_path, tiny_model):
    require_tool("Orthanc")
    model_path = tiny_model
    with Orthanc(tmp_path / "orthanc", modalities=[Modality("PACS_AI", 104)]) as orthanc:
        replicas = []
        for index in range(1, REPLICAS + 1):
            name = f"pacs-ai-{index}"
            config, health_port = replica_config(tmp_path / name, model_path,
                                                 destinations=[orthanc_destination(orthanc)])
            replicas.append(Replica(name, tmp_path / name, config, health_port))
        proxy = None
        try:
            start_all(replicas)
            proxy = HAProxy(tmp_path / "haproxy", [replica.backend() for replica in replicas])
            proxy.start()
            for replica in replicas:
                assert proxy.wait_for_state(replica.name, "UP", HAPROXY_SETTLE_S), \
                    proxy.servers()
            run_kill_9_phase(model_path, orthanc, proxy, replicas)
            run_drain_phase(model_path, orthanc, proxy, replicas)
        finally:
            if proxy is not None:
                proxy.stop()
                print(proxy.log_tail(3000))
            kill_all(replicas)


def replica_config(folder: Path, model_path: Path, *, destinations: list[dict],
                   storage: dict | None = None, processes: int = 0) -> tuple[Path, int]:
    """A replica's config (its own spool in `folder`) and its metrics/health port. Several
    services share this machine's cores: by default they decode in the worker thread."""
    folder.mkdir()
    health_port = free_port()
    config = write_service_config(folder, model=model_path, destinations=destinations, tables={
        # A draining replica waits for its running associations up to this long.
        "limits": {"shutdown_grace_seconds": 30},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": health_port},
        "workers": {"count": 1, "processes": processes, "torch_threads": 1},
        "storage": storage or {},
        "log": {"level": "info"}})
    return config, health_port


@pytest.mark.slow
def test_haproxy_keeps_films_away_from_a_replica_below_its_spool_floor(tmp_path, tiny_model):
    """Why the sample checks /readyz and not the DICOM port: a replica whose spool is below
    [storage] min_free_bytes accepts TCP and associations but refuses every film (0xA700). With
    the HTTP check HAProxy takes it out and every film goes to the other replica."""
    model_path = tiny_model
    replicas = []
    for name, storage in (("pacs-ai-full", {"min_free_bytes": 2**62}), ("pacs-ai-ok", {})):
        config, health_port = replica_config(tmp_path / name, model_path, destinations=[],
                                             storage=storage)
        replicas.append(Replica(name, tmp_path / name, config, health_port))
    full, ok = replicas
    try:
        start_all(replicas)
        status, body = full.readyz()
        assert status == 503 and body["problems"][0].startswith("spool-below-floor"), body
        # What a TCP check (or a C-ECHO) would see: a replica that answers.
        assert port_open(full.dicom_port)
        assert SimulatedModality(full.dicom_port, timeout=5).echo() == 0x0000
        refused = SimulatedModality(full.dicom_port).send(films_of_one_study(1, 7000))
        assert refused[0].status == 0xA700, refused
        with HAProxy(tmp_path / "haproxy", [r.backend() for r in replicas]) as proxy:
            assert proxy.wait_for_state(full.name, "DOWN", HAPROXY_SETTLE_S), proxy.servers()
            assert proxy.wait_for_state(ok.name, "UP", HAPROXY_SETTLE_S), proxy.servers()
            streams = [Stream(f"XRAY_ROOM_{n}", films_of_one_study(3, 7100 + 10 * n))
                       for n in range(STREAMS)]
            for stream in streams:
                stream.run(proxy.port, time.monotonic() + 60)
            for stream in streams:
                assert len(stream.acknowledged) == 3 and stream.not_acknowledged == 0
            assert int(proxy.servers()[full.name]["stot"]) == 0  # never sent a session
        taken = spool_jobs(ok.spool)
        assert all(str(ds.SOPInstanceUID) in taken for s in streams for ds in s.films)
        assert not any(str(ds.SOPInstanceUID) in spool_jobs(full.spool)
                       for s in streams for ds in s.films)
        print(f"replica below its spool floor: answers TCP and C-ECHO, refuses films with "
              f"0xA700, /readyz 503; HAProxy marked it DOWN and sent all "
              f"{sum(len(s.films) for s in streams)} films over {STREAMS} associations to the "
              "other replica, none refused")
    finally:
        kill_all(replicas)


def scrape(replica: Replica) -> list:
    """The samples of a replica's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{replica.health_port}/metrics",
                                timeout=5) as response:
        text = response.read().decode()
    return [sample for family in text_string_to_metric_families(text)
            for sample in family.samples]


def summed(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name
               and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.slow
def test_the_metrics_of_two_replicas_add_up(tmp_path, tiny_model):
    """Issue 16 item 4: summed over the replicas, the counters equal what the modalities and
    the PACS saw: C-STOREs acknowledged (a film sent twice counts twice), films classified and
    reports delivered (once per replica that took the film); the gauges combine as their help
    says. Each replica runs a helper process, whose work shows in its replica's counters, once."""
    model_path = tiny_model
    with RecordingPacs() as pacs:
        replicas = []
        for name in ("pacs-ai-1", "pacs-ai-2"):
            config, health_port = replica_config(tmp_path / name, model_path,
                                                 destinations=[pacs.destination()], processes=1)
            replicas.append(Replica(name, tmp_path / name, config, health_port))
        try:
            start_all(replicas)
            with HAProxy(tmp_path / "haproxy", [r.backend() for r in replicas]) as proxy:
                for replica in replicas:
                    assert proxy.wait_for_state(replica.name, "UP", HAPROXY_SETTLE_S)
                streams = [Stream(f"XRAY_ROOM_{n}", films_of_one_study(5, 6000 + 10 * n))
                           for n in range(STREAMS)]
                with ThreadPoolExecutor(STREAMS) as pool:
                    list(pool.map(lambda s: s.run(proxy.port, time.monotonic() + 60), streams))
                # A modality sends one study again: new C-STOREs, the same films.
                again = Stream("XRAY_ROOM_0", streams[0].films)
                again.run(proxy.port, time.monotonic() + 60)
            stores = sum(len(s.acknowledged) for s in streams) + len(again.acknowledged)
            films = {str(ds.SOPInstanceUID) for s in streams for ds in s.films}
            assert stores == len(films) + len(again.films)
            # A replica keeps one job per film: a film it already has is acknowledged again
            # and not classified again; a film sent again to the other replica is.
            jobs = sum(len(spool_jobs(r.spool)) for r in replicas)
            assert len(films) <= jobs <= stores
            assert wait_until(lambda: len(pacs.snapshot()) >= jobs, REPORTS_TIMEOUT_S)
            assert wait_until(lambda: sum(summed(scrape(r), "pacs_ai_reported_total")
                                          for r in replicas) >= jobs, 30)
            samples = [sample for replica in replicas for sample in scrape(replica)]
        finally:
            kill_all(replicas)
    delivered = pacs.snapshot()
    assert summed(samples, "pacs_ai_received_total") == stores
    assert summed(samples, "pacs_ai_classified_total") == jobs
    assert summed(samples, "pacs_ai_classify_seconds_count") == jobs
    assert summed(samples, "pacs_ai_reported_total", destination="PACS@127.0.0.1:"
                  f"{pacs.port}") == len(delivered) == jobs
    assert len({str(ds.SOPInstanceUID) for ds in delivered}) == len(films)  # one report each
    assert summed(samples, "pacs_ai_backlog_jobs") == 0
    assert summed(samples, "pacs_ai_ready") == len(replicas)
    versions = {tuple(sorted(s.labels.items())) for s in samples if s.name == "pacs_ai_model_info"}
    assert len(versions) == 1 and summed(samples, "pacs_ai_model_info") == len(replicas)
    assert summed(samples, "pacs_ai_workers", kind="helper_processes") == len(replicas)
    assert summed(samples, "pacs_ai_workers", kind="threads") == len(replicas)
    assert not [s.name for s in samples if s.name.endswith("_created")]
    print(f"two replicas: {stores} C-STOREs acknowledged ({len(films)} films, one study of "
          f"{len(again.films)} sent twice) = received_total summed; {jobs} jobs (one per film "
          f"and replica that took it) = classified_total = reported_total summed = reports "
          f"delivered {len(delivered)}; distinct reports at the PACS {len(films)}")


def run_kill_9_phase(model_path: Path, orthanc: Orthanc, proxy: HAProxy,
                     replicas: list[Replica]) -> None:
    streams = [Stream(f"XRAY_ROOM_{n}", films_of_one_study(FILMS_PER_STREAM, 1000 * n))
               for n in range(1, STREAMS + 1)]
    films = [ds for stream in streams for ds in stream.films]
    deadline = time.monotonic() + 150
    senders = [threading.Thread(target=stream.run, args=(proxy.port, deadline), daemon=True)
               for stream in streams]
    for sender in senders:
        sender.start()

    # Kill, mid-stream, the replica HAProxy has given the most associations right now.
    def acknowledged() -> int:
        return sum(len(stream.acknowledged) for stream in streams)
    assert wait_until(lambda: acknowledged() >= KILL_AFTER_ACKNOWLEDGED, 90), "streams too slow"
    sessions: dict[str, int] = {}

    def someone_busy() -> bool:
        sessions.update({name: int(row["scur"]) for name, row in proxy.servers().items()})
        return max(sessions.values()) > 0
    assert wait_until(someone_busy, 10), proxy.servers()
    victim = next(r for r in replicas if r.name == max(sessions, key=sessions.get))
    acknowledged_before_kill = acknowledged()
    victim.service.kill()
    killed_at = time.monotonic()
    assert proxy.wait_for_state(victim.name, "DOWN", HAPROXY_SETTLE_S), proxy.servers()
    marked_down_s = time.monotonic() - killed_at
    # What it had acknowledged and not yet delivered waits in its spool (read after the kill:
    # only what reached the disk).
    waiting = [job for job in spool_jobs(victim.spool).values() if job.state != "done"]

    victim.start()  # the same config, so the same spool
    assert proxy.wait_for_state(victim.name, "UP", HAPROXY_SETTLE_S), proxy.servers()
    for sender in senders:
        sender.join(timeout=max(deadline - time.monotonic(), 1))
    assert not any(sender.is_alive() for sender in senders), "a stream never finished"
    for stream in streams:
        assert len(stream.acknowledged) == len(stream.films), stream.calling_ae_title
    # The kill cut at least the victim's running association: those films were sent again.
    assert sum(stream.not_acknowledged for stream in streams) >= 1
    assert sum(stream.associations for stream in streams) > STREAMS

    expected = expected_reports(model_path, films)
    wait_for_reports(orthanc, replicas, expected)
    check_jobs(replicas, films, model_path)
    jobs = all_jobs(replicas)
    for replica in replicas:  # HAProxy spread the streams over every replica
        assert any(uid in jobs[replica.name] for uid in (str(ds.SOPInstanceUID) for ds in films))
    taken_twice = sum(1 for ds in films
                      if sum(str(ds.SOPInstanceUID) in j for j in jobs.values()) > 1)
    print(f"kill -9 of {victim.name} after {acknowledged_before_kill} acknowledged films: "
          f"{len(waiting)} acknowledged and not yet delivered waited in its spool; HAProxy "
          f"marked it DOWN after {marked_down_s:.1f} s; sent {len(films)} films over "
          f"{sum(s.associations for s in streams)} associations, "
          f"{sum(s.not_acknowledged for s in streams)} films without Success sent again, "
          f"{taken_twice} films spooled by two replicas; reports at the PACS "
          f"{sum(len(v) for v in expected.values())} (one per film), lost 0; films per replica "
          + ", ".join(f"{name} {sum(str(ds.SOPInstanceUID) in j for ds in films)}"
                      for name, j in jobs.items()))


def run_drain_phase(model_path: Path, orthanc: Orthanc, proxy: HAProxy,
                    replicas: list[Replica]) -> None:
    draining = replicas[0]
    # An association the draining replica is serving when SIGTERM arrives.
    held_film = films_of_one_study(1, 9000)[0]
    ae = AE(ae_title="XRAY_HELD")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CR_IMAGE_STORAGE, [str(held_film.file_meta.TransferSyntaxUID)])
    held = ae.associate("127.0.0.1", draining.dicom_port, ae_title="PACS_AI")
    assert held.is_established
    try:
        draining.service.process.send_signal(signal.SIGTERM)
        assert wait_until(lambda: draining.readyz()[0] == 503, 10), draining.readyz()
        status, body = draining.readyz()
        assert body["problems"] == ["draining: the service is stopping"], body
        # No new association, while it still serves the held one.
        assert not SimulatedModality(draining.dicom_port, timeout=5).association_accepted()
        tcp_while_draining = port_open(draining.dicom_port)
        assert proxy.wait_for_state(draining.name, "DOWN", HAPROXY_SETTLE_S), proxy.servers()
        assert draining.service.process.poll() is None, "it should still be draining"

        # New associations through HAProxy go to the other replicas.
        streams = [Stream(f"XRAY_DRAIN_{n}", films_of_one_study(4, 8000 + 100 * n))
                   for n in range(3)]
        for stream in streams:
            stream.run(proxy.port, time.monotonic() + 60)
            assert len(stream.acknowledged) == len(stream.films)
            assert stream.associations == 1 and stream.not_acknowledged == 0
        new_films = [ds for stream in streams for ds in stream.films]
        drained_jobs = spool_jobs(draining.spool)
        assert not any(str(ds.SOPInstanceUID) in drained_jobs for ds in new_films)

        # The running association finishes its work.
        status = held.send_c_store(held_film)
        assert int(status.Status) == 0x0000
    finally:
        if held.is_established:
            held.release()
    assert draining.service.process.wait(timeout=60) == 0
    draining.start()  # whatever it had acknowledged and not delivered goes out now
    films = [*new_films, held_film]
    expected = expected_reports(model_path, films)
    wait_for_reports(orthanc, replicas, expected)
    check_jobs(replicas, films, model_path)
    print(f"SIGTERM to {draining.name} with one association open: /readyz 503 draining, new "
          f"associations refused (TCP connect {'accepted' if tcp_while_draining else 'refused'}"
          f"), HAProxy marked it DOWN while it drained; {len(new_films)} films sent meanwhile "
          f"all went to the others; the open association's film was acknowledged and "
          "reported; exit status 0")


def check_jobs(replicas: list[Replica], films: list[Dataset], model_path: Path) -> None:
    """Every replica that took a film finishes it as done, with the report UID derived from the
    film: a film spooled by two replicas gets the same report UID from both. (The PACS may hold
    a report before the second replica has finished its copy: wait for that.)"""
    info = PneumoniaModel.load(model_path).info
    uids = [str(ds.SOPInstanceUID) for ds in films]

    def rows_of(jobs: dict[str, dict], uid: str) -> list:
        return [replica_jobs[uid] for replica_jobs in jobs.values() if uid in replica_jobs]

    wait_until(lambda: all(row.state == "done" for uid in uids
                           for row in rows_of(all_jobs(replicas), uid)), 60, interval=0.5)
    jobs = all_jobs(replicas)
    for uid in uids:
        rows = rows_of(jobs, uid)
        assert rows, f"{uid} is in no replica's spool"
        assert {row.state for row in rows} == {"done"}, rows
        assert {row.report_uid for row in rows} == {report_uid(uid, info.name, info.version)}


def wait_for_reports(orthanc: Orthanc, replicas: list[Replica],
                     expected: dict[str, list[str]]) -> None:
    """Wait until the PACS holds exactly the expected reports; stop early on a failed job."""
    def failed() -> list:
        return [job for jobs in all_jobs(replicas).values() for job in jobs.values()
                if job.state == "failed"]
    wait_until(lambda: reports_at_pacs(orthanc, list(expected)) == expected or failed(),
               REPORTS_TIMEOUT_S, interval=1.0)
    assert not failed(), failed()[:3]
    assert reports_at_pacs(orthanc, list(expected)) == expected, \
        f"reports missing or doubled at the PACS: {report_mismatch(orthanc, expected)}"


def report_mismatch(orthanc: Orthanc, expected: dict[str, list[str]]) -> dict[str, str]:
    found = reports_at_pacs(orthanc, list(expected))
    return {study: f"expected {len(uids)}, found {len(found[study])} "
                   f"({len(set(found[study]))} distinct)"
            for study, uids in expected.items() if found[study] != uids}
