"""The queue page and its JSON on the metrics server: what it shows (and never shows), and the
retry button's token. A real job queue and the real HTTP server; the browser test is in
test_web_browser.py."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest

from pacs_ai.config import Config, ConfigError, Destination, WebConfig, parse_config
from pacs_ai.ops import http_server
from pacs_ai.ops.web import QueuePage
from pacs_ai.queue.job_records import NewInstance
from pacs_ai.queue.jobs import JobStore

TOKEN = "0123456789abcdef-queue-token"
CR = "1.2.840.10008.5.1.4.1.1.1"
SOURCE_UID = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789"


def fill(store: JobStore) -> dict[str, int]:
    """Three films: one delivered, one whose delivery failed, one skipped."""
    for name, uid in (("done", SOURCE_UID), ("failed", SOURCE_UID + "1"),
                      ("skipped", SOURCE_UID + "2")):
        store.admit(NewInstance(uid, CR, "1.2.3", "ER_CR", peer_address="10.0.0.5",
                                modality="CR", station_name="ROOM1",
                                accession_number=f"ACC-{name}"), lambda: f"images/{name}.dcm")
    done, failed, skipped = store.claim(3)
    for job, probability, age_known in ((done, 0.91, True), (failed, 0.12, False)):
        store.mark_reported(job.id, probability=probability,
                            finding="pneumonia" if probability > 0.5 else "normal",
                            report_uid=f"2.25.{job.id}99999999999999999", report_file=
                            f"outbox/{job.id}.dcm", classify_ms=5.0,
                            destinations=["pacs"], route="default", model="tiny 0.0.0-test",
                            age_known=age_known)
    store.delivery_succeeded(done.id, "pacs")
    store.delivery_failed(failed.id, "pacs", "http-400: Dataset refused by policy",
                          retry_at=None)
    store.mark_skipped(skipped.id, "modality: CT")
    return {"done": done.id, "failed": failed.id, "skipped": skipped.id}


@pytest.fixture
def served(tmp_path):
    """A queue with three films and a metrics server with the queue page, token set."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    store = JobStore.open(tmp_path / "jobs.sqlite")
    ids = fill(store)
    config = Config(destinations=(Destination("pacs", "PACS", "127.0.0.1", 104),),
                    web=WebConfig(token_file=tmp_path / "token"))
    server = http_server.start_http_server("127.0.0.1", 0, lambda: {"ok": True},
                                          web=QueuePage(config, store, "tiny 0.0.0-test"))
    try:
        yield server.url, store, ids
    finally:
        server.shutdown()
        store.close()


