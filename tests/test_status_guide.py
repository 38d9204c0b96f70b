"""The admin guide's sample outputs of `pacs-ai status` are what it prints.

deploy/README.md, "Status and failed jobs", shows `pacs-ai status` with the PACS unreachable for
an hour, and the `failed-images` line of a film that cannot be decoded. Both were written by
hand and had drifted from the command (a `routes:` line and the route of a failure missing, one
`retrying` line where every waiting delivery has one, a failed delivery that the default retry
policy would still be retrying). As for `pacs-ai evaluate` (issue 23 item 8), each block is read
from the guide here and compared line for line with a real run of `pacs-ai status` on a spool
and job database built through the service's own JobStore API, so the guide cannot drift again.

The outage is built event by event on a clock of the test's (the sample's date), with the
service's retry policy (`RetryPolicy`, the defaults) choosing when each failed delivery is tried
again, and `pacs-ai status` runs at the sample's moment: with the clock fixed, every timestamp,
UID, count and duration of the sample is printed as shown. Only the spool's path and free space
differ between machines.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pydicom.uid

from pacs_ai.config import RetryPolicy, default_model_path, load_config
from pacs_ai.deliver.routing import RouteFacts, choose_route
from pacs_ai.film.filters import skip_reason
from pacs_ai.queue import jobs as jobs_module
from pacs_ai.queue.echo_results import EchoResult, EchoResults
from pacs_ai.queue.job_records import DeliveryObject, NewInstance, Stage
from pacs_ai.queue.jobs import JobStore
from pacs_ai.queue.spool import Spool
from pacs_ai.report.uids import heatmap_uid, report_uid
from testbed.dicom_peers import pacs_ai_cli, write_service_config
from testbed.environment import REPO_ROOT

GUIDE_SPOOL = "/var/lib/pacs-ai"
MODEL = ("pacs-ai-pneumonia", "1.0.0")  # the UIDs pacs-ai derives name a model; any will do
# The guide's [[destinations]] example (its C-ECHO every 5 minutes).
MAIN_PACS = {"name": "main-pacs", "ae_title": "PACS", "host": "pacs.example.org", "port": 104,
             "calling_ae_title": "PACS_AI", "echo_interval_seconds": 300}
# What the C-STORE transport records when nothing answers at the PACS's address
# (pacs_ai.deliver.cstore_transport: "connection-failed: AE@host:port").
UNREACHABLE = "connection-failed: PACS@pacs.example.org:104"
REFUSED = "refused: status 0xA900"  # a PACS that will not take one report (not a retry's fix)


def at(clock: str) -> float:
    """Unix time of `clock` on the sample's day (UTC)."""
    return datetime.fromisoformat(f"2026-11-25T{clock}+00:00").timestamp()


SAMPLE_TAKEN = at("21:59:59")
LAST_STORED = at("20:58:02")  # the last report the PACS stored before it went away


def guide_status_blocks() -> list[list[str]]:
    """The plain (sample output) code blocks of the guide's "Status and failed jobs"."""
    guide = (REPO_ROOT / "deploy" / "README.md").read_text()
    section = guide.split("### Status and failed jobs", 1)[1].split("\n### ", 1)[0]
    fenced = re.findall(r"^```(\w*)\n(.*?)^```$", section, flags=re.S | re.M)
    return [block.splitlines() for language, block in fenced if not language]


def guide_block(first_line: str) -> list[str]:
    [block] = [b for b in guide_status_blocks() if b and b[0].startswith(first_line)]
    return block


def film_uid(name: str) -> str:
    """A modality's SOP Instance UID (pydicom's root, as a test modality makes them), the same
    on every run."""
    return pydicom.uid.generate_uid(entropy_srcs=[name])


