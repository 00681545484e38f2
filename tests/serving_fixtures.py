"""What the service tests share: a throwaway PostgreSQL cluster, a tiny served model, waiting for jobs."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from .browser import free_port

POSTGRES_BIN = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)), None)
RUNUSER = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")  # a root-only tool
REQUIRE_POSTGRES = os.environ.get("MEDSYN_REQUIRE_POSTGRES") == "1"
"""Set by CI, which installs Debian's postgresql: a missing server is then a failure, not a skip."""


class PostgresCluster:
    """``initdb`` + ``pg_ctl`` in a temporary folder, on a loopback port, trusting local connections; run as the
    ``postgres`` user when the tests run as root (PostgreSQL refuses root)."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="medsyn-pg-"))
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run("initdb", "-D", str(self.folder / "data"), "-A", "trust", "-U", "postgres", "--no-sync")
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-l", str(self.folder / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def _run(self, program: str, *args: str) -> None:
        command = [f"{POSTGRES_BIN}/{program}", *args]
        if self.as_root:
            command = [RUNUSER, "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def new_database(self) -> str:
        """A fresh, empty database's URL."""
        import psycopg

        name = f"medsyn_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster():
    if POSTGRES_BIN is None:
        if REQUIRE_POSTGRES:
            pytest.fail("MEDSYN_REQUIRE_POSTGRES=1 but no PostgreSQL server is installed (/usr/lib/postgresql)")
        pytest.skip("needs Debian's postgresql package (CI installs it)")
    cluster = PostgresCluster()
    yield cluster
    cluster.stop()


def wait_for_job(client, job_id: str, statuses=("done", "failed", "cancelled"), timeout: float = 60,
                 headers: dict | None = None, until=None) -> dict:
    """Poll GET /api/v1/jobs/{id} until its status is one of ``statuses`` (or ``until(job)`` holds)."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}", headers=headers or {}).json()
        if (until(job) if until else job["status"] in statuses):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s: {job}")
        time.sleep(0.05)
