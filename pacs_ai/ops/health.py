"""Health as the service and `pacs-ai status` report it: readiness problems, delivery health per
destination, and what needs an admin.

Liveness (`/healthz`): the process works (listener, workers and senders running). Readiness
(`/readyz`): it can take films now (listener up, model loaded, spool writable and above
`[storage] min_free_bytes`, not stopping). Delivery health and `needs_admin` are detail: a PACS
that is down makes neither probe fail (restarting pacs-ai would not bring it back), but it shows
in `/healthz`, in `pacs-ai status` (exit status 1 once `[status]` says it is too long) and in the
metrics.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from pacs_ai.config import Config
from pacs_ai.queue.job_records import retry_can_fix
from pacs_ai.queue.jobs import JobStore
from pacs_ai.queue.spool import Spool


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def spool_state(spool: Spool, min_free_bytes: int) -> dict[str, Any]:
    """Free bytes against the floor and whether an image can be written now."""
    try:
        free: int | None = spool.free_bytes()
    except OSError:
        free = None
    write_problem = spool.write_problem()
    problems = []
    if write_problem is not None:
        problems.append(f"spool-unwritable: {write_problem}")
    if free is None:
        problems.append(f"spool-unreadable: cannot read the free space of {spool.root}")
    elif free < min_free_bytes:
        problems.append(f"spool-below-floor: {free} bytes free in {spool.root}, below [storage] "
                        f"min_free_bytes {min_free_bytes}; new images are refused (0xA700)")
    return {"path": str(spool.root), "free_bytes": free, "min_free_bytes": min_free_bytes,
            "writable": write_problem is None, "problems": problems}


def readiness(*, listening: bool, draining: bool, model: str | None, spool: Spool,
              min_free_bytes: int) -> dict[str, Any]:
    """/readyz: whether a film sent now would be taken. "ok" false names each problem."""
    spool_report = spool_state(spool, min_free_bytes)
    problems = []
    if draining:
        problems.append("draining: the service is stopping")
    elif not listening:
        problems.append("listener-down: not accepting associations")
    if model is None:
        problems.append("model-not-loaded")
    problems.extend(spool_report.pop("problems"))
    return {"ok": not problems, "problems": problems, "listening": listening,
            "draining": draining, "model": model, "spool": spool_report}


def liveness(*, listening: bool, draining: bool, workers: Sequence[threading.Thread],
             senders: Sequence[threading.Thread], store: JobStore | None, config: Config,
             ready: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """/healthz: the process works (listener, workers and senders running; while it drains
    on the way out they stop on purpose, and it stays ok). Readiness (`ready`, called once),
    delivery health per destination and what needs an admin are detail: they do not make it
    fail."""
    workers_alive = sum(t.is_alive() for t in workers)
    senders_alive = sum(t.is_alive() for t in senders)
    counts = store.job_counts() if store is not None else {}
    report: dict[str, Any] = {
        "ok": draining or bool(listening and workers_alive == len(workers)
                               and senders_alive == len(senders)),
        "listening": listening, "draining": draining,
        "workers_alive": workers_alive, "senders_alive": senders_alive, "jobs": counts}
    if store is None:
        return report
    ready_report = ready()
    destinations = destinations_state(store, config)
    pending = [s["oldest_pending_seconds"] for s in destinations.values()
               if s["oldest_pending_seconds"] is not None]
    report.update(
        ready=ready_report["ok"], not_ready=ready_report["problems"],
        model=ready_report["model"], spool=ready_report["spool"], destinations=destinations,
        oldest_pending_delivery_seconds=max(pending) if pending else None,
        needs_admin=needs_admin(
            config, store, destinations,
            {"problems": [p for p in ready_report["problems"] if p.startswith("spool-")]}))
    return report


def destinations_state(store: JobStore, config: Config, now: float | None = None
                       ) -> dict[str, dict[str, Any]]:
    """Per configured destination: last success, pending deliveries and the oldest one's age
    (since its image was received), how long it has been failing, the latest C-ECHO (from the
    spool's destination-echo.json; None where echoes are off), and its health in one word with
    the reason (:func:`destination_health`). `pacs-ai status`, /healthz and the queue page all
    show this, so they cannot disagree."""
    from pacs_ai.queue.echo_results import load_results

    now = time.time() if now is None else now
    echoing = {d.name for d in config.destinations if d.echo_interval_seconds > 0}
    echoes = load_results(config.storage.spool_dir) if echoing else {}
    limit = config.status.destination_failing_seconds
    result = {}
    for name, state in store.destination_deliveries(d.name for d in config.destinations).items():
        failing = None if state.failing_since is None else max(now - state.failing_since, 0.0)
        oldest = (None if state.oldest_pending_received_at is None
                  else max(now - state.oldest_pending_received_at, 0.0))
        result[name] = {
            "last_success_at": iso(state.last_success_at),
            "pending": state.pending,
            "oldest_pending_seconds": None if oldest is None else round(oldest, 3),
            "failing_since": iso(state.failing_since),
            "failing_seconds": None if failing is None else round(failing, 3),
            "failing_too_long": failing is not None and failing > limit,
            "last_error": state.last_error,
            "echo": _echo_state(echoes.get(name), now, limit) if name in echoing else None,
        }
        result[name]["health"], result[name]["health_detail"] = destination_health(result[name])
    return result


# A destination's health, worst first: what each word means (the guide lists them too).
HEALTH_WORDS = {
    "failing": "deliveries or the C-ECHO have failed for longer than [status] "
               "destination_failing_seconds: needs an admin",
    "retrying": "deliveries or the latest C-ECHO failed, for less than that so far",
    "unknown": "nothing tried yet: no report sent and no C-ECHO answered",
    "ok": "the latest delivery and C-ECHO (whichever it has) worked",
}


def destination_health(state: dict[str, Any]) -> tuple[str, str]:
    """The one word for a destination's health (a key of HEALTH_WORDS) and why, from its
    delivery failures and its latest C-ECHO alike: a PACS that is down with nothing waiting
    shows in its echo, one that refuses reports while it answers echoes in its deliveries."""
    echo = state.get("echo") or {}
    delivery_failing = state["failing_since"] is not None
    echo_failing = echo.get("ok") is False
    if state["failing_too_long"] or echo.get("failing_too_long"):
        word = "failing"
    elif delivery_failing or echo_failing:
        word = "retrying"
    elif state["last_success_at"] is None and not echo.get("ok"):
        return "unknown", ("no C-ECHO answered yet" if echo else "no report sent yet")
    else:
        word = "ok"
    reasons = []
    if delivery_failing:
        reasons.append(f"deliveries failing for {state['failing_seconds']:.0f} s: "
                       f"{state['last_error']}")
    if echo_failing:
        reasons.append(f"C-ECHO failing for {echo['failing_seconds']:.0f} s: {echo['detail']}")
    if not reasons:
        if state["last_success_at"] is not None:
            reasons.append(f"last report stored {state['last_success_at']}")
        if echo.get("ok"):
            reasons.append(f"C-ECHO ok at {echo['at']}")
    return word, "; ".join(reasons)


def _echo_state(echo: dict[str, Any] | None, now: float, limit: float) -> dict[str, Any]:
    if not echo:
        return {"ok": None, "at": None, "detail": "no C-ECHO yet", "failing_seconds": None,
                "failing_too_long": False}
    since = echo.get("failing_since")
    failing = None if since is None else max(now - since, 0.0)
    return {"ok": bool(echo.get("ok")), "at": iso(echo.get("at")), "detail": echo.get("detail"),
            "milliseconds": echo.get("milliseconds"),
            "failing_seconds": None if failing is None else round(failing, 3),
            "failing_too_long": failing is not None and failing > limit}


def needs_admin(config: Config, store: JobStore, destinations: dict[str, dict[str, Any]],
                spool: dict[str, Any], now: float | None = None) -> list[str]:
    """What an admin should look at, one line each; empty when nothing."""
    now = time.time() if now is None else now
    reasons = []
    if config.listener.refuses_every_caller:
        reasons.append("listener-refuses-every-caller: [listener] allowed_calling_ae_titles is "
                       "empty, so every association is rejected; name the modalities' AE titles "
                       "there (or set accept_any_calling_ae = true), then restart")
    reasons += _failures(config, store, now)
    limit = config.status.destination_failing_seconds
    for name, state in destinations.items():
        if state["failing_too_long"]:
            reasons.append(f"destination-failing: {name} has stored nothing for "
                           f"{state['failing_seconds']:.0f} s (over [status] "
                           f"destination_failing_seconds {limit:g}) while deliveries fail: "
                           f"{state['last_error']}")
        echo = state.get("echo")
        if echo and echo["failing_too_long"]:
            reasons.append(f"destination-echo-failing: {name} has not answered C-ECHO for "
                           f"{echo['failing_seconds']:.0f} s (over [status] "
                           f"destination_failing_seconds {limit:g}): {echo['detail']}")
    reasons.extend(spool["problems"])
    return reasons


def _failures(config: Config, store: JobStore, now: float) -> list[str]:
    """Failed jobs within [status] failed_jobs_within_seconds that no admin dismissed: those
    `pacs-ai retry` can fix once the cause is (failed-jobs), and those whose failure is in the
    image itself (failed-images), which only a corrected image or a dismissal settles."""
    window = config.status.failed_jobs_within_seconds
    within = f" in the last {window:g} s" if window > 0 else ""
    fixable, in_image = 0, Counter()
    for (stage, code), count in store.failures_since(now - window if window > 0 else 0.0).items():
        if retry_can_fix(stage, code):
            fixable += count
        else:
            in_image[code] += count
    reasons = []
    if fixable:
        reasons.append(f"failed-jobs: {fixable} job(s) failed{within}; see the latest failures, "
                       "fix the cause, then `pacs-ai retry`")
    if in_image:
        codes = ", ".join(f"{code} {count}" for code, count in sorted(in_image.items()))
        reasons.append(f"failed-images: {in_image.total()} image(s) failed{within} for what is "
                       f"in the image ({codes}); `pacs-ai retry` cannot fix that: have the "
                       "modality send a corrected image, or `pacs-ai dismiss` them")
    return reasons