class Outage:
    """Writes the job queue a service would have written, event by event in time order, each
    at its own moment: JobStore stamps times with the clock of pacs_ai.queue.jobs, which
    follows the events' times here."""

    def __init__(self, store: JobStore, spool: Spool, config, monkeypatch):
        self.store, self.spool, self.config = store, spool, config
        self.now = 0.0
        monkeypatch.setattr(jobs_module, "time", SimpleNamespace(time=lambda: self.now))
        self.events: list[tuple[float, int, object]] = []  # a heap: (time, order, action)
        self.added = 0
        self.policy = RetryPolicy()  # the service's default [retry]
        assert self.policy == config.retry

    def at(self, moment: float, action) -> None:
        self.added += 1
        heapq.heappush(self.events, (moment, self.added, action))

    def run_until(self, end: float) -> None:
        """Run the events due by `end`, in time order (an action may add later ones)."""
        while self.events and self.events[0][0] <= end:
            self.now, _order, action = heapq.heappop(self.events)
            action()

    def film(self, name: str, received: float, *, age_known: bool = True,
             heatmap: bool = False, stored: bool = True, refused: bool = False) -> None:
        """A film received, classified a second later, its report (and heat-map image) queued a
        second after that and tried at once: stored, or failed (the PACS unreachable, or it
        refuses the report) and retried on the policy's schedule."""
        uid = film_uid(name)
        self.at(received, lambda: self._receive(uid))
        self.at(received + 1, lambda: self.store.claim(1))
        self.at(received + 2, lambda: self._report(uid, age_known, heatmap))
        objects = [DeliveryObject.REPORT] + ([DeliveryObject.HEATMAP] if heatmap else [])
        for order, kind in enumerate(objects):  # the report first, as the sender sends them
            first_try = received + 3 + order / 10
            if stored:
                self.at(first_try, lambda kind=kind: self.store.delivery_succeeded(
                    self._job(uid), MAIN_PACS["name"], kind))
            else:
                error = REFUSED if refused else UNREACHABLE
                self.at(first_try, lambda kind=kind, first_try=first_try: self._try(
                    uid, kind, 1, first_try, error))

    def _receive(self, uid: str) -> None:
        assert self.store.admit(NewInstance(uid, pydicom.uid.DigitalXRayImageStorageForPresentation,
                                            film_uid(f"study of {uid}"), "CR_ROOM1",
                                            "10.20.0.31", "DX", "CR1"),
                                lambda: self.spool.relative(self.spool.image_path(uid)))

    def _job(self, uid: str) -> int:
        return self.store.find(uid).id

    def _report(self, uid: str, age_known: bool, heatmap: bool) -> None:
        route = choose_route(self.config, RouteFacts("CR_ROOM1", "10.20.0.31", "DX", "CR1"))
        sr_uid, image_uid = report_uid(uid, *MODEL), heatmap_uid(uid, *MODEL)
        self.store.mark_reported(
            self._job(uid), probability=0.91 if heatmap else 0.08,
            finding="pneumonia" if heatmap else "normal", report_uid=sr_uid,
            report_file=self.spool.relative(self.spool.report_path(sr_uid)), classify_ms=850.0,
            destinations=route.destinations, route=route.name, model=" ".join(MODEL),
            heatmap_uid=image_uid if heatmap else None,
            heatmap_file=(self.spool.relative(self.spool.report_path(image_uid))
                          if heatmap else None),
            age_known=age_known,
            image_destinations=[d.name for d in self.config.destinations if d.takes_images])

    def _try(self, uid: str, kind: str, attempts: int, first_try: float, error: str) -> None:
        """A failed attempt, recorded as pacs_ai.deliver.sender records it: retried after the
        policy's delay, or given up once the policy says so."""
        give_up = self.policy.exhausted(attempts, self.now - first_try)
        retry_at = None if give_up else self.now + self.policy.delay_after(attempts)
        self.store.delivery_failed(self._job(uid), MAIN_PACS["name"], error, retry_at=retry_at,
                                   object=kind)
        if retry_at is not None:
            self.at(retry_at, lambda: self._try(uid, kind, attempts + 1, first_try, error))

    def skip(self, name: str, received: float, reason: str) -> None:
        uid = film_uid(name)
        self.at(received, lambda: self._receive(uid))
        self.at(received + 1, lambda: self.store.claim(1))
        self.at(received + 2, lambda: self.store.mark_skipped(self._job(uid), reason))


