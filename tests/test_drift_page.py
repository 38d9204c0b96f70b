"""Look, don't read (issue 24 item 4): the queue page charts each model's daily positive and
abstention rates against the band the site expects, and /api/queue carries the same numbers.
Jobs are put in a real job queue with the days they were received; the chart's points are read
back from the SVG's geometry and tooltips and compared with what was put in."""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import sqlite3
import xml.etree.ElementTree as ElementTree

import pytest

from pacs_ai.config import Config, DriftConfig
from pacs_ai.model.model import PneumoniaModel
from pacs_ai.ops import http_server
from pacs_ai.ops.web import QueuePage
from pacs_ai.queue.job_records import ABSTAINED_REASON_CODE, NewInstance
from pacs_ai.queue.jobs import JobStore
from tests.test_web import get

CR = "1.2.840.10008.5.1.4.1.1.1"
SVG = "{http://www.w3.org/2000/svg}"
BAND = DriftConfig(expected_positive_rate=(0.2, 0.4), max_abstention_rate=0.1, min_films=10,
                   days=28)
LIVE, OLD = "pacs-ai-pneumonia 7.0.0-test", "pacs-ai-pneumonia 6.0.0-test"


class Films:
    """Films put in a job queue as the service would leave them, each on a chosen UTC day."""

    def __init__(self, store: JobStore, today: datetime.date):
        self.store, self.today = store, today
        self.received: dict[int, datetime.date] = {}

    def add(self, days_ago: int, outcome: str, model: str | None = LIVE, count: int = 1) -> None:
        for _ in range(count):
            uid = f"1.2.826.0.1.{len(self.received) + 1}"
            self.store.admit(NewInstance(uid, CR, "1.2.3", "CR1"), lambda: "images/x.dcm")
            [job] = self.store.claim(1)
            if outcome in ("pneumonia", "normal"):
                self.store.mark_reported(job.id, probability=0.9 if outcome == "pneumonia"
                                         else 0.1, finding=outcome, report_uid=f"2.25.{job.id}",
                                         report_file="outbox/x.dcm", classify_ms=1.0,
                                         destinations=[], model=model)
            elif outcome == "abstained":
                self.store.mark_skipped(job.id, f"{ABSTAINED_REASON_CODE}: score 3.00 above "
                                        "2.00; the film is unlike those", model=model)
            elif outcome == "not-chest":
                self.store.mark_skipped(job.id, "not-chest: body part is KNEE")
            else:
                self.store.mark_failed(job.id, "classify", "decode-failed: broken")
            self.received[job.id] = self.today - datetime.timedelta(days=days_ago)

    def date_them(self) -> None:
        """Each film's received_at at noon UTC of its day."""
        db = sqlite3.connect(self.store.path)
        with db:
            for job_id, day in self.received.items():
                noon = datetime.datetime.combine(day, datetime.time(12),
                                                 datetime.timezone.utc).timestamp()
                db.execute("UPDATE jobs SET received_at = ? WHERE id = ?", (noon, job_id))
        db.close()


@pytest.fixture
def site(tmp_path):
    """A queue page over a month of a site's films, its band [drift] BAND."""
    store = JobStore.open(tmp_path / "jobs.sqlite")
    today = datetime.datetime.now(datetime.timezone.utc).date()
    films = Films(store, today)
    films.add(3, "pneumonia", count=3)  # 3 of 10 (in the band), 2 of 12 abstained (above)
    films.add(3, "normal", count=7)
    films.add(3, "abstained", count=2)
    films.add(3, "not-chest", count=4)  # not assessed by the model: no part of any rate
    films.add(3, "failed", count=2)
    films.add(1, "pneumonia", count=4)  # 4 of 4: too few to judge
    films.add(0, "pneumonia", count=15)  # 15 of 20: above the band
    films.add(0, "normal", count=5)
    films.add(10, "normal", count=12, model=OLD)  # the model before: 0 of 12, below
    films.add(2, "abstained", model=None)  # an abstention from before pacs-ai kept the model
    films.add(40, "pneumonia", count=5)  # before the window
    films.date_them()
    config = Config(drift=BAND)
    server = http_server.start_http_server("127.0.0.1", 0, lambda: {"ok": True},
                                          web=QueuePage(config, store, LIVE))
    try:
        yield server.url, today
    finally:
        server.shutdown()
        store.close()


