"""The one door to Dask: where per-volume preprocessing and batch prediction run.

The same code runs on a laptop and on a cluster; only ``compute`` in params.yaml changes:

* ``compute.scheduler: null`` (default): the stage starts a :class:`distributed.LocalCluster`
  and closes it when done: one single-threaded worker *process* per core (``workers``),
  each with ``memory_limit``. Processes, not threads: SimpleITK, nibabel and the numpy
  steps of preprocessing hold the GIL for long stretches, and a worker that crashes or
  runs out of memory takes only its own task down (Dask restarts it).
* ``compute.scheduler: tcp://host:8786``: an existing scheduler (e.g. ``dask-jobqueue``'s
  SLURMCluster, docs/scale.md); its workers must see the project and the data at the
  same paths and import ``alzstage``.

A task whose worker dies is rerun on another (``retries``; for a local cluster also
Dask's ``distributed.scheduler.allowed-failures``); a task that kills workers that often
comes back as an :class:`Outcome` with ``killed`` set, so the caller can quarantine that
one input and go on. Results come back in input order, with at most ``window`` tasks
submitted and not yet handed back, so the client's memory does not grow with the input.

Dask is imported only inside these functions, so ``alzstage --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from alzstage.errors import AlzstageError

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

    from alzstage.config import ComputeParams

T = TypeVar("T")
# Dask's own loggers: chatty at INFO (every worker start, every closed comm at shutdown).
DASK_LOGGERS = ("distributed", "dask", "tornado", "bokeh")
# Tasks per worker thread in flight: one running, one queued so no worker waits on the
# client between tasks. More only holds more results in the client.
WINDOW_PER_THREAD = 2
CONNECT_TIMEOUT = "30s"  # to reach compute.scheduler (Dask retries until then)


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """One task's result (``value``), or why there is none (``error``), at its input index."""

    index: int
    value: T | None = None
    error: str | None = None  # one line: the exception, or the worker deaths
    killed: bool = False  # it killed workers ``retries`` + 1 times (Dask's KilledWorker)

    @property
    def ok(self) -> bool:
        return self.error is None


def quiet_dask_logs(level: int = logging.WARNING) -> None:
    """Dask logs every worker start and every closed connection at INFO: keep warnings."""
    for name in DASK_LOGGERS:
        logging.getLogger(name).setLevel(level)


def worker_env(threads: int) -> dict[str, str]:
    """Environment of each local worker process: its share of the cores, no telemetry.

    Dask already pins OpenMP/MKL/OpenBLAS to one thread; ITK and TensorFlow read their
    own variables. Without them, two workers on two cores run four ITK threads each and
    slow each other down.
    """
    n = str(max(1, threads))
    return {
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": n,
        "TF_NUM_INTRAOP_THREADS": n,
        "TF_NUM_INTEROP_THREADS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "DO_NOT_TRACK": "1",
        "GX_ANALYTICS_ENABLED": "False",
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # one bar per worker per model load
    }


def local_workers(params: ComputeParams) -> int:
    """``compute.workers``, or one per core (the cores this process may use)."""
    if params.workers is not None:
        return params.workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _dashboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


