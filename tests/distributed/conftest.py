"""A real distributed deployment on this machine: a uvicorn API process and Celery worker
processes (``MONOQUANT_QUEUE=celery``), Redis at 127.0.0.1:6379, PostgreSQL at 127.0.0.1:5432
(db ``test``), one data directory shared by all of them.

Each run is isolated: its own PostgreSQL schema (``search_path`` in the URL) and an empty Redis
database, both removed at the end. Skips when Redis or PostgreSQL cannot be reached.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.jobs.celery_queue import WORKER_COMMAND

REPO = Path(__file__).resolve().parents[2]
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
# Short enough that the broker's redelivery (visibility timeout = 45 s here) happens within the
# test; long enough for the slowest job on a busy 2-core machine.
JOB_TIMEOUT_S = 30


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """The processes of one deployment, started with the same commands as docker-compose.yml."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.api: subprocess.Popen | None = None
        self.api_url = ""
        self.workers: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop_all()
        self._logs.append(log)
        return subprocess.Popen(command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_api(self, name: str = "api") -> None:
        port = _free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory"]
        self.api = self._spawn(name, [*command, "--host", "127.0.0.1", "--port", str(port)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError(f"the API exited:\n{self.log(name)[-3000:]}")
            try:
                if httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the API did not become ready:\n{self.log(name)[-3000:]}")

    def kill_api(self) -> None:
        assert self.api is not None
        self.api.send_signal(signal.SIGKILL)
        self.api.wait(10)

    def start_workers(self, *names: str) -> None:
        for name in names:
            # `celery` as `python -m celery`: the same command, this venv's interpreter
            command = [sys.executable, "-m", *WORKER_COMMAND, "--hostname", f"{name}@%h"]
            self.workers[name] = self._spawn(name, command)
        deadline = time.monotonic() + 90
        for name in names:
            while " ready." not in self.log(name):
                if self.workers[name].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker {name} did not start:\n{self.log(name)[-3000:]}")
                time.sleep(0.2)

    def worker_by_pid(self, pid: int) -> str:
        return next(name for name, process in self.workers.items() if process.pid == pid)

    def stop_all(self) -> None:
        processes = [process for process in [self.api, *self.workers.values()] if process is not None]
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        for log in self._logs:
            log.close()


def _pick_redis_db():
    """An empty Redis database (1..15), so concurrent or earlier runs cannot interfere."""
    import redis

    for db in random.sample(range(1, 16), 15):
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
        if client.dbsize() == 0:
            client.set("monoquant-test:owner", str(os.getpid()), nx=True)
            if client.get("monoquant-test:owner") == str(os.getpid()).encode():
                return db, client
    pytest.skip("no empty Redis database (1..15) to run the distributed tests in")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """An API and two workers (``w1``, ``w2``) sharing one data dir, Redis DB and PG schema."""
    if not _reachable(REDIS_HOST, REDIS_PORT) or not _reachable("127.0.0.1", 5432):
        pytest.skip("Redis (127.0.0.1:6379) or PostgreSQL (127.0.0.1:5432) is not reachable")
    import psycopg

    try:
        admin = psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL db 'test' is not usable: {exc}")
    schema = f"mq_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE SCHEMA "{schema}"')
    db, redis_client = _pick_redis_db()
    root = tmp_path_factory.mktemp("distributed")
    (root / "logs").mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("MONOQUANT_")}
    env.update(
        {
            "MONOQUANT_QUEUE": "celery",
            "MONOQUANT_BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}",
            "MONOQUANT_DATABASE_URL": f"{PG_URL}?options=-csearch_path%3D{schema}",
            "MONOQUANT_DATA_DIR": str(root / "data"),
            "MONOQUANT_JOB_TIMEOUT_S": str(JOB_TIMEOUT_S),
            "MONOQUANT_LOG_LEVEL": "INFO",
            "MONOQUANT_TRUSTED_INPUTS": "true",  # the slow test job is a pickled test model
            "PYTHONUNBUFFERED": "1",
        }
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    running = Cluster(env, root / "logs")
    running.redis = redis_client  # type: ignore[attr-defined]
    running.data_dir = root / "data"  # type: ignore[attr-defined]
    try:
        running.start_api()  # first: it creates the tables (docker-compose: workers wait for it)
        running.start_workers("w1", "w2")
        yield running
    finally:
        running.stop_all()
        redis_client.flushdb()
        admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()
