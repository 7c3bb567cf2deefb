"""The jobs journal: a record of every job the server accepted, so that none vanishes.

Finished stacks are their own record (their folders, `JobManager.restore`); everything else
a client may ask about again (queued, running, failed, cancelled jobs, downloads) lives in
`<output root>/.multiplane-jobs.json`, rewritten whole and atomically (temp file, fsync,
rename) after every change of a job's status. A writer thread does the writing, so a
status change costs the job service a list of small dicts, not a disk write; `flush()` waits
for it (a submit answers only once its job is on disk).

After a kill (-9, power loss) the journal may say "queued" or "running" for jobs no process
runs any more: `interrupted()` turns them into failed jobs saying so. Queued jobs are not
run again: the artist may have moved on, a restart should not start minutes of GPU work
nobody asked for now, and the add-on resubmits with one click.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Optional

from inference.stack.files import fsync_dir, write_bytes

log = logging.getLogger("multiplane.server")

JOURNAL_FILE = ".multiplane-jobs.json"
JOURNAL_VERSION = 1
FLUSH_TIMEOUT_SECONDS = 5.0


def interrupted(record: dict) -> dict:
    """A record left "queued" or "running" by a process that died, as the failed job it is."""
    if record.get("status") not in ("queued", "running"):
        return record
    return {**record, "status": "failed", "finished": record.get("started") or record.get("created"),
            "error": f"interrupted: the server stopped while this job was {record['status']}"}


class JobJournal:
    """The journal file of one output root and the thread that writes it."""

    def __init__(self, output_root: Path):
        self.path = Path(output_root) / JOURNAL_FILE
        self._cond = threading.Condition()
        self._pending: Optional[list[dict]] = None
        self._recorded = 0  # sequence numbers: recorded and written
        self._written = 0
        self._closing = False
        self._thread = threading.Thread(target=self._write_loop, name="multiplane-journal", daemon=True)
        self._thread.start()

    def load(self) -> list[dict]:
        """The records of the last run (empty when there is no journal or it is unreadable)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            records = data["jobs"] if data.get("version") == JOURNAL_VERSION else []
            return [r for r in records if isinstance(r, dict) and isinstance(r.get("id"), str)]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring the unreadable jobs journal %s: %s", self.path, exc)
            return []

    def record(self, records: list[dict]) -> None:
        """The jobs as they are now; written soon (the latest state wins). Never blocks."""
        with self._cond:
            self._pending = records
            self._recorded += 1
            self._cond.notify_all()

    def flush(self, timeout: float = FLUSH_TIMEOUT_SECONDS) -> bool:
        """Wait until everything recorded so far is on disk; False on timeout."""
        with self._cond:
            target = self._recorded
            return self._cond.wait_for(lambda: self._written >= target or not self._thread.is_alive(),
                                       timeout)

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(FLUSH_TIMEOUT_SECONDS)

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closing)
                if self._pending is None:
                    return
                records, self._pending, seq = self._pending, None, self._recorded
            self._write(records)
            with self._cond:
                self._written = seq
                self._cond.notify_all()

    def _write(self, records: list[dict]) -> None:
        try:
            data = json.dumps({"version": JOURNAL_VERSION, "jobs": records}, ensure_ascii=True).encode()
        except (TypeError, ValueError) as exc:  # never expected: requests are validated JSON
            log.error("cannot encode the jobs journal: %s", exc)
            return
        temp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        try:
            write_bytes(temp, data)
            os.replace(temp, self.path)
            fsync_dir(self.path.parent)
        except OSError as exc:  # a full disk must not stop the jobs; say so
            log.error("cannot write the jobs journal %s: %s", self.path, exc)
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