class Engine:
    """A connected Dask client (and the local cluster it owns, if any). Use :func:`engine`."""

    def __init__(self, client: Client, params: ComputeParams, where: str) -> None:
        self.client = client
        self.params = params
        self.where = where  # "local cluster of 2 workers" / "scheduler tcp://..."
        self._threads = (0, 0.0)  # (count, when read)

    def threads(self) -> int:
        """Worker threads now connected (read at most every 2 s: workers can join late)."""
        count, when = self._threads
        if time.monotonic() - when > 2.0:
            count = sum(self.client.nthreads().values())
            self._threads = (count, time.monotonic())
        return count

    def map_ordered(
        self,
        fn: Callable[..., T],
        items: Iterable[Any],
        *args: Any,
        name: str = "task",
        progress: Progress | None = None,
        weight: Callable[[Any], int] = lambda _: 1,
        failures: Callable[[T], int] = lambda _: 0,
    ) -> Iterator[Outcome[T]]:
        """``fn(item, *args)`` for every item on the cluster; outcomes in input order.

        At most ``WINDOW_PER_THREAD`` tasks per worker thread (at least 2) are submitted
        and not yet yielded, so a slow first item holds back only that many results.
        ``weight`` (e.g. images in a chunk) and ``failures`` (bad inputs in a result)
        feed ``progress``.

        A worker death counts against every task queued on that worker, so an innocent
        neighbour of a task that kills its worker can be declared killed too (seen: one
        worker, window 2). A task declared killed is therefore re-run *alone*, once the
        tasks in flight have drained; only a task that kills its worker when nothing
        else runs is reported as killed.
        """
        from distributed import as_completed

        window = _Window(
            self, fn, args, name, progress, weight, failures, as_completed(loop=self.client.loop)
        )
        todo = iter(enumerate(items))
        window.fill(todo)
        following = 0
        while window.pending or window.finished or window.suspects:
            while following in window.finished:
                yield window.finished.pop(following)
                following += 1
                window.fill(todo)
            if not window.pending:
                if window.suspects:  # drained: re-run the first suspect with nothing beside it
                    window.rerun_first_suspect()
                    window.fill(todo)
                continue
            window.collect_next()
            window.fill(todo)

    def _outcome(self, index: int, future: Any) -> Outcome[T]:
        from concurrent.futures import CancelledError

        from distributed import KilledWorker

        try:
            return Outcome(index, value=future.result())
        except CancelledError:  # not the task: the scheduler dropped it (lost, restarted)
            raise AlzstageError(
                f"{self.where}: the cluster cancelled the run (scheduler lost or restarted?); "
                "run it again (a download reuses the volumes it finished)"
            ) from None
        except KilledWorker:
            if self.params.scheduler:  # the scheduler's own allowed-failures decided
                times = "repeatedly (the scheduler's distributed.scheduler.allowed-failures)"
                limit = "the workers' memory limit"
            else:
                times = f"{self.params.retries + 1} times"
                limit = f"compute.memory_limit {self.params.memory_limit}"
            return Outcome(
                index,
                error=f"the task killed its Dask worker {times} (out of memory past {limit}, "
                "or a crash in a native library); give the workers more memory, or check the "
                "input",
                killed=True,
            )
        except Exception as exc:  # the task's own exception, after compute.retries reruns
            text = str(exc).strip().splitlines()
            return Outcome(index, error=f"{type(exc).__name__}: {text[0] if text else ''}")


