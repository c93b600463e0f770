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

        run = uuid.uuid4().hex[:8]
        todo = iter(enumerate(items))
        pending: dict[Any, tuple[int, int, Any]] = {}  # future -> (index, weight, item)
        finished: dict[int, Outcome[T]] = {}
        suspects: dict[int, tuple[int, Any]] = {}  # index -> (weight, item): re-run alone
        stream = as_completed(loop=self.client.loop)
        exhausted = False

        def submit(i: int, item: Any, key: str) -> None:
            future = self.client.submit(
                fn, item, *args, key=key, retries=self.params.retries, pure=False
            )
            pending[future] = (i, weight(item), item)
            stream.add(future)

        def submit_more() -> None:
            nonlocal exhausted
            window = max(2, WINDOW_PER_THREAD * self.threads())
            while not suspects and not exhausted and len(pending) + len(finished) < window:
                nxt = next(todo, None)
                if nxt is None:
                    exhausted = True
                    return
                submit(nxt[0], nxt[1], f"{name}-{nxt[0]}-{run}")

        def record(index: int, size: int, outcome: Outcome[T]) -> None:
            finished[index] = outcome
            if progress is not None:
                bad = size if not outcome.ok else failures(outcome.value)  # type: ignore[arg-type]
                progress.update(size, bad)

        submit_more()
        following = 0
        while pending or finished or suspects:
            while following in finished:
                yield finished.pop(following)
                following += 1
                submit_more()
            if not pending:
                if suspects:  # drained: re-run the first suspect with nothing beside it
                    index = min(suspects)
                    size, item = suspects.pop(index)
                    submit(index, item, f"{name}-{index}-{run}-alone")
                    future = next(stream)
                    _, size, _ = pending.pop(future)
                    record(index, size, self._outcome(index, future))
                    future.release()
                    submit_more()
                continue
            future = next(stream)
            index, size, item = pending.pop(future)
            outcome = self._outcome(index, future)
            future.release()
            if outcome.killed and not future.key.endswith("-alone"):
                suspects[index] = (size, item)
            else:
                record(index, size, outcome)
            submit_more()

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
