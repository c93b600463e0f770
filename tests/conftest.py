"""Shared fixtures: tiny images made on the fly, a Kaggle-shaped tree, a local HTTP server.

Tests never touch real data or the network: everything here is generated in ``tmp_path``
and served from 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from alzstage.artifacts import SPLIT_CSV

# tests/ mirrors src/alzstage (tests/data/, tests/train/, ...), and a few test modules
# share helpers by module name (``from test_split import make_project``): every test
# folder goes on sys.path, as the flat tests/ folder was before the move.
for _folder in sorted(Path(__file__).resolve().parent.iterdir()):
    _name = _folder.name
    if _folder.is_dir() and not _name.startswith((".", "_")) and str(_folder) not in sys.path:
        sys.path.append(str(_folder))

CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (24, 20)) -> Path:
    """A small grayscale JPEG whose pixels depend on ``seed`` (distinct files, distinct hashes)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(path, format="JPEG")
    return path


def split_frame(
    paths: list[str], labels: str | list[str], splits: list[str], subjects: list[str] | None = None
) -> pd.DataFrame:
    """split.csv rows as the split stage writes them, checked by its contract (SPLIT_CSV).

    Without ``subjects`` every row has no id (``subject_source`` none: its own group).
    """
    return SPLIT_CSV.check(
        pd.DataFrame(
            {
                "path": paths,
                "label": labels,
                "subject": subjects if subjects is not None else "",
                "subject_source": "given" if subjects is not None else "none",
                "source_split": "",
                "split": splits,
            }
        ),
        Path("<test split rows>"),
    )


@pytest.fixture
def kaggle_tree(tmp_path: Path) -> Path:
    """``Alzheimer_s Dataset/{train,test}/<Class>/*.jpg`` like the Kaggle zip; 3 + 1 per class."""
    root = tmp_path / "kaggle"
    seed = 0
    for split, n in (("train", 3), ("test", 1)):
        for cls in CLASSES:
            for i in range(n):
                write_jpeg(root / "Alzheimer_s Dataset" / split / cls / f"{i}.jpg", seed)
                seed += 1
    return root


@dataclass
class LocalServer:
    """A static file server on 127.0.0.1 that counts the requests it answers, per path."""

    root: Path
    url: str
    requests: Counter = field(default_factory=Counter)


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[LocalServer]:
    root = tmp_path / "www"
    root.mkdir()
    server_ref: dict[str, LocalServer] = {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            server_ref["s"].requests[self.path] += 1
            super().do_GET()

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    server = LocalServer(root=root, url=f"http://127.0.0.1:{httpd.server_address[1]}")
    server_ref["s"] = server
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def png_bytes(seed: int, size: tuple[int, int] = (52, 44)) -> bytes:
    """A grayscale PNG in memory (lossless, so the pixels a test sends are exact)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def png_of(gray: np.ndarray) -> bytes:
    """A uint8 (H, W) array as PNG bytes (lossless)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(gray, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def mri_slices(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """Real-like 208x176 slices from the demo generator, of subjects (seed 123) that the
    demo champion's input check never saw: what the out-of-distribution check must pass.

    Plain random-noise images (``png_bytes``) are flagged by it, so tests that need a
    stage send these.
    """
    return demo_slices(tmp_path_factory.mktemp("mri-slices"), per_class=1, slices=4, seed=123)


def demo_slices(folder: Path, per_class: int, slices: int, seed: int) -> list[np.ndarray]:
    """208x176 demo-generator slices as their JPEGs decode (uint8, H x W)."""
    from alzstage.data.demo import generate_demo

    records = generate_demo(
        folder,
        classes=CLASSES,
        subjects_per_class=[per_class] * len(CLASSES),
        slices_per_subject=slices,
        image_size=(208, 176),
        seed=seed,
    )
    out = []
    for r in records:
        with Image.open(r.path) as im:
            out.append(np.asarray(im.convert("L")))
    return out


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """The session's registered demo champion, shared by the predict, serve and browser tests."""
    from alzstage.serve.demo import ensure_demo_champion

    return ensure_demo_champion(tmp_path_factory.getbasetemp() / "demo-champion")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(
    url: str, proc: subprocess.Popen, log_path: Path, what: str, timeout: float = 180
) -> None:
    """Poll ``url`` until it answers 200; fail with the log's tail if ``proc`` dies first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not come up:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)


@contextlib.contextmanager
def mlflow_server(
    backend_uri: str, workdir: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """A real ``mlflow server`` process on 127.0.0.1; yields its URL, stops it after.

    ``env`` is the server's whole environment (default: this process's). Its log is
    ``workdir/mlflow-server.log``; a server that dies or never turns healthy fails with it.
    """
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        str(workdir / "artifacts"),
        "--workers",
        "1",
    ]
    log_path = workdir / "mlflow-server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ) if env is None else env,
            cwd=workdir,
        )
        try:
            # 180 s: the first start migrates an empty database.
            wait_until_up(f"{url}/health", proc, log_path, "mlflow server")
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def uvicorn_in_thread(app) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """Serve an ASGI app on a free 127.0.0.1 port in a daemon thread; yields its base URL."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
