"""The classification worker over a real queue and spool, decoding in-thread (processes = 0):
it works through a backlog with the next batch claimed ahead, and gives that batch back when
it stops."""

from __future__ import annotations

import dataclasses
import io
import threading
from collections.abc import Callable

import pytest
from pydicom.dataset import Dataset

from pacs_ai.classify.helper_processes import HelperPool
from pacs_ai.classify.worker import ClassificationWorker
from pacs_ai.config import WorkersConfig, default_config
from pacs_ai.model.model import PneumoniaModel
from pacs_ai.queue.job_records import NewInstance
from pacs_ai.queue.jobs import JobStore
from pacs_ai.queue.spool import Spool
from testbed.dicom_peers import synthetic_radiograph, wait_until
from testbed.job_queue import all_jobs


@pytest.fixture(scope="module")
def loaded_tiny_model(tiny_model) -> PneumoniaModel:
    return PneumoniaModel.load(tiny_model)


def received_backlog(folder, count: int, *, first_seed: int = 700, rows: int = 128,
                     columns: int = 96,
                     adjust: Callable[[int, Dataset], None] | None = None
                     ) -> tuple[Spool, JobStore]:
    """A spool and queue in `folder` holding `count` received synthetic films, none classified.
    `adjust(index, dataset)`: changes film `index`'s header before it is stored."""
    spool = Spool(folder / "spool")
    spool.prepare()
    store = JobStore.open(spool.db_path)
    for index, seed in enumerate(range(first_seed, first_seed + count)):
        dataset = synthetic_radiograph(seed=seed, rows=rows, columns=columns)
        if adjust is not None:
            adjust(index, dataset)
        encoded = io.BytesIO()
        dataset.save_as(encoded, enforce_file_format=True)
        uid = str(dataset.SOPInstanceUID)

        def place(uid=uid, data=encoded.getvalue()) -> str:
            target = spool.image_path(uid)
            spool.write_durably(target, data)
            return spool.relative(target)

        store.admit(NewInstance(sop_instance_uid=uid, sop_class_uid=str(dataset.SOPClassUID),
                                study_instance_uid=str(dataset.StudyInstanceUID),
                                calling_ae_title="XRAY"), place)
    return spool, store


@pytest.fixture
def backlog(tmp_path):
    """A spool and queue holding five received films, nothing classified yet."""
    spool, store = received_backlog(tmp_path, 5)
    yield spool, store
    store.close()


def worker_for(spool: Spool, store: JobStore, model: PneumoniaModel,
               stop: threading.Event) -> ClassificationWorker:
    config = dataclasses.replace(default_config(spool.root.parent),
                                 workers=WorkersConfig(processes=0, batch_size=2))
    return ClassificationWorker("worker-test", config, spool, store, model, stop,
                                threading.Event(), lambda job: None, HelperPool(0))


def test_a_backlog_is_classified_in_batches_claimed_ahead(backlog, loaded_tiny_model):
    spool, store = backlog
    stop = threading.Event()
    worker = worker_for(spool, store, loaded_tiny_model, stop)
    worker.start()
    try:
        assert wait_until(lambda: store.job_counts()["done"] == 5, 60), store.job_counts()
    finally:
        stop.set()
        worker.join(timeout=10)
    assert not worker.is_alive()
    counts = store.job_counts()
    assert counts["classifying"] == 0 and counts["pending"] == 0
    assert len(list(spool.outbox.iterdir())) == 5
    # each image's own decode + model time, measured where it ran
    assert all(job.classify_ms and job.classify_ms > 0 for job in all_jobs(store))


def test_a_batch_claimed_ahead_goes_back_to_pending_when_the_worker_stops(backlog,
                                                                          loaded_tiny_model):
    spool, store = backlog
    worker = worker_for(spool, store, loaded_tiny_model, threading.Event())
    worker._claim_next_batch()
    assert store.job_counts()["classifying"] == 2
    worker._give_back_next_batch()
    assert store.job_counts()["classifying"] == 0
    assert store.job_counts()["pending"] == 5
