"""The ``nifti`` source on Dask: a real scheduler and workers, lost workers, a killed stage.

A small cohort of 4 mm MNI152 copies (tests/neuro_volumes.py), a damaged file and a
hostile volume whose header declares 640^3 voxels, preprocessed through
``compute.scheduler: tcp://127.0.0.1:<port>`` (tests/dask_cluster.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dask_cluster import LoopbackCluster, loopback_cluster, worker_environment
from neuro_volumes import corrupt_gzip, header_bomb, moved_affine, save_nifti, synthetic_volume
from PIL import Image

from alzstage.artifacts import read_raw_manifest, read_volumes
from alzstage.compute import Outcome
from alzstage.config import Params, Paths
from alzstage.data.download import run_download
from alzstage.data.sources.nifti import WORKER_KILLED, _volume_of
from alzstage.data.validate import run_validate

CLASSES = ["CN", "AD"]
SIZE = (64, 56)
N_SLICES = 4
N_GOOD = 8
CACHED_FAILURES = 1  # cut.nii.gz: a damaged file is cached as such; the bomb is not cached


def make_params(folder: Path, **compute: object) -> Params:
    return Params.model_validate(
        {
            "base": {"image_size": list(SIZE), "classes": CLASSES},
            "data": {
                "source": "nifti",
                "path": str(folder),
                "demo": {"subjects_per_class": [1, 1]},
            },
            "validate": {"nifti": {"voxel_size_mm": [0.5, 4.5]}, "on_failure": "quarantine"},
            "neuro": {"preprocess": {"registration_resolution": 3, "n_slices": N_SLICES}},
            "compute": compute,
        }
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """N_GOOD brains (moved, rescaled in intensity), a cut gzip and a 640^3 header bomb."""
    folder = tmp_path_factory.mktemp("cohort")
    rows = []
    for i in range(N_GOOD):
        rng = np.random.default_rng(i)
        truth = moved_affine(tuple(rng.normal(0, 4, 3)), tuple(rng.normal(0, 4, 3)))
        data, affine = synthetic_volume(truth, gain=600 + 40 * i, atrophy=0.1 * (i % 2))
        save_nifti(folder / f"sub-{i:02d}.nii.gz", data, affine)
        rows.append((f"sub-{i:02d}", f"sub-{i:02d}.nii.gz", CLASSES[i % 2]))
    corrupt_gzip(folder / "cut.nii.gz", folder / "sub-00.nii.gz")
    header_bomb(folder / "bomb.nii.gz", (640, 640, 640))
    rows += [("sub-cut", "cut.nii.gz", "CN"), ("sub-bomb", "bomb.nii.gz", "AD")]
    pd.DataFrame(rows, columns=["subject", "file", "label"]).to_csv(
        folder / "subjects.csv", index=False
    )
    return folder


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackCluster]:
    with loopback_cluster(tmp_path_factory.mktemp("dask")) as c:
        yield c


@pytest.fixture(scope="module")
def on_cluster(
    cohort: Path, cluster: LoopbackCluster, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The cohort downloaded through the loopback scheduler, then validated."""
    root = tmp_path_factory.mktemp("project")
    params = make_params(cohort, scheduler=cluster.address)
    run_download(params, Paths(root))
    run_validate(params, Paths(root))
    return root


def cache_entries(root: Path) -> set[str]:
    """Finished volumes in the project's cache (temp folders start with a dot)."""
    folder = Paths(root).volume_cache
    return (
        {p.name for p in folder.iterdir() if not p.name.startswith(".")}
        if folder.is_dir()
        else set()
    )


def slices_of(root: Path, subject: str) -> np.ndarray:
    manifest = read_raw_manifest(Paths(root).raw_manifest)
    files = sorted(manifest.loc[manifest["subject"] == subject, "path"])
    return np.stack([np.asarray(Image.open(Paths(root).raw / f)) for f in files])


def assert_every_volume_once(root: Path) -> None:
    volumes = read_volumes(Paths(root).raw_volumes)
    manifest = read_raw_manifest(Paths(root).raw_manifest)
    assert sorted(volumes["file"]) == sorted(
        [f"sub-{i:02d}.nii.gz" for i in range(N_GOOD)] + ["bomb.nii.gz", "cut.nii.gz"]
    )
    assert (volumes.set_index("file").filter(like="sub-", axis=0)["status"] == "ok").all()
    assert manifest["path"].is_unique
    assert manifest.groupby("subject").size().to_dict() == {
        f"sub-{i:02d}": N_SLICES for i in range(N_GOOD)
    }


# --------------------------------------------------------------------------- a scheduler


def test_a_scheduler_address_preprocesses_every_volume_once(on_cluster: Path) -> None:
    assert_every_volume_once(on_cluster)
    volumes = read_volumes(Paths(on_cluster).raw_volumes).set_index("file")
    assert (volumes.filter(like="sub-", axis=0)["registration_score"] > 0.8).all()
    assert volumes.loc["cut.nii.gz", "status"] == "unreadable"


def test_a_640_cubed_header_is_refused_by_the_header_check_on_a_worker(
    on_cluster: Path, cluster: LoopbackCluster
) -> None:
    # given: bomb.nii.gz, 0.3 MB on disk, whose header declares 640^3 uint8 voxels (262 MB)
    volumes = read_volumes(Paths(on_cluster).raw_volumes).set_index("file")
    # then: refused by the header check, not by a worker's memory limit (no worker died) ...
    assert volumes.loc["bomb.nii.gz", "status"] == "too_large"
    assert (
        "the header declares 640x640x640 = 262,144,000 voxels"
        in volumes.loc["bomb.nii.gz", "error"]
    )
    assert cluster.n_workers() == 2
    # ... and quarantined by validate with that reason
    quarantined = pd.read_csv(Paths(on_cluster).quarantine_volumes).set_index("file")
    assert "bomb.nii.gz" in quarantined.index and "cut.nii.gz" in quarantined.index
    assert "too_large" in quarantined.loc["bomb.nii.gz", "details"]