def status_at(moment: float, config: Path, *options: str) -> subprocess.CompletedProcess:
    """`pacs-ai status` (the CLI, in a process of its own) as it would print at `moment`: its
    clock is fixed there, so durations and ages come out as at that moment."""
    run_at = ("import sys, time\n"
              "moment = float(sys.argv.pop(1))\n"
              "time.time = lambda: moment\n"
              "from pacs_ai.cli import main\n"
              "sys.exit(main())\n")
    return subprocess.run([sys.executable, "-c", run_at, repr(moment), "status", "--config",
                           str(config), *options], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


def as_in_guide(printed: str, spool: Path) -> list[str]:
    """The output with what differs between machines as the guide shows it: the spool's path
    and its free space."""
    lines = printed.replace(str(spool), GUIDE_SPOOL).splitlines()
    shown = guide_block("spool:")[0]
    free = re.search(r"\((\S+ \S+) free", shown).group(1)
    lines[0] = re.sub(r"\(\S+ \S+ free", f"({free} free", lines[0])
    return lines


def test_the_guide_sample_of_status_with_the_pacs_unreachable_is_a_real_run(tmp_path,
                                                                            monkeypatch):
    shown = guide_block("spool:")
    # The defaults of [storage] min_free_bytes and [retry] (a test service's are shorter).
    config_path = write_service_config(
        tmp_path, model=default_model_path(), destinations=[MAIN_PACS],
        tables={"storage": {"min_free_bytes": 256 * 1024 * 1024},
                "retry": dataclasses.asdict(RetryPolicy())})
    config = load_config(config_path)
    spool = Spool(config.storage.spool_dir)
    spool.prepare()
    store = JobStore.open(spool.db_path, durable=False)
    try:
        outage = Outage(store, spool, config, monkeypatch)
        # Ten days of films stored by the PACS, 45 minutes apart, the last one at 20:58:02;
        # one in nine positive (with a heat-map image), 41 without a usable patient age.
        stored = 310
        for n in range(stored):
            outage.film(f"film {n}", LAST_STORED - 3 - (stored - 1 - n) * 2700,
                        age_known=n % 7 != 3 or n >= 7 * 41, heatmap=n % 9 == 4)
        # One report the PACS refused for a week, tried every 15 minutes until [retry]
        # max_age_seconds (7 days) gave it up this evening, before the outage.
        outage.film("film refused", at("20:31:17") - 605173, stored=False, refused=True)
        # The PACS has been unreachable since 20:59:59: three films since, one positive.
        outage.film("film during 1", at("20:59:56"), stored=False)
        outage.film("film during 2", at("21:24:30"), stored=False, heatmap=True)
        outage.film("film during 3", at("21:47:11"), stored=False)
        body_part = pydicom.Dataset()
        body_part.SOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation
        body_part.Modality, body_part.BodyPartExamined = "DX", "ABDOMEN"
        body_part.SamplesPerPixel, body_part.PhotometricInterpretation = 1, "MONOCHROME2"
        outage.skip("film of an abdomen", at("21:38:02"), skip_reason(body_part))
        outage.run_until(SAMPLE_TAKEN)
    finally:
        store.close()
    # The C-ECHO every 5 minutes: answered at 20:58:19, unanswered since 21:03:19. The echo
    # thread keeps only the latest result, as here (pacs_ai.deliver.destination_echo).
    EchoResults(spool.root).update(MAIN_PACS["name"], EchoResult(
        ok=False, at=at("21:58:19"), detail=UNREACHABLE, milliseconds=1.2,
        failing_since=at("21:03:19")))

    result = status_at(SAMPLE_TAKEN, config_path)
    assert result.returncode == 1, result.stderr  # something needs an admin
    printed = as_in_guide(result.stdout, spool.root)
    again = "the guide's sample differs from this run; the run printed:\n" + "\n".join(printed)
    assert printed == shown, again

    # --limit cuts the retrying list short, and says how many it leaves out
    retrying = [line for line in printed if line.startswith("  retrying ")]
    short = status_at(SAMPLE_TAKEN, config_path, "--limit", "1").stdout.splitlines()
    assert [line for line in short if line.startswith("  retrying ")] == retrying[:1]
    assert (f"  ... and {len(retrying) - 1} more retrying (`pacs-ai status --limit N` lists "
            "more)") in short
    assert not any(line.startswith("  ... and") for line in printed)
    report = json.loads(status_at(SAMPLE_TAKEN, config_path, "--limit", "1", "--json").stdout)
    assert report["retrying_total"] == len(retrying) and len(report["retrying"]) == 1
    # a negative --limit is a usage error (it printed no list at all, exit 1, before)
    negative = status_at(SAMPLE_TAKEN, config_path, "--limit", "-5")
    assert negative.returncode == 2 and negative.stdout == ""
    assert "argument --limit: -5 is below 0" in negative.stderr


def test_the_guide_sample_of_a_film_that_cannot_be_decoded_is_a_real_run(tmp_path):
    """The guide's `failed-images` block is how `pacs-ai status` ends when one film failed
    for decode-failed (and nothing else needs an admin)."""
    shown = guide_block("needs admin:")
    config_path = write_service_config(tmp_path, model=default_model_path())
    config = load_config(config_path)
    spool = Spool(config.storage.spool_dir)
    spool.prepare()
    store = JobStore.open(spool.db_path)
    try:
        uid = film_uid("film that cannot be decoded")
        assert store.admit(NewInstance(uid, pydicom.uid.DigitalXRayImageStorageForPresentation,
                                       None, "CR_ROOM1"),
                           lambda: spool.relative(spool.image_path(uid)))
        [job] = store.claim(1)
        assert store.mark_failed(job.id, Stage.CLASSIFY,
                                 "decode-failed: cannot decode JPEG 2000 pixel data")
    finally:
        store.close()
    result = pacs_ai_cli("status", "--config", str(config_path))
    assert result.returncode == 1, result.stderr
    printed = result.stdout.splitlines()
    assert printed[-len(shown):] == shown, \
        "the guide's sample differs from this run; the run printed:\n" + result.stdout

