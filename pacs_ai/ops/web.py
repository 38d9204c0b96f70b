"""The queue page: counts per state, each model's daily rates against the band the site expects
(pacs_ai.ops.drift, drawn by pacs_ai.ops.drift_chart), destinations' health, recent films, and a retry
button for failed deliveries, served by the [metrics] HTTP server (pacs_ai.ops.metrics) beside
/metrics.

    GET  /queue            HTML, rendered here with the standard library (html.escape); it
                           reloads itself every [web] refresh_seconds (meta refresh, no script)
    GET  /api/queue        the same content as JSON, for scripts (also /queue with
                           "Accept: application/json")
    POST /queue/retry      form fields token, job: the job's failed deliveries are tried again;
                           303 back to /queue
    POST /api/queue/retry  the same for scripts (token also as "Authorization: Bearer ..."); JSON

Retrying needs the token in [web] token_file; without a token_file the page is read-only. A
POST without the token or with another one is answered 403 and logged (web_retry_refused).

What is shown never names the patient: no names, IDs or birth dates are recorded with a job,
and the Accession Number only with [web] show_accession_number = true. UIDs are shown whole
(wrapped on the page; a click selects one whole), so a film can be looked up in the PACS.
"""

from __future__ import annotations

import datetime
import hmac
import html
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import structlog

import pacs_ai
from pacs_ai.config import Config
from pacs_ai.errors import UserError
from pacs_ai.finding import probability_label
from pacs_ai.ops import drift, drift_chart, health
from pacs_ai.queue.job_records import Job, JobState, Stage
from pacs_ai.queue.jobs import JobStore

log = structlog.get_logger()


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


# Nothing but this page's own styles and form posts; never framed or cached.
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                                "form-action 'self'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


def read_token(config: Config) -> str | None:
    path = config.web.token_file
    if path is None:
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"[web] token_file: cannot read {path}: "
                        f"{getattr(error, 'strerror', None) or error}") from None
    if len(token) < 16:
        raise UserError(f"[web] token_file: {path} holds {len(token)} characters; use at "
                        "least 16 (e.g. `openssl rand -hex 24`)")
    return token


def _iso(timestamp: float | None) -> str | None:
    return health.iso(timestamp)


