"""The running service: spool + job queue + model + workers + senders + DICOM listener.

Start order puts the listener last, so nothing is acknowledged before the rest can take it;
stop order is the reverse (see :meth:`Service.stop`). Thread count is bounded: the listener's
server thread plus at most `[limits] max_associations` association threads, `[workers] count`
workers, one sender per destination, and the metrics server.

Embedding (tests, benchmarks): ``Service(config).start()`` then ``.stop()``; the CLI adds
signal handling in :func:`serve_until_signalled`.
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from typing import Any

import structlog

import pacs_ai
from pacs_ai.classify.capacity import sized_config
from pacs_ai.classify.helper_processes import HelperPool
from pacs_ai.classify.shadow import ShadowRunner, load_shadow_model, log_shadow_model
from pacs_ai.classify.worker import ClassificationWorker
from pacs_ai.config import Config
from pacs_ai.deliver.destination_echo import DestinationEcho
from pacs_ai.deliver.sender import DestinationSender, release_waiting
from pacs_ai.model.intended_use import format_age_range, log_site_model_info, site_model_info
from pacs_ai.model.model import PneumoniaModel
from pacs_ai.model.site_threshold import apply_threshold_binding
from pacs_ai.ops import audit, health, metrics
from pacs_ai.ops.audit import AuditTrail
from pacs_ai.ops.http_server import start_http_server
from pacs_ai.ops.web import QueuePage
from pacs_ai.queue.echo_results import EchoResults
from pacs_ai.queue.jobs import JobStore
from pacs_ai.queue.retention import FileRetention
from pacs_ai.queue.spool import Spool
from pacs_ai.receive.scp import StorageSCP, log_who_may_store

log = structlog.get_logger()

THREAD_JOIN_SECONDS = 30.0


class Service:
    def __init__(self, config: Config):
        self.config = config
        self.spool = Spool(config.storage.spool_dir)
        self.store: JobStore | None = None
        self.files: FileRetention | None = None  # what the spool keeps of finished jobs
        self.model: PneumoniaModel | None = None
        self.scp: StorageSCP | None = None
        self.workers: list[ClassificationWorker] = []
        self.helper_pools: list[HelperPool] = []  # one helper pool per worker
        self.senders: list[DestinationSender] = []
        self.shadow: ShadowRunner | None = None  # [shadow]: the candidate model's thread
        self.echoes: list[DestinationEcho] = []  # [[destinations]] echo_interval_seconds
        self.http_server: Any = None
        self.audit = AuditTrail.disabled()
        self._threads_stop = threading.Event()
        self._purge_thread: threading.Thread | None = None
        self._started = False
        self._draining = False  # stop() has begun: no longer ready, still live
        self._stopped = False

    @property
    def port(self) -> int:
        assert self.scp is not None
        return self.scp.port

    def start(self) -> "Service":
        """Open everything and start listening; on any failure, undo and raise (UserError for
        what the operator can fix)."""
        limit_malloc_arenas()
        # [workers] "auto" becomes numbers from the CPUs and memory this process may use
        config = self.config = sized_config(self.config)
        try:
            self.spool.prepare()
            self.spool.lock()
            self.store = JobStore.open(self.spool.db_path)
            self.files = FileRetention(self.spool, self.store, config.storage)
            resumed = self.store.reset_interrupted()
            abandoned = self.store.abandon_unknown_destinations(d.name for d in config.destinations)
            self.model = PneumoniaModel.load(config.model_path())
            self._apply_site_model_settings()
            shadow_model = load_shadow_model(config)  # [shadow]: a candidate, never reported
            if shadow_model is not None:
                log_shadow_model(shadow_model, config.shadow,
                                 self.model.info.intended_age_years)
                # a connection of its own: its writes neither take the live pipeline's lock
                # nor wait for an fsync (its results are not acknowledged data)
                self.shadow = ShadowRunner(shadow_model, self.model,
                                           JobStore.open(self.spool.db_path, durable=False))
            if config.workers.torch_threads:
                import torch
                torch.set_num_threads(config.workers.torch_threads)
            if config.metrics.enabled:
                queue_page = (QueuePage(config, self.store, self.model.info.label)
                              if config.web.enabled else None)
                self.http_server = start_http_server(
                    config.metrics.host, config.metrics.port, self.health, self.readiness,
                    self.refresh_gauges, web=queue_page)
            self._start_audit()
            self._start_threads()
            self.scp = StorageSCP(config, self.spool, self.store, self.audit)
            self.scp.start()
        except BaseException:
            self.stop()
            raise
        self._started = True
        self.refresh_gauges()
        log.info("service_started", version=pacs_ai.__version__, ae_title=config.listener.ae_title,
                 host=config.listener.host, port=self.port, tls=config.tls.enabled,
                 spool_dir=str(self.spool.root), model=self.model.info.label,
                 model_path=str(self.model.path), threshold=self.model.info.threshold,
                 shadow_model=self.shadow.model.info.label if self.shadow else None,
                 intended_age_years=(format_age_range(self.model.info.intended_age_years)
                                     if self.model.info.intended_age_years else None),
                 unknown_age=config.model.unknown_age,
                 destinations=[d.name for d in config.destinations],
                 routes=[route.name for route in config.routing.routes],
                 workers=config.workers.count, resumed_jobs=resumed,
                 abandoned_deliveries=abandoned, config=str(config.source or "(defaults)"),
                 audit_log=str(self.audit.path) if self.audit.enabled else None)
        self.audit.record(audit.application_activity(
            started=True, ae_title=config.listener.ae_title, node=audit.node_name(),
            details={"version": pacs_ai.__version__, "port": self.port,
                     "model": self.model.info.label}))
        log_who_may_store(config)
        if not config.destinations:
            log.warning("no_destination", config=str(config.source or "(defaults)"),
                        reports_kept=config.storage.keep_reports,
                        detail="no [[destinations]] configured: films are classified but their "
                               "reports are sent nowhere (kept in the spool's outbox/ only "
                               "with [storage] keep_reports = true)")
        return self

    def _start_audit(self) -> None:
        settings = self.config.audit
        if not settings.enabled:
            return
        self.audit = AuditTrail(settings.file(self.spool.root), max_bytes=settings.max_bytes,
                                backup_count=settings.backup_count,
                                source_id=f"{self.config.listener.ae_title}@{audit.node_name()}"
                                ).start()

    def _apply_site_model_settings(self) -> None:
        """The threshold and age range in force: the model file's, or [model]'s overrides
        (unknown_age, a site choice only, goes to the workers' filter policy)."""
        assert self.model is not None
        settings = self.config.model
        own = self.model.info
        apply_threshold_binding(settings.site_threshold, self.model)
        self.model.info = site_model_info(own, threshold=settings.threshold,
                                          min_age_years=settings.min_age_years,
                                          max_age_years=settings.max_age_years,
                                          ood_threshold=settings.ood_threshold)
        log_site_model_info(own, self.model.info, settings.unknown_age)

    def _start_threads(self) -> None:
        assert self.store is not None and self.model is not None and self.files is not None
        worker_wake = threading.Event()
        self.store.notify_on_work(worker_wake)
        for index in range(self.config.workers.count):
            helper_pool = HelperPool(self.config.workers.processes, log_level=self.config.log.level,
                                     log_format=self.config.log.format,
                                     priority_prefix=self.config.log.priority_prefix,
                                     is_stopping=self._threads_stop.is_set)
            self.helper_pools.append(helper_pool)
            self.workers.append(ClassificationWorker(
                f"worker-{index + 1}", self.config, self.spool, self.store, self.model,
                self._threads_stop, worker_wake, self.files.job_finished, helper_pool,
                shadow=self.shadow))
        for destination in self.config.destinations:
            sender_wake = threading.Event()
            self.store.notify_on_work(sender_wake)
            self.senders.append(DestinationSender(
                destination, self.spool, self.store, self.config.retry, self._threads_stop,
                sender_wake, self.files.job_finished, self.audit,
                include_patient_id=self.config.audit.include_patient_id,
                report=self.config.report))
        echo_results = EchoResults(self.spool.root)
        self.echoes = [DestinationEcho(destination, echo_results, self._threads_stop,
                                       functools.partial(release_waiting, self.store,
                                                         destination.name, "c-echo"))
                       for destination in self.config.destinations
                       if destination.echo_interval_seconds > 0]
        for thread in (*self.workers, *self.senders, *self.echoes,
                       *filter(None, [self.shadow])):
            thread.start()
        if self.config.storage.keep_failed_days > 0:
            self._purge_thread = threading.Thread(target=self.files.purge_periodically,
                                                  args=(self._threads_stop,), name="purge",
                                                  daemon=True)
            self._purge_thread.start()

    def stop(self) -> None:
        """Graceful stop, in order: stop accepting and let running associations finish (up to
        [limits] shutdown_grace_seconds); let workers finish their batch and senders their
        current C-STORE; close the queue. Whatever is unfinished stays in the spool and resumes
        at the next start. Safe to call more than once and after a failed start."""
        if self._draining:
            return
        self._draining = True
        started = time.monotonic()
        if self.scp is not None:
            self.scp.stop(self.config.limits.shutdown_grace_seconds)
        self._threads_stop.set()
        threads = [*self.workers, *self.senders, *self.echoes,
                   *filter(None, [self._purge_thread])]
        for thread in threads:
            thread.join(timeout=THREAD_JOIN_SECONDS)
        if self.shadow is not None:  # after the workers, which hand it their last batches
            self.shadow.finish()
            if self.shadow.ident is not None:
                self.shadow.join(timeout=THREAD_JOIN_SECONDS)
            if not self.shadow.is_alive():
                self.shadow.store.close()
            threads.append(self.shadow)
        still_running = [t.name for t in threads if t.is_alive()]
        for helper_pool in self.helper_pools:
            helper_pool.close()
        if self.http_server is not None:
            self.http_server.shutdown()
        self._stopped = True
        if self._started:
            self.audit.record(audit.application_activity(
                started=False, ae_title=self.config.listener.ae_title, node=audit.node_name()))
        self.audit.close()
        if self.store is not None and not still_running:
            self.store.close()  # else a thread still uses it; the process exit closes it
        self.spool.unlock()
        if self._started:
            log.info("service_stopped", seconds=round(time.monotonic() - started, 3),
                     threads_still_running=still_running)

    def refresh_gauges(self) -> None:
        """The gauges, from the spool and the queue: at each scrape of /metrics."""
        if self.store is None or self._stopped:
            return
        metrics.BACKLOG.set(self.store.backlog())
        ready = self.readiness()
        metrics.READY.set(1 if ready["ok"] else 0)
        if ready["spool"]["free_bytes"] is not None:
            metrics.SPOOL_FREE_BYTES.set(ready["spool"]["free_bytes"])
        now = time.time()
        for name, state in self.store.destination_deliveries(
                d.name for d in self.config.destinations).items():
            since = {"oldest": state.oldest_pending_received_at, "failing": state.failing_since}
            ages = {key: 0.0 if at is None else max(now - at, 0.0) for key, at in since.items()}
            metrics.OLDEST_PENDING_DELIVERY_SECONDS.labels(destination=name).set(ages["oldest"])
            metrics.DESTINATION_FAILING_SECONDS.labels(destination=name).set(ages["failing"])
            metrics.LAST_DELIVERY_TIMESTAMP.labels(destination=name).set(
                state.last_success_at or 0)
        if self.model is not None:
            metrics.set_models([(self.model.info, metrics.ROLE_LIVE)]
                               + ([(self.shadow.model.info, metrics.ROLE_SHADOW)]
                                  if self.shadow is not None else []))
        metrics.set_drift_band(self.config.drift)
        metrics.WORKERS.labels(kind="threads").set(len(self.workers))
        metrics.WORKERS.labels(kind="helper_processes").set(
            sum(work.processes for work in self.helper_pools))

    @property
    def listening(self) -> bool:
        return self.scp is not None and self.scp.running

    def readiness(self) -> dict[str, Any]:
        """/readyz (pacs_ai.ops.health.readiness)."""
        return health.readiness(
            listening=self.listening, draining=self._draining,
            model=self.model.info.label if self.model is not None else None,
            spool=self.spool, min_free_bytes=self.config.storage.min_free_bytes)

    def health(self) -> dict[str, Any]:
        """/healthz (pacs_ai.ops.health.liveness)."""
        return health.liveness(listening=self.listening, draining=self._draining,
                               workers=self.workers, senders=self.senders, store=self.store,
                               config=self.config, ready=self.readiness)


def serve_until_signalled(config: Config) -> int:
    """Run the service until SIGTERM or SIGINT, then stop gracefully; exit status 0."""
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        service = Service(config).start()
        try:
            while not stop_requested.wait(1.0):
                pass  # the gauges are refreshed at each scrape
        finally:
            service.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas() -> None:
    """At most MALLOC_ARENAS glibc heaps for all threads. By default every listener thread may get
    its own heap, and freed 10 MB datasets stay spread over them: measured 30-40 MB less peak RSS
    under a 61-image burst at the same throughput (docs/benchmarks.md). No-op without glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        ctypes.CDLL(name).mallopt(_M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):  # not glibc
        pass