def get(url: str) -> tuple[int, str, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def post(url: str, data: bytes, headers: dict | None = None) -> tuple[int, str, dict]:
    request = urllib.request.Request(url, data=data, method="POST", headers=headers or {})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def test_the_json_shows_films_counts_and_destinations_without_patient_data(served):
    url, _, ids = served
    status, body, headers = get(url + "/api/queue")
    assert status == 200 and headers["Content-Type"] == "application/json"
    queue = json.loads(body)
    assert queue["jobs"]["done"] == 1 and queue["jobs"]["failed"] == 1
    assert queue["jobs"]["skipped"] == 1 and queue["retry_enabled"] is True
    films = {film["job"]: film for film in queue["films"]}
    failed = films[ids["failed"]]
    assert failed["calling_ae_title"] == "ER_CR" and failed["finding"] == "normal"
    assert failed["deliveries"]["pacs"]["state"] == "failed"
    assert failed["deliveries"]["pacs"]["last_error"] == "http-400: Dataset refused by policy"
    assert failed["retry_possible"] and failed["model"] == "tiny 0.0.0-test"
    assert films[ids["skipped"]]["reason"] == "modality: CT"
    # classified without a usable patient age (issue 22 item 4); not looked at when skipped
    assert (films[ids["done"]]["age_known"], failed["age_known"]) == (True, False)
    assert films[ids["skipped"]]["age_known"] is None
    assert films[ids["done"]]["deliveries"]["pacs"]["state"] == "done"
    # issue 23 item 8: whole UIDs, so a film can be looked up in the PACS (they were cut to
    # "1.2.826....23456789")
    assert films[ids["done"]]["sop_instance_uid"] == SOURCE_UID
    assert failed["sop_instance_uid"] == SOURCE_UID + "1"
    assert failed["study_instance_uid"] == "1.2.3"
    assert failed["report_uid"] == f"2.25.{ids['failed']}99999999999999999"
    assert "ACC-" not in body and "accession_number" not in failed  # off by default
    assert queue["destinations"]["pacs"]["kind"] == "dimse"
    request = urllib.request.Request(url + "/queue", headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:  # same path, asked for JSON
        assert json.loads(response.read())["films"] == queue["films"]
    assert [film["job"] for film in queue["films"]] == sorted(ids.values(), reverse=True)


def test_a_probability_near_one_is_shown_as_above_0999_and_given_whole_in_json(served):
    """Three decimals showed 0.999998 as a certain-looking 1.0 on the page; the heat-map
    image's label says "> 0.999". The JSON keeps what the model gave."""
    url, store, _ = served
    store.admit(NewInstance(SOURCE_UID + "3", CR, "1.2.3", "ER_CR", peer_address="10.0.0.5",
                            modality="CR"), lambda: "images/sure.dcm")
    (job,) = store.claim(1)
    store.mark_reported(job.id, probability=0.999998, finding="pneumonia",
                        report_uid=f"2.25.{job.id}1", report_file=f"outbox/{job.id}.dcm",
                        classify_ms=5.0, destinations=[], route="default",
                        model="tiny 0.0.0-test", age_known=True)
    _, page, _ = get(url + "/queue")
    row = re.search(rf"<tr id=job-{job.id}>.*?</tr>", page, flags=re.S).group(0)
    assert "pneumonia (&gt; 0.999)" in row and "1.0" not in row
    _, body, _ = get(url + "/api/queue")
    (film,) = [film for film in json.loads(body)["films"] if film["job"] == job.id]
    assert film["probability"] == 0.999998


def test_the_page_is_html_that_reloads_itself(served):
    url, _, ids = served
    status, page, headers = get(url + "/queue")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert '<meta http-equiv=refresh content=15>' in page
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert f"<button type=submit name=job value={ids['failed']}>retry</button>" in page
    assert f"value={ids['done']}>" not in page  # retry only for failed deliveries
    assert "http-400: Dataset refused by policy" in page
    assert "normal (0.120), no age" in page and "pneumonia (0.910)<" in page
    assert "ACC-" not in page
    row = re.search(rf"<tr id=job-{ids['failed']}>.*?</tr>", page, flags=re.S).group(0)
    assert f"<code class=uid>{SOURCE_UID}1</code>" in row  # whole, wrapped by the style
    assert "study <code class=uid>1.2.3</code>" in row
    assert ".uid { word-break: break-all; user-select: all; }" in page


def test_retry_needs_the_token(served):
    url, store, ids = served
    form = f"job={ids['failed']}".encode()
    assert post(url + "/queue/retry", form)[0] == 403
    status, page, _ = post(url + "/queue/retry", form + b"&token=not-the-token")
    assert status == 403 and "wrong token" in page
    assert post(url + "/api/queue/retry", json.dumps({"job": ids["failed"]}).encode(),
                {"Authorization": "Bearer nope"})[0] == 403
    assert store.job_by_id(ids["failed"]).state == "failed"  # nothing changed
    status, _, headers = post(url + "/queue/retry", form + f"&token={TOKEN}".encode())
    assert status == 303 and headers["Location"] == "/queue?retried=1"
    assert store.job_by_id(ids["failed"]).state == "delivering"
    assert store.deliveries_of([ids["failed"]])[ids["failed"]]["pacs"]["state"] == "pending"
    # the API, with the bearer header; a job with nothing to retry requeues nothing
    status, body, _ = post(url + "/api/queue/retry", json.dumps({"job": ids["done"]}).encode(),
                           {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and json.loads(body) == {"ok": True, "job": ids["done"],
                                                  "deliveries_requeued": 0}


def test_without_a_token_file_the_page_is_read_only(tmp_path):
    store = JobStore.open(tmp_path / "jobs.sqlite")
    ids = fill(store)
    config = Config(web=WebConfig(show_accession_number=True, refresh_seconds=0))
    server = http_server.start_http_server("127.0.0.1", 0, lambda: {"ok": True},
                                          web=QueuePage(config, store))
    try:
        _, page, _ = get(server.url + "/queue")
        assert "id=read-only" in page and "<button" not in page and "http-equiv" not in page
        assert "ACC-failed" in page  # shown when the admin turns it on
        status, body, _ = post(server.url + "/api/queue/retry",
                               f"job={ids['failed']}&token={TOKEN}".encode())
        assert status == 403 and "read-only" in json.loads(body)["error"]
    finally:
        server.shutdown()
        store.close()


def test_web_config_keys(tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    web = parse_config({"web": {"token_file": "token", "show_accession_number": True,
                                "recent_films": 20, "refresh_seconds": 0}},
                       base_dir=tmp_path).web
    assert web == WebConfig(True, tmp_path / "token", True, 20, 0)
    with pytest.raises(ConfigError, match=r"^\[web\] token_file: file not found"):
        parse_config({"web": {"token_file": "missing"}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^\[web\]: unknown key 'token'"):
        parse_config({"web": {"token": TOKEN}}, base_dir=tmp_path)


def test_a_short_token_stops_the_start(tmp_path):
    from pacs_ai.errors import UserError

    (tmp_path / "token").write_text("short")
    with pytest.raises(UserError, match="at least 16"):
        QueuePage(Config(web=WebConfig(token_file=tmp_path / "token")), None)
