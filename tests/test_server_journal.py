"""No job vanishes (issue 12 part 4): the jobs journal in the output root, a real server
process killed with SIGKILL in each phase of its jobs, then restarted on the same root."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from server.jobs import JobManager
from server.journal import JOURNAL_FILE, JobJournal
from tools.fake_engine import FakeEngine
from tools.testing import ServerProcess

pytestmark = pytest.mark.slow

INTERRUPTED = "interrupted: the server stopped while this job was {}"


def kill_9(server: ServerProcess) -> None:
    server.proc.kill()
    server.proc.wait()
    server.stop()


def jobs_by_id(server: ServerProcess) -> dict[str, dict]:
    return {j["id"]: j for j in server.client.get("/v1/jobs").json()["jobs"]}


def test_kill_9_with_jobs_in_every_phase_then_restart(tmp_path):
    root = tmp_path / "stacks"
    s = ServerProcess(root, fake_step_seconds=0.2)
    try:
        finished = s.wait(s.submit(steps=1, name="Kept")["id"])
        cancelled = s.submit(steps=50)
        s.client.delete(f"/v1/jobs/{cancelled['id']}")
        assert s.wait(cancelled["id"])["status"] == "cancelled"
        running = s.submit(steps=50)
        queued = s.submit(steps=50, prompt="waits its turn")
        s.wait_for_step(running["id"], 1)
        assert s.job(queued["id"])["status"] == "queued"
    finally:
        kill_9(s)
    known = {finished["id"], cancelled["id"], running["id"], queued["id"]}
    for restart in range(2):  # a second restart finds the same: interrupted once, then failed
        s = ServerProcess(root, fake_step_seconds=0.2)
        try:
            jobs = jobs_by_id(s)
            assert set(jobs) == known, restart
            assert jobs[finished["id"]]["status"] == "succeeded"
            assert jobs[finished["id"]]["stack"]["name"] == "Kept"
            assert jobs[cancelled["id"]]["status"] == "cancelled"
            for job, phase in ((running, "running"), (queued, "queued")):
                again = s.job(job["id"])
                assert again["status"] == "failed" and again["error"] == INTERRUPTED.format(phase), again
                assert again["request"]["prompt"] == job["request"]["prompt"]
                assert again["finished"] is not None and again["created"] == job["created"]
                r = s.client.post(f"/v1/jobs/{job['id']}/regenerate", json={"layer_index": 0, "seed": 1})
                assert r.status_code == 409
            assert s.client.get("/v1/health").json()["queue_length"] == 0  # nothing ran again
            newer = s.wait(s.submit(steps=1)["id"])
            assert newer["status"] == "succeeded" and newer["id"] not in jobs
            known.add(newer["id"])
        finally:
            if restart == 0:
                kill_9(s)
            else:
                s.stop()


def test_kill_9_right_after_the_answer_keeps_the_job(tmp_path):
    """The 202 goes out only once the job is in the journal on disk."""
    root = tmp_path / "stacks"
    s = ServerProcess(root, fake_step_seconds=1.0)
    try:
        blocker = s.submit(steps=20)
        accepted = s.submit(steps=20)
    finally:
        kill_9(s)
    s = ServerProcess(root, fake_step_seconds=0.0)
    try:
        jobs = jobs_by_id(s)
        assert jobs[accepted["id"]]["status"] == "failed"
        assert jobs[accepted["id"]]["error"] == INTERRUPTED.format("queued")
        assert jobs[blocker["id"]]["error"] in (INTERRUPTED.format("queued"), INTERRUPTED.format("running"))
    finally:
        s.stop()


def test_sigterm_records_what_the_shutdown_cancelled(tmp_path):
    root = tmp_path / "stacks"
    s = ServerProcess(root, fake_step_seconds=0.2)
    try:
        running = s.submit(steps=50)
        queued = s.submit(steps=50)
        s.wait_for_step(running["id"], 1)
    finally:
        s.stop()  # SIGTERM: a clean stop
    s = ServerProcess(root, fake_step_seconds=0.0)
    try:
        for job in (running, queued):
            again = s.job(job["id"])
            assert again["status"] == "cancelled" and "shutting down" in again["error"], again
    finally:
        s.stop()


def test_journal_is_valid_json_after_every_change_and_a_broken_one_is_ignored(tmp_path, caplog):
    manager = JobManager(FakeEngine(), tmp_path)
    manager.start()
    from server.schemas import JobCreate

    job = manager.submit(JobCreate(prompt="a", model="tiny", width=256, height=256, steps=1, tta_passes=1))
    deadline = time.monotonic() + 10
    while manager.get(job.id).status != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.01)
    manager.close()
    journal = json.loads((tmp_path / JOURNAL_FILE).read_text())
    assert journal["version"] == 1 and journal["jobs"] == []  # a finished stack is its own record
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []

    (tmp_path / JOURNAL_FILE).write_text('{"version": 1, "jobs": [')  # torn by hand
    assert JobJournal(tmp_path).load() == []
    assert "unreadable jobs journal" in caplog.text
    again = JobManager(FakeEngine(), tmp_path)
    again.start()
    try:
        assert [j.id for j in again.list()] == [job.id]
    finally:
        again.close()