def test_slices_from_the_workers_equal_the_serial_path(on_cluster: Path, cohort: Path) -> None:
    """Byte for byte, though the workers run ITK and OpenMP on one thread and this process
    on all cores: registration samples with a fixed seed (``neuro.register.SEED``; 0
    would be SimpleITK's "seed from the clock", and this test would catch it)."""
    from alzstage.neuro.preprocess import preprocess_volume

    params = make_params(cohort)
    for i in (0, 5):
        serial = preprocess_volume(
            cohort / f"sub-{i:02d}.nii.gz", params.neuro.preprocess, params.base.image_size
        )
        np.testing.assert_array_equal(slices_of(on_cluster, f"sub-{i:02d}"), serial.slices)


def test_a_volume_that_kills_its_workers_gets_that_reason() -> None:
    outcome: Outcome = Outcome(3, error="the task killed its Dask worker 3 times", killed=True)
    volume = _volume_of(outcome, "/data/sub-03.nii.gz")
    assert volume.status == WORKER_KILLED and volume.key is None
    assert volume.error == "/data/sub-03.nii.gz: the task killed its Dask worker 3 times"


# --------------------------------------------------------------------------- failures


@pytest.mark.integration
def test_killing_a_worker_mid_run_loses_and_duplicates_nothing(
    cohort: Path, cluster: LoopbackCluster, tmp_path: Path
) -> None:
    # given: a download running on the two workers
    params = make_params(cohort, scheduler=cluster.address)
    errors: list[BaseException] = []

    def download() -> None:
        try:
            run_download(params, Paths(tmp_path))
        except BaseException as exc:  # handed to the test below
            errors.append(exc)

    thread = threading.Thread(target=download)
    thread.start()
    # when: worker w1 is killed (nanny and all) once the first volume is done
    deadline = time.monotonic() + 120
    while not cache_entries(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    cluster.kill_worker("w1")
    thread.join(timeout=600)
    cluster.start_worker("w1")
    # then: the run completed on the other worker, every volume exactly once
    assert not thread.is_alive() and errors == []
    assert_every_volume_once(tmp_path)
    cluster.wait_for_workers(2)


STAGE = """
import json, sys
from pathlib import Path
from alzstage.config import Params, Paths
from alzstage.data.download import run_download
run_download(Params.model_validate(json.loads(sys.argv[1])), Paths(Path(sys.argv[2])))
"""


def computed_reused(stderr: str) -> tuple[int, int]:
    m = re.findall(r"preprocess: \d+ volumes: computed (\d+), reused (\d+)", stderr)
    assert m, stderr[-2000:]
    return int(m[-1][0]), int(m[-1][1])


@pytest.mark.integration
def test_a_killed_stage_run_again_computes_only_the_unfinished_volumes(
    cohort: Path, cluster: LoopbackCluster, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # given: the download stage in its own process, on its own local cluster of one worker
    params = make_params(cohort, workers=1)
    doc = json.dumps(params.model_dump(mode="json", by_alias=True))
    stage = subprocess.Popen(
        [sys.executable, "-c", STAGE, doc, str(tmp_path)],
        env=worker_environment(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # when: the whole stage (client, cluster, workers) is killed after two volumes
    deadline = time.monotonic() + 180
    while len(cache_entries(tmp_path)) < 2 and stage.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(stage.pid, signal.SIGKILL)
    stage.wait(timeout=30)
    finished = cache_entries(tmp_path)
    assert 2 <= len(finished) < N_GOOD + CACHED_FAILURES
    assert not Paths(tmp_path).raw.exists()  # nothing half-written where DVC looks
    capfd.readouterr()
    # and: it runs again, here through the loopback scheduler
    run_download(make_params(cohort, scheduler=cluster.address), Paths(tmp_path))
    # then: only the volumes that had not finished were computed
    computed, reused = computed_reused(capfd.readouterr().err)
    assert (computed, reused) == (N_GOOD + CACHED_FAILURES - len(finished), len(finished))
    assert_every_volume_once(tmp_path)

    # when: run once more, then with a preprocessing param changed, then only the size limit
    run_download(make_params(cohort, scheduler=cluster.address), Paths(tmp_path))
    again = computed_reused(capfd.readouterr().err)
    changed = make_params(cohort, scheduler=cluster.address).model_dump(by_alias=True)
    changed["neuro"]["preprocess"]["n_slices"] = N_SLICES - 1
    run_download(Params.model_validate(changed), Paths(tmp_path))
    fewer_slices = computed_reused(capfd.readouterr().err)
    changed["neuro"]["preprocess"]["max_volume_mb"] = 512.0
    run_download(Params.model_validate(changed), Paths(tmp_path))
    new_limit = computed_reused(capfd.readouterr().err)
    # then: nothing, everything, and nothing is recomputed
    assert again == (0, N_GOOD + CACHED_FAILURES)
    assert fewer_slices == (N_GOOD + CACHED_FAILURES, 0)
    assert new_limit == (0, N_GOOD + CACHED_FAILURES)