@contextlib.contextmanager
def engine(
    params: ComputeParams, purpose: str, announce: Callable[[str], None] | None = None
) -> Iterator[Engine]:
    """Connect to ``compute.scheduler``, or start a LocalCluster; close it all afterwards.

    ``announce`` (default: stderr) gets one line saying where the work runs and the
    dashboard link when there is one (the dashboard needs ``bokeh``).
    """
    import dask
    from distributed import Client, LocalCluster

    say = announce or (lambda s: print(s, file=sys.stderr, flush=True))
    quiet_dask_logs()
    settings = {
        "distributed.scheduler.allowed-failures": params.retries,
        "distributed.admin.system-monitor.gil.enabled": False,  # a sampling thread per worker
    }
    with dask.config.set(settings), contextlib.ExitStack() as stack:
        if params.scheduler:
            try:
                client = stack.enter_context(
                    Client(params.scheduler, timeout=CONNECT_TIMEOUT, set_as_default=False)
                )
            except (OSError, TimeoutError) as exc:
                raise AlzstageError(
                    f"compute.scheduler: cannot reach {params.scheduler} ({exc}); start the "
                    "scheduler (`dask scheduler`) and its workers, or set compute.scheduler: "
                    "null for a local cluster"
                ) from None
            where = f"scheduler {params.scheduler}"
        else:
            n = local_workers(params)
            cores = os.cpu_count() or 1
            try:
                cluster = stack.enter_context(
                    LocalCluster(
                        n_workers=n,
                        threads_per_worker=1,
                        processes=True,
                        memory_limit=params.memory_limit,
                        host="127.0.0.1",
                        dashboard_address=":0",  # a free port: never clash with 8787
                        silence_logs=logging.WARNING,
                        env=worker_env(cores // n),
                    )
                )
            except (OSError, ValueError, TimeoutError) as exc:
                raise AlzstageError(
                    f"compute: the local Dask cluster did not start ({exc}); check "
                    "compute.workers and compute.memory_limit"
                ) from None
            # Closing: a worker that holds TensorFlow takes over the nanny's 4 s to exit and
            # is then killed, as intended; that is no warning for the person running a stage.
            stack.callback(logging.getLogger("distributed.nanny").setLevel, logging.ERROR)
            client = stack.enter_context(Client(cluster, set_as_default=False))
            where = f"local cluster of {n} worker process(es), {params.memory_limit} each"
        link = client.dashboard_link if _dashboard_available() or params.scheduler else None
        say(f"{purpose}: on {where}" + (f"; dashboard {link}" if link else ""))
        yield Engine(client, params, where)


class _Window(Generic[T]):
    """The bookkeeping of one :meth:`Engine.map_ordered`: what is submitted, finished, or
    suspected of killing its worker, and the bound on how much is in flight."""

    def __init__(
        self,
        engine: Engine,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        name: str,
        progress: Progress | None,
        weight: Callable[[Any], int],
        failures: Callable[[T], int],
        stream: Any,
    ) -> None:
        self.engine, self.fn, self.args, self.name = engine, fn, args, name
        self.progress, self.weight, self.failures, self.stream = progress, weight, failures, stream
        self.run = uuid.uuid4().hex[:8]
        self.pending: dict[Any, tuple[int, int, Any]] = {}  # future -> (index, weight, item)
        self.finished: dict[int, Outcome[T]] = {}
        self.suspects: dict[int, tuple[int, Any]] = {}  # index -> (weight, item): re-run alone
        self.exhausted = False

    def submit(self, i: int, item: Any, key: str) -> None:
        future = self.engine.client.submit(
            self.fn, item, *self.args, key=key, retries=self.engine.params.retries, pure=False
        )
        self.pending[future] = (i, self.weight(item), item)
        self.stream.add(future)

    def fill(self, todo: Iterator[tuple[int, Any]]) -> None:
        """Submit from ``todo`` until the window is full (never while a suspect waits)."""
        window = max(2, WINDOW_PER_THREAD * self.engine.threads())
        while (
            not self.suspects
            and not self.exhausted
            and len(self.pending) + len(self.finished) < window
        ):
            nxt = next(todo, None)
            if nxt is None:
                self.exhausted = True
                return
            self.submit(nxt[0], nxt[1], f"{self.name}-{nxt[0]}-{self.run}")

    def record(self, index: int, size: int, outcome: Outcome[T]) -> None:
        self.finished[index] = outcome
        if self.progress is not None:
            bad = size if not outcome.ok else self.failures(outcome.value)  # type: ignore[arg-type]
            self.progress.update(size, bad)

    def collect_next(self) -> None:
        """The next finished task; one that seems to have killed its worker becomes a suspect."""
        future = next(self.stream)
        index, size, item = self.pending.pop(future)
        outcome = self.engine._outcome(index, future)
        future.release()
        if outcome.killed and not future.key.endswith("-alone"):
            self.suspects[index] = (size, item)
        else:
            self.record(index, size, outcome)

    def rerun_first_suspect(self) -> None:
        """Run the first suspect with nothing beside it: its outcome is now its own."""
        index = min(self.suspects)
        size, item = self.suspects.pop(index)
        self.submit(index, item, f"{self.name}-{index}-{self.run}-alone")
        future = next(self.stream)
        _, size, _ = self.pending.pop(future)
        self.record(index, size, self.engine._outcome(index, future))
        future.release()


class Progress:
    """Done, failed and the ETA: a tqdm bar on a terminal, a line every ``every_s`` in logs.

    DVC and batch jobs write to files, where tqdm stays silent (``disable=None``); they
    get plain lines instead, so the stage log shows how far a long run is.
    """

    def __init__(self, total: int, desc: str, unit: str, every_s: float = 30.0) -> None:
        from tqdm import tqdm

        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done = self.failed = 0
        self.start = self.last = time.monotonic()
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=None, file=sys.stderr)

    def update(self, n: int = 1, failed: int = 0) -> None:
        self.done += n
        self.failed += failed
        self.bar.update(n)
        if failed:
            self.bar.set_postfix(failed=self.failed, refresh=False)
        now = time.monotonic()
        if self.bar.disable and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        """``preprocess: 12/40 volumes done, 1 failed, 5.2/min, ETA 5 min 23 s``."""
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = "-" if left != left else _duration(left)  # NaN before the first result
        when = f"ETA {eta}" if self.done < self.total else f"took {_duration(elapsed)}"
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit}s done, {self.failed} failed, "
            f"{rate * 60:.1f}/min, {when}"
        )

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"