def expected(today: datetime.date) -> dict[str, dict[str, dict]]:
    """What was put in, per model and day: the counts and how the band judges them."""
    def day(ago, classified, positive, abstained, judged, out):
        return (today - datetime.timedelta(days=ago)).isoformat(), {
            "assessed": classified + abstained, "classified": classified, "positive": positive,
            "abstained": abstained, "judged": judged, "out_of_band": out}
    return {
        LIVE: dict([day(3, 10, 3, 2, True, ["abstention-rate-high"]),
                    day(1, 4, 4, 0, False, []),
                    day(0, 20, 15, 0, True, ["positive-rate-high"])]),
        OLD: dict([day(10, 12, 0, 0, True, ["positive-rate-low"])]),
        "model not recorded": dict([day(2, 0, 0, 1, False, [])]),
    }


def test_api_queue_carries_each_models_daily_rates_and_the_band(site):
    url, today = site
    status, body, _headers = get(url + "/api/queue")
    assert status == 200
    drift = json.loads(body)["drift"]
    assert drift["expected_positive_rate"] == [0.2, 0.4]
    assert drift["max_abstention_rate"] == 0.1 and drift["min_films"] == 10
    last = datetime.date.fromisoformat(drift["to"])
    assert last - datetime.date.fromisoformat(drift["from"]) == datetime.timedelta(days=27)
    # the live model first, then the one before, then abstentions without a model
    assert [(m["model"], m["role"]) for m in drift["models"]] == [
        (LIVE, "live"), (OLD, "live"), ("model not recorded", "live")]
    for model in drift["models"]:
        days = {d.pop("day"): d for d in model["days"]}
        want = expected(today)[model["model"]]
        for when, counts in want.items():
            rates = days[when]
            assert rates.pop("positive_rate") == (
                None if not counts["classified"] else
                pytest.approx(counts["positive"] / counts["classified"], abs=1e-4))
            assert rates.pop("abstention_rate") == pytest.approx(
                counts["abstained"] / counts["assessed"], abs=1e-4)
            assert rates == counts, (model["model"], when)
        assert set(days) == set(want)  # no day before the window, none without films
        assert model["days_out_of_band"] == sum(bool(c["out_of_band"]) for c in want.values())


def svgs(page: str) -> dict[str, ElementTree.Element]:
    """Each chart on the page, parsed as XML, by the model in its caption."""
    charts = {}
    for figure in re.findall(r"<figure id=drift-\d+ class=drift>(.*?)</figure>", page, re.S):
        model = re.search(r"<b>(.*?)</b>", figure).group(1)
        charts[model] = ElementTree.fromstring(re.search(r"<svg .*</svg>", figure, re.S).group(0))
    return charts


