"""A real Dask cluster on loopback for tests: one ``dask scheduler`` and ``dask worker``
processes, started with subprocess on random free ports, as a cluster job would start them.

Each worker runs in its own session, so a test can kill one (nanny and worker process
together, SIGKILL: what a node failure looks like) and start it again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]


def worker_environment() -> dict[str, str]:
    """This environment, plus what a cluster job script sets: the code on the path, one
    thread per library, no telemetry."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "src"), str(REPO / "tests"), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    for var in (
        "OMP_NUM_THREADS",
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
        "TF_NUM_INTRAOP_THREADS",
    ):
        env[var] = "1"
    env.update(DO_NOT_TRACK="1", GX_ANALYTICS_ENABLED="False", MLFLOW_ENABLE_TELEMETRY="false")
    return env


class LoopbackCluster:
    """``dask scheduler`` + named ``dask worker`` processes on 127.0.0.1."""

    def __init__(self, workdir: Path, memory_limit: str = "2GiB") -> None:
        self.workdir = Path(workdir)
        self.memory_limit = memory_limit
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.env = worker_environment()
        self.workers: dict[str, subprocess.Popen] = {}
        self.scheduler = self._spawn(
            "scheduler",
            ["scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"],
        )

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (lives with the process)
        return subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
            start_new_session=True,
        )

    def start_worker(self, name: str) -> None:
        self.workers[name] = self._spawn(
            name,
            [
                "worker",
                self.address,
                "--nthreads",
                "1",
                "--nworkers",
                "1",
                "--memory-limit",
                self.memory_limit,
                "--name",
                name,
                "--host",
                "127.0.0.1",
                "--no-dashboard",
            ],
        )

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker's whole process group (nanny and worker): a lost node."""
        proc = self.workers.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def n_workers(self) -> int:
        from distributed import Client

        with Client(self.address, timeout="20s", set_as_default=False) as client:
            return len(client.nthreads())

    def wait_for_workers(self, n: int, timeout: float = 180.0) -> None:
        """Until the scheduler counts exactly ``n`` workers (a killed one drops out)."""
        deadline = time.monotonic() + timeout
        while True:
            for proc in [self.scheduler, *self.workers.values()]:
                if proc.poll() is not None:
                    raise RuntimeError(f"a dask process died; logs in {self.workdir}")
            with contextlib.suppress(OSError, TimeoutError):
                if self.n_workers() == n:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} dask workers did not connect; logs in {self.workdir}")
            time.sleep(0.5)

    def close(self) -> None:
        for proc in [*self.workers.values(), self.scheduler]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*self.workers.values(), self.scheduler]:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)


@contextlib.contextmanager
def loopback_cluster(workdir: Path, n_workers: int = 2) -> Iterator[LoopbackCluster]:
    """A scheduler and ``n_workers`` single-threaded workers, torn down afterwards."""
    cluster = LoopbackCluster(workdir)
    try:
        for i in range(n_workers):
            cluster.start_worker(f"w{i}")
        cluster.wait_for_workers(n_workers)
        yield cluster
    finally:
        cluster.close()