class QueuePage:
    """The answers for /queue and /api/queue (and their retry POSTs); None for other paths."""

    def __init__(self, config: Config, store: JobStore, model_label: str | None = None):
        self.config = config
        self.store = store
        self.model_label = model_label
        self.token = read_token(config)

    # --- content ------------------------------------------------------------------------

    def film(self, job: Job, deliveries: dict[str, dict[str, Any]]) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "job": job.id,
            "received_at": _iso(job.received_at),
            "calling_ae_title": job.calling_ae_title,
            "modality": job.modality,
            "sop_instance_uid": job.sop_instance_uid,
            "study_instance_uid": job.study_instance_uid,
            "report_uid": job.report_uid,
            "state": job.state,
            "stage": job.stage,
            "finding": job.finding,
            "probability": job.probability,  # as the model gave it; the page shows a label
            "reason": job.reason,
            # a failure an admin dismissed (`pacs-ai dismiss`): seen, calls for no one
            "dismissed_at": _iso(job.dismissed_at),
            "route": job.route,
            "model": job.model,
            "age_known": job.age_known,  # false: classified without a usable patient age
            "deliveries": deliveries,
            "retry_possible": job.state == JobState.FAILED and job.stage == Stage.DELIVER
                              and job.report_file is not None,
        }
        if self.config.web.show_accession_number:
            entry["accession_number"] = job.accession_number
        return entry

    def snapshot(self) -> dict[str, Any]:
        return self._content()[0]

    def _content(self) -> tuple[dict[str, Any], list[drift.ModelDays]]:
        """The snapshot (what /api/queue answers) and each model's days for the page's
        charts."""
        now = time.time()
        models = drift.model_days(self.store, self.config.drift, now)
        jobs = self.store.recent_jobs(self.config.web.recent_films)
        deliveries = self.store.deliveries_of(job.id for job in jobs)
        destinations = health.destinations_state(self.store, self.config)
        kinds = {d.name: (d.kind, d.where) for d in self.config.destinations}
        for name, state in destinations.items():  # health: health.destination_health's
            state["kind"], state["where"] = kinds.get(name, (None, None))
        return {
            "generated_at": _iso(now),
            "version": pacs_ai.__version__,
            "model": self.model_label,
            "jobs": self.store.job_counts(),
            "backlog": self.store.backlog(),
            "destinations": destinations,
            # each model's daily positive and abstention rates against [drift]'s band
            "drift": drift.as_json(models, self.config.drift, now),
            "films": [self.film(job, deliveries.get(job.id, {})) for job in jobs],
            "retry_enabled": self.token is not None,
        }, models

    # --- HTTP ---------------------------------------------------------------------------

    def get(self, path: str, accept: str | None = None) -> Answer | None:
        wants_json = "application/json" in (accept or "") and "text/html" not in (accept or "")
        if path == "/api/queue" or (path in ("/queue", "/queue/") and wants_json):
            return _json(200, self.snapshot())
        if path in ("/queue", "/queue/"):
            snapshot, models = self._content()
            return Answer(200, "text/html; charset=utf-8",
                          render(snapshot, self.config, models).encode(), SECURITY_HEADERS)
        return None

    def post(self, path: str, body: bytes, authorization: str | None,
             client: str) -> Answer | None:
        if path not in ("/queue/retry", "/api/queue/retry"):
            return None
        api = path.startswith("/api/")
        form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        if api and body.lstrip().startswith(b"{"):
            try:
                form = {k: str(v) for k, v in json.loads(body).items()}
            except (ValueError, AttributeError):
                return _json(400, {"ok": False, "error": "body: expected a JSON object"})
        token = form.get("token") or ""
        if authorization and authorization.lower().startswith("bearer "):
            token = authorization[7:].strip()
        refusal = self._refusal(token)
        if refusal is not None:
            log.warning("web_retry_refused", client=client, reason=refusal)
            message = {"no-token-configured": "read-only: [web] token_file is not set",
                       "missing-token": "the token is required to retry",
                       "wrong-token": "wrong token"}[refusal]
            return _json(403, {"ok": False, "error": message}) if api else \
                _page_answer(403, "Retry refused", message)
        try:
            job_id = int(form.get("job", ""))
        except ValueError:
            return _json(400, {"ok": False, "error": "job: expected a job number"}) if api else \
                _page_answer(400, "Retry refused", "job: expected a job number")
        job = self.store.job_by_id(job_id)
        requeued = self.store.redeliver(job_id) if job is not None else 0
        log.info("web_retry_requested", client=client, job=job_id,
                 sop_instance_uid=job.sop_instance_uid if job else None, deliveries=requeued)
        if api:
            return _json(200, {"ok": True, "job": job_id, "deliveries_requeued": requeued})
        return Answer(303, "text/plain; charset=utf-8", b"see /queue\n",
                      (("Location", f"/queue?retried={requeued}"), *SECURITY_HEADERS))

    def _refusal(self, token: str) -> str | None:
        if self.token is None:
            return "no-token-configured"
        if not token:
            return "missing-token"
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            return "wrong-token"
        return None


def _json(status: int, value: Any) -> Answer:
    return Answer(status, "application/json",
                  (json.dumps(value, default=str, sort_keys=True) + "\n").encode(),
                  SECURITY_HEADERS)


def _page_answer(status: int, title: str, message: str) -> Answer:
    body = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}"
            f"</title></head><body><h1>{html.escape(title)}</h1><p id=message>"
            f"{html.escape(message)}</p><p><a href=/queue>Back to the queue</a></p></body></html>")
    return Answer(status, "text/html; charset=utf-8", body.encode(), SECURITY_HEADERS)


