"""The listener alone, in the test's own process: a StorageSCP on a free port with its own spool
and queue (no model, no workers), optionally with an audit trail."""

from __future__ import annotations

from pathlib import Path

from pacs_ai.config import parse_config
from pacs_ai.ops.audit import AuditTrail
from pacs_ai.queue.jobs import JobStore
from pacs_ai.queue.spool import Spool
from pacs_ai.receive.scp import StorageSCP
from testbed.dicom_peers import (LOCALHOST, SimulatedModality, free_port,
                                 take_any_caller_unless_named)


class Listener:
    def __init__(self, folder: Path, *, audited: bool = False, **tables):
        settings = {"listener": {"host": LOCALHOST, "port": free_port()},
                    "storage": {"spool_dir": str(folder / "spool"), "min_free_bytes": 0},
                    "limits": {"shutdown_grace_seconds": 2}}
        for table, values in tables.items():
            settings.setdefault(table, {}).update(values)
        take_any_caller_unless_named(settings["listener"])
        self.config = parse_config(settings, base_dir=folder)
        self.audit_path = self.config.audit.file(self.config.storage.spool_dir)
        self.trail = AuditTrail(self.audit_path).start() if audited else None
        self.spool = Spool(self.config.storage.spool_dir)
        self.spool.prepare()
        self.store = JobStore.open(self.spool.db_path)
        self.scp = StorageSCP(self.config, self.spool, self.store, self.trail)
        self.scp.start()
        self.port = self.scp.port

    def modality(self, **kwargs) -> SimulatedModality:
        return SimulatedModality(self.port, **kwargs)

    def close(self) -> None:
        self.scp.stop(2)
        self.store.close()
        if self.trail is not None:
            self.trail.close()