def test_the_page_charts_each_days_rates_where_they_are(site):
    url, today = site
    status, page, headers = get(url + "/queue")
    assert status == 200 and "script" not in page.lower()
    charts = svgs(page)
    assert list(charts) == [LIVE, OLD, "model not recorded"]
    for model, svg in charts.items():
        axis = {float(line.get("data-rate")): float(line.get("y1"))
                for line in svg.iter(f"{SVG}line") if line.get("class") == "axis"}
        top, bottom = axis[1.0], axis[0.0]

        def rate_at(y: float) -> float:
            return (bottom - y) / (bottom - top)

        band = next(r for r in svg.iter(f"{SVG}rect") if r.get("class") == "band")
        assert rate_at(float(band.get("y"))) == pytest.approx(0.4, abs=0.005)
        assert rate_at(float(band.get("y")) + float(band.get("height"))) == pytest.approx(
            0.2, abs=0.005)
        limit = next(line for line in svg.iter(f"{SVG}line") if line.get("class") == "limit")
        assert rate_at(float(limit.get("y1"))) == pytest.approx(0.1, abs=0.005)

        want = expected(today)[model]
        circles = {c.get("data-day"): c for c in svg.iter(f"{SVG}circle")}
        squares = {r.get("data-day"): r for r in svg.iter(f"{SVG}rect")
                   if (r.get("class") or "").startswith("abstention")}
        assert set(squares) == set(want)
        assert set(circles) == {day for day, c in want.items() if c["classified"]}
        xs = []
        for day, counts in want.items():
            square = squares[day]
            y = float(square.get("y")) + float(square.get("height")) / 2
            assert rate_at(y) == pytest.approx(counts["abstained"] / counts["assessed"],
                                               abs=0.005)
            assert square.find(f"{SVG}title").text.startswith(
                f"{day}: {counts['abstained']} of {counts['assessed']} assessed abstained")
            classes = set(square.get("class").split())
            assert ("out" in classes) == ("abstention-rate-high" in counts["out_of_band"])
            assert ("few" in classes) == (not counts["judged"])
            xs.append((day, float(square.get("x"))))
            if not counts["classified"]:
                continue
            circle = circles[day]
            assert rate_at(float(circle.get("cy"))) == pytest.approx(
                counts["positive"] / counts["classified"], abs=0.005)
            assert circle.find(f"{SVG}title").text.startswith(
                f"{day}: {counts['positive']} of {counts['classified']} classified found "
                "pneumonia")
            classes = set(circle.get("class").split())
            assert ("out" in classes) == any(o.startswith("positive")
                                             for o in counts["out_of_band"])
            assert ("few" in classes) == (not counts["judged"])
            assert float(circle.get("cx")) == pytest.approx(float(square.get("x")) + 3, abs=0.2)
        assert [day for day, _x in sorted(xs, key=lambda item: item[1])] == sorted(
            d for d, _x in xs)  # later days to the right
    # a line joins consecutive days only: today and yesterday, not three days ago
    live = charts[LIVE]
    [line] = [p for p in live.iter(f"{SVG}polyline") if p.get("class") == "positive-line"]
    assert len(line.get("points").split()) == 2
    caption = re.search(r"<figure id=drift-0 class=drift><figcaption>(.*?)</figcaption>",
                        page, re.S).group(1)
    assert "3 days with films" in caption and "2 of 2 judged days outside the band" in caption
    assert "expected_positive_rate 20%-40%" in page and "max_abstention_rate 10%" in page


def test_a_queue_without_assessed_films_says_so(tmp_path):
    store = JobStore.open(tmp_path / "jobs.sqlite")
    try:
        page = QueuePage(Config(drift=BAND), store, LIVE)
        assert page.snapshot()["drift"]["models"] == []
        html = page.get("/queue").body.decode()
        assert "No film assessed in the last 28 days." in html and "<svg" not in html
    finally:
        store.close()


def test_the_abstention_reason_code_is_the_models(tmp_path):
    """The daily rates find abstentions by this code: it must be what the model writes."""
    from testbed.tiny_models import export_untrained_tiny_ensemble

    model = PneumoniaModel.load(export_untrained_tiny_ensemble(tmp_path / "e.pt",
                                                               ood_threshold=1.0))
    assert model.abstain_reason(5.0).startswith(f"{ABSTAINED_REASON_CODE}: ")
    model.info = dataclasses.replace(model.info, ood_threshold=0.5, metadata={
        **model.info.metadata, "ood": {"threshold": 0.5, "score": "gate"}})  # a gate's wording
    assert model.abstain_reason(0.9).startswith(f"{ABSTAINED_REASON_CODE}: gate score ")