# --- HTML -------------------------------------------------------------------------------------

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
.done, .ok { color: #176317; } .failed, .failing { color: #a00; font-weight: bold; }
.pending, .retrying, .delivering, .classifying { color: #8a5a00; }
figure.drift { margin: 0.5em 0 1em; } figure.drift svg { display: block; }
.skipped, .unknown, .dismissed { color: #555; } .note { color: #555; } code { font-size: 12px; }
/* UIDs whole, to look a film up in the PACS: wrapped anywhere to fit, one click selects all */
.uid { word-break: break-all; user-select: all; } td.film { min-width: 17em; }
"""


def _e(value: Any) -> str:
    return "" if value is None else html.escape(str(value))


def _finding(film: dict[str, Any]) -> str:
    if film["finding"]:
        no_age = ", no age" if film.get("age_known") is False else ""
        shown = "" if film["probability"] is None else \
            f" ({probability_label(film['probability'])})"
        return f"{_e(film['finding'])}{_e(shown)}{no_age}"
    return _e(film["reason"]) or "-"


def _dismissed(film: dict[str, Any]) -> str:
    if not film.get("dismissed_at"):
        return ""
    return (f"<br><span class=dismissed title=\"{_e(film['dismissed_at'])}\">"
            "dismissed</span>")


def _deliveries(film: dict[str, Any]) -> str:
    parts = []
    for name, delivery in sorted(film["deliveries"].items()):
        error = delivery["last_error"]
        parts.append(f"<span class={_e(delivery['state'])} title=\"{_e(error)}\">{_e(name)}: "
                     f"{_e(delivery['state'])} ({delivery['attempts']})</span>"
                     + (f"<br><code>{_e(error)}</code>" if error else ""))
    return "<br>".join(parts) or "-"


def _drift_section(snapshot: dict[str, Any], config: Config,
                   models: list[drift.ModelDays]) -> str:
    """A chart per model (pacs_ai.ops.drift_chart), its caption saying how many judged days were
    outside the band, and what the marks mean."""
    settings = config.drift
    low, high = settings.expected_positive_rate
    first = datetime.date.fromisoformat(snapshot["drift"]["from"])
    last = datetime.date.fromisoformat(snapshot["drift"]["to"])
    figures = []
    for index, (model, entry) in enumerate(zip(models, snapshot["drift"]["models"])):
        judged = sum(day["judged"] for day in entry["days"])
        outside = entry["days_out_of_band"]
        verdict = (f"<span class=failing>{outside} of {judged} judged days outside the "
                   "band</span>" if outside else f"{judged} judged days, none outside the band")
        figures.append(
            f"<figure id=drift-{index} class=drift><figcaption><b>{_e(model.model)}</b> "
            f"({_e(model.role)}): {len(entry['days'])} days with films; {verdict}"
            f"</figcaption>{drift_chart.chart(model, settings, first, last)}</figure>")
    legend = (f"<p class=note id=drift-legend>Per UTC day of the last {settings.days} days: "
              f"<span style=\"color:{drift_chart.POSITIVE}\">&#9679;</span> share of the "
              "classified films found pneumonia, against the band the site expects (green, "
              f"[drift] expected_positive_rate {low:.0%}-{high:.0%}); "
              f"<span style=\"color:{drift_chart.ABSTENTION}\">&#9632;</span> share of the "
              "assessed films the model abstained on, against its limit (dashed, "
              f"max_abstention_rate {settings.max_abstention_rate:.0%}). Red: outside; "
              f"hollow: fewer than {settings.min_films} films, not judged. Point at a mark for "
              "its counts.</p>")
    if not figures:
        return (f"<p class=note id=drift-legend>No film assessed in the last {settings.days} "
                "days.</p>")
    return legend + "".join(figures)


def render(snapshot: dict[str, Any], config: Config,
           models: list[drift.ModelDays] | None = None) -> str:
    refresh = config.web.refresh_seconds
    show_accession = config.web.show_accession_number
    retry = snapshot["retry_enabled"]
    rows = []
    for film in snapshot["films"]:
        button = (f"<button type=submit name=job value={film['job']}>retry</button>"
                  if retry and film["retry_possible"] else "")
        rows.append(
            f"<tr id=job-{film['job']}><td>{_e(film['received_at'])}</td>"
            f"<td>{_e(film['calling_ae_title'])}</td><td>{_e(film['modality'])}</td>"
            + (f"<td>{_e(film.get('accession_number'))}</td>" if show_accession else "")
            + f"<td class=film><code class=uid>{_e(film['sop_instance_uid'])}</code>"
            f"<br><span class=note>study <code class=uid>"
            f"{_e(film['study_instance_uid'])}</code></span></td>"
            f"<td class={_e(film['state'])}>{_e(film['state'])}"
            f"{' (' + _e(film['stage']) + ')' if film['stage'] else ''}"
            f"{_dismissed(film)}</td>"
            f"<td class=finding>{_finding(film)}</td><td>{_e(film['route'])}</td>"
            f"<td class=deliveries>{_deliveries(film)}</td><td>{_e(film['model'])}</td>"
            f"<td>{button}</td></tr>")
    destinations = []
    for name, state in snapshot["destinations"].items():
        destinations.append(
            f"<tr id=destination-{_e(name)}><td>{_e(name)}</td><td>{_e(state['kind'])}</td>"
            f"<td><code>{_e(state['where'])}</code></td>"
            f"<td class={_e(state['health'])} title=\"{_e(state['health_detail'])}\">"
            f"{_e(state['health'])}<br><span class=note>{_e(state['health_detail'])}</span></td>"
            f"<td>{_e(state['last_success_at']) or 'never'}</td><td>{state['pending']}</td>"
            f"<td><code>{_e(state['last_error'])}</code></td></tr>")
    counts = " | ".join(f"<span class={state}>{state} {snapshot['jobs'].get(state, 0)}</span>"
                        for state in JobState)
    token_field = ("<p><label>Token for retry: <input type=password name=token "
                   "autocomplete=off></label> <span class=note>then press retry on a failed "
                   "film</span></p>" if retry else
                   "<p class=note id=read-only>Read-only: set [web] token_file to retry failed "
                   "deliveries from this page.</p>")
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8>
{f'<meta http-equiv=refresh content={refresh}>' if refresh else ''}
<title>pacs-ai queue</title><style>{STYLE}</style></head>
<body>
<h1>pacs-ai queue</h1>
<p class=note>pacs-ai {_e(snapshot['version'])}, model {_e(snapshot['model'])}; at
{_e(snapshot['generated_at'])}{f', reloads every {refresh} s' if refresh else ''}.
JSON: <a href=/api/queue>/api/queue</a></p>
<h2>Jobs</h2>
<p id=counts>{counts} &mdash; backlog {snapshot['backlog']}</p>
<h2>Model drift</h2>
<div id=drift>{_drift_section(snapshot, config, models or [])}</div>
<h2>Destinations</h2>
<table id=destinations><tr><th>Name</th><th>Kind</th><th>Where</th><th>Health</th>
<th>Last success</th><th>Waiting</th><th>Last error</th></tr>
{''.join(destinations) or '<tr><td colspan=7>none configured</td></tr>'}</table>
<h2>Recent films</h2>
<form method=post action=/queue/retry>
{token_field}
<table id=films><tr><th>Received (UTC)</th><th>Calling AE</th><th>Modality</th>
{'<th>Accession</th>' if show_accession else ''}<th>Film (SOP Instance UID, study)</th><th>State</th>
<th>Finding or reason</th><th>Route</th><th>Deliveries (attempts)</th><th>Model</th><th></th></tr>
{''.join(rows) or '<tr><td colspan=11>no films yet</td></tr>'}</table>
</form>
</body></html>
"""
