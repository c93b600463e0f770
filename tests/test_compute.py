"""``alzstage.compute``: the Dask engine, on a real scheduler and workers on loopback.

The functions the tasks run are defined here: the workers import this module
(``tests/`` is on their ``PYTHONPATH``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dask_cluster import REPO, LoopbackCluster, loopback_cluster

from alzstage import compute
from alzstage.config import ComputeParams, ConfigError, parse_params
from alzstage.errors import AlzstageError


def slow_square(x: int) -> int:
    """Later items finish first: the engine must still hand them back in order."""
    time.sleep(0.05 * (x % 3))
    return x * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"item {x} is bad")
    return x


def exit_on_two(x: int) -> int:
    """A task that kills its worker process every time it runs, like a native crash."""
    if x == 2:
        os._exit(1)
    return x


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackCluster]:
    with loopback_cluster(tmp_path_factory.mktemp("dask")) as c:
        yield c


def remote(cluster: LoopbackCluster, **kw: object) -> ComputeParams:
    return ComputeParams(scheduler=cluster.address, **kw)  # type: ignore[arg-type]


def test_results_come_back_in_input_order_with_a_bounded_window(cluster: LoopbackCluster) -> None:
    # given: 30 items whose tasks finish out of order, on 2 single-threaded workers
    seen, in_flight = [], []
    with compute.engine(remote(cluster), "test", announce=lambda _: None) as eng:
        # when: the outcomes are consumed one by one
        for outcome in eng.map_ordered(slow_square, range(30), name="square"):
            seen.append(outcome.value)
            in_flight.append(
                eng.client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
            )
    # then: in order, none lost, and never more than 2 tasks per worker thread held
    assert seen == [x * x for x in range(30)]
    assert max(in_flight) <= compute.WINDOW_PER_THREAD * 2


def test_a_task_that_raises_fails_alone_with_its_reason(cluster: LoopbackCluster) -> None:
    with compute.engine(remote(cluster, retries=0), "test", announce=lambda _: None) as eng:
        outcomes = list(eng.map_ordered(fail_on_three, range(6)))
    assert [o.value for o in outcomes if o.ok] == [0, 1, 2, 4, 5]
    (bad,) = [o for o in outcomes if not o.ok]
    assert bad.index == 3 and not bad.killed
    assert bad.error == "ValueError: item 3 is bad"


def test_a_task_that_kills_its_worker_every_time_is_reported_and_the_run_completes() -> None:
    # given: a local cluster of one worker process that may die twice per task
    params = ComputeParams(workers=1, retries=1, memory_limit="1GiB")
    lines: list[str] = []
    # when: one of five tasks kills the worker each time it runs
    with compute.engine(params, "test", announce=lines.append) as eng:
        outcomes = list(eng.map_ordered(exit_on_two, range(5)))
    # then: the other four have their results; that one says what happened and what to do
    assert [o.value for o in outcomes if o.ok] == [0, 1, 3, 4]
    killed = outcomes[2]
    assert killed.killed and "killed its Dask worker 2 times" in (killed.error or "")
    assert "compute.memory_limit 1GiB" in (killed.error or "")
    assert lines and "local cluster of 1 worker" in lines[0]


def test_an_unreachable_scheduler_is_one_line_naming_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from conftest import free_port

    monkeypatch.setattr(compute, "CONNECT_TIMEOUT", "2s")
    params = ComputeParams(scheduler=f"tcp://127.0.0.1:{free_port()}")
    with pytest.raises(AlzstageError) as info, compute.engine(params, "test"):
        pass
    message = str(info.value)
    assert message.startswith("compute.scheduler: cannot reach tcp://127.0.0.1:")
    assert "dask scheduler" in message and "\n" not in message


def test_compute_params_are_checked_when_params_yaml_is_read() -> None:
    from test_config import sections

    with pytest.raises(ConfigError, match=r"compute\.scheduler: .*tcp://10\.0\.0\.5:8786"):
        parse_params(sections(compute={"scheduler": "10.0.0.5"}))
    with pytest.raises(ConfigError, match=r"compute\.memory_limit: .*4GiB"):
        parse_params(sections(compute={"memory_limit": "lots"}))
    params = parse_params(sections(compute={"scheduler": "tcp://10.0.0.5:8786", "workers": 4}))
    assert params.compute.scheduler == "tcp://10.0.0.5:8786" and params.compute.workers == 4


def test_local_workers_default_to_one_per_core() -> None:
    assert compute.local_workers(ComputeParams(workers=3)) == 3
    assert compute.local_workers(ComputeParams()) == len(os.sched_getaffinity(0))


def test_progress_line_says_done_failed_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 0.0, 60.0, 60.0])
    monkeypatch.setattr(compute.time, "monotonic", lambda: next(clock))
    progress = compute.Progress(40, "preprocess", "volume", every_s=1e9)
    progress.update(10, failed=1)
    assert progress.line() == "preprocess: 10/40 volumes done, 1 failed, 10.0/min, ETA 3 min 0 s"
    progress.close()


def test_importing_the_cli_and_compute_loads_no_dask() -> None:
    code = (
        "import sys, alzstage.cli, alzstage.compute, alzstage.data.sources.nifti; "
        "sys.exit(int(any(m.split('.')[0] in ('dask', 'distributed') for m in sys.modules)))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_the_demo_download_starts_no_cluster(tmp_path: Path) -> None:
    # given: the default source (demo), tiny
    code = (
        "import sys; from pathlib import Path; from alzstage.config import Params, Paths; "
        "from alzstage.data.download import run_download; "
        "p = Params.model_validate({'data': {'demo': {'subjects_per_class': [1, 1, 1, 1], "
        "'slices_per_subject': 2}}}); "
        f"run_download(p, Paths(Path({str(tmp_path)!r}))); "
        "sys.exit(int('distributed' in sys.modules))"
    )
    # when / then: it runs without importing Dask at all
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "data" / "raw" / "manifest.csv").is_file()
