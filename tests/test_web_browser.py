"""The queue page in a real browser: headless Chromium (Debian chromium + chromium-driver) driven
by Selenium, against `pacs-ai serve` as a subprocess with two destinations, one of them down.

Loads /queue after three stores, checks what it shows (and that no patient data does), presses
retry without the token, with a wrong one and with the right one, and saves screenshots under
the test's tmp dir.
"""

from __future__ import annotations

import pytest

from testbed.dicom_peers import (RecordingPacs, ServiceProcess, SimulatedModality, free_port,
                                 synthetic_radiograph, wait_until, write_service_config)
from testbed.environment import require_tool
from testbed.real_peers import spool_jobs

pytestmark = pytest.mark.real_peer

TOKEN = "retry-token-for-the-browser-test-0123"


@pytest.fixture
def browser():
    chromium = require_tool("chromium")
    driver_path = require_tool("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1600,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def old_page_gone(element):
    """A wait condition: `element`'s page has been replaced by the next one."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.expected_conditions import staleness_of

    stale = staleness_of(element)

    def gone(driver) -> bool:
        try:
            return stale(driver)
        except WebDriverException as error:
            if "does not belong to the document" in str(error):
                return True
            raise
    return gone


def test_the_queue_page_in_chromium_shows_the_films_and_retries_with_the_token(tmp_path,
                                                                               browser,
                                                                               tiny_model):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    token_file = tmp_path / "web-token"
    token_file.write_text(TOKEN + "\n")
    archive = RecordingPacs(port=free_port(), ae_title="ARCHIVE")  # down until the retry
    metrics_port = free_port()
    with RecordingPacs(ae_title="PACS") as pacs:
        config = write_service_config(
            tmp_path, model=tiny_model,
            destinations=[pacs.destination(name="pacs"), archive.destination(name="archive")],
            tables={"retry": {"max_attempts": 2},
                    "metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port},
                    # long enough that no reload comes between typing and pressing retry
                    "web": {"token_file": str(token_file), "refresh_seconds": 600}})
        with ServiceProcess(config, tmp_path / "serve.log") as service:
            films = [synthetic_radiograph(seed=40 + n) for n in range(3)]
            results = SimulatedModality(service.port, calling_ae_title="ER_CR").send(films)
            assert all(r.acknowledged for r in results), results
            spool = tmp_path / "spool"
            assert wait_until(lambda: [j.state for j in spool_jobs(spool).values()]
                              == ["failed"] * 3, 60), service.log_path.read_text()[-3000:]

            page = f"http://127.0.0.1:{metrics_port}/queue"
            browser.get(page)
            assert browser.title == "pacs-ai queue"
            rows = browser.find_elements(By.CSS_SELECTOR, "#films tr[id^=job-]")
            assert len(rows) == 3
            for row in rows:
                text = row.text
                assert "ER_CR" in text and "CR" in text and "failed (deliver)" in text, text
                assert "pacs: done (1)" in text and "archive: failed (2)" in text, text
                assert "connection-failed" in text and "tiny-test-model" in text, text
                assert ("pneumonia (" in text) or ("normal (" in text), text
            counts = browser.find_element(By.ID, "counts").text
            assert "failed 3" in counts and "done 0" in counts, counts
            # issue 24 item 4: today's rates in the model's drift chart, an inline SVG; three
            # films are too few to judge (hollow), the tooltip gives the counts
            figure = browser.find_element(By.ID, "drift-0")
            assert "tiny-test-model" in figure.text and "(live)" in figure.text, figure.text
            chart = figure.find_element(By.CSS_SELECTOR, "svg.drift-chart")
            assert chart.is_displayed() and chart.size["width"] > 300, chart.size
            [point] = chart.find_elements(By.CSS_SELECTOR, "circle.positive")
            assert "few" in point.get_attribute("class").split()
            assert " of 3 classified found pneumonia" in point.find_element(
                By.TAG_NAME, "title").get_attribute("textContent")
            archive_row = browser.find_element(By.ID, "destination-archive").text
            assert "retrying" in archive_row or "failing" in archive_row, archive_row
            source = browser.page_source
            assert "<meta http-equiv=\"refresh\" content=\"600\">" in source  # reloads itself
            for film in films:  # no patient name or ID, no accession number
                for value in (str(film.PatientName), film.PatientID, film.AccessionNumber,
                              "Synthetic"):
                    assert value not in source, value
            # Issue 23 item 8: each film's UIDs whole, to look it up in the PACS; in a narrow
            # window one wraps over lines in its cell, and a click selects it whole for
            # copying (no script).
            browser.set_window_size(900, 1000)
            shown = {code.get_attribute("textContent") for code in
                     browser.find_elements(By.CSS_SELECTOR, "#films code.uid")}
            for film in films:
                assert {str(film.SOPInstanceUID), str(film.StudyInstanceUID)} <= shown, shown
            uid = browser.find_element(By.CSS_SELECTOR, f"#{rows[0].get_attribute('id')} code.uid")
            # over one line: a line is about 1.2 font sizes high
            assert uid.size["height"] > 1.8 * browser.execute_script(
                "return parseFloat(getComputedStyle(arguments[0]).fontSize)", uid), uid.size
            uid.click()
            assert browser.execute_script("return window.getSelection().toString()") == \
                uid.get_attribute("textContent")
            browser.save_screenshot(str(tmp_path / "queue-failed.png"))
            browser.set_window_size(1600, 1000)

            archive.start()  # the archive is back: a retry can now succeed
            try:
                first = rows[0].get_attribute("id").removeprefix("job-")

                def press_retry(token: str | None) -> None:
                    browser.get(page)
                    field = browser.find_element(By.NAME, "token")
                    field.clear()
                    if token is not None:
                        field.send_keys(token)
                    button = browser.find_element(By.CSS_SELECTOR,
                                                  f"button[name=job][value='{first}']")
                    button.click()
                    # the answer is a new page: wait until the old one is gone (Chromium may
                    # say so as "does not belong to the document" instead of a stale element)
                    WebDriverWait(browser, 30).until(old_page_gone(button))
                    WebDriverWait(browser, 30).until(
                        lambda driver: driver.execute_script("return document.readyState")
                        == "complete")

                press_retry(None)
                assert browser.title == "Retry refused"
                assert browser.find_element(By.ID, "message").text == \
                    "the token is required to retry"
                press_retry("not-the-token")
                assert browser.find_element(By.ID, "message").text == "wrong token"
                assert not archive.snapshot()  # nothing was retried
                press_retry(TOKEN)
                assert browser.current_url.endswith("/queue?retried=1")
                assert archive.wait_for(1, timeout=30)

                def first_film_done() -> bool:
                    browser.get(page)
                    row = browser.find_element(By.ID, f"job-{first}").text
                    return "archive: done" in row and " done " in f" {row} "
                assert wait_until(first_film_done, 30, interval=0.5)
                browser.save_screenshot(str(tmp_path / "queue-after-retry.png"))
            finally:
                archive.stop()
            events = [e for e in service.events() if e["event"].startswith("web_retry")]
            assert [(e["event"], e.get("reason")) for e in events] == [
                ("web_retry_refused", "missing-token"), ("web_retry_refused", "wrong-token"),
                ("web_retry_requested", None)]
            assert events[-1]["deliveries"] == 1 and events[-1]["client"] == "127.0.0.1"
    for name in ("queue-failed.png", "queue-after-retry.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
