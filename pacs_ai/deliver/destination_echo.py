"""The optional periodic C-ECHO to each destination ([[destinations]] echo_interval_seconds).

A PACS that is down shows in the delivery health only once a report waits for it; an echo every
few minutes shows it at once, also at night when no film arrives. Each destination with an
interval gets a thread that echoes at start-up and then every interval, over its own
association (the destination's AE titles, timeout and TLS, as its reports). An echo answered
makes the deliveries that wait because the destination could not be reached due at once.

The latest result per destination is written to `<spool>/destination-echo.json`
(`pacs_ai.queue.echo_results`), so
`pacs-ai status` (another process) shows it as /healthz does; metrics
pacs_ai_destination_echo_ok and pacs_ai_destination_echo_timestamp_seconds; a change from ok to
failed is logged (echo_failed, a warning) and back (echo_recovered). DICOMweb destinations
have no C-ECHO: the key is refused for them in the config.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import structlog

from pacs_ai.config import Destination
from pacs_ai.ops import metrics
from pacs_ai.queue.echo_results import EchoResult, EchoResults

log = structlog.get_logger()


class DestinationEcho(threading.Thread):
    def __init__(self, destination: Destination, results: EchoResults, stop: threading.Event,
                 on_answered: Callable[[], Any] | None = None):
        super().__init__(name=f"echo-{destination.name}", daemon=True)
        from pacs_ai.deliver.cstore_transport import CStoreTransport

        self.destination = destination
        self.results = results
        self.stop_event = stop
        # after each echo answered: the service makes the destination's deliveries that wait
        # because it could not be reached due now (pacs_ai.deliver.sender.release_waiting)
        self.on_answered = on_answered
        self.transport = CStoreTransport(destination)
        self.last: EchoResult | None = None

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.echo_once()
            except Exception as error:  # a full spool, a bug: the next round tries again
                log.exception("echo_round_failed", destination=self.destination.name,
                              error=str(error))
            self.stop_event.wait(self.destination.echo_interval_seconds)

    def echo_once(self) -> EchoResult:
        """Echo the destination now; record, count and (on a change) log the result."""
        name = self.destination.name
        started = time.monotonic()
        ok, detail = self.transport.echo()
        now = time.time()
        previous = self.last
        if ok:
            failing_since = None
        elif previous is not None and not previous.ok:
            failing_since = previous.failing_since
        else:
            failing_since = now
        result = EchoResult(ok=ok, at=now, detail=detail,
                            milliseconds=round((time.monotonic() - started) * 1000, 1),
                            failing_since=failing_since)
        self.last = result
        metrics.DESTINATION_ECHO_OK.labels(destination=name).set(1 if ok else 0)
        metrics.DESTINATION_ECHO_TIMESTAMP.labels(destination=name).set(now)
        if not ok and (previous is None or previous.ok):
            log.warning("echo_failed", destination=name, where=self.destination.where,
                        error=detail)
        elif ok and previous is not None and not previous.ok:
            log.info("echo_recovered", destination=name, where=self.destination.where,
                     failed_seconds=round(now - (previous.failing_since or now), 1))
        self.results.update(name, result)
        if ok and self.on_answered is not None:
            self.on_answered()
        return result
