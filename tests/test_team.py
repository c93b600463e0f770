"""Team-scale workflows, run for real on the tiny demo sample (docs/team.md).

- a DVC remote (a local directory stands in for S3/GCS/SSH): push, clone, pull, and the
  clone is up to date without re-running anything;
- a DVC experiment queue whose runs land in the *main* checkout's MLflow store, tagged
  with the DVC experiment name, so ``dvc exp show`` and MLflow tell the same story;
- an MLflow tracking server backed by PostgreSQL, used over HTTP by a whole ``dvc repro``
  (runs, registry, champion alias) - marked ``postgres``, skipped with a reason when
  PostgreSQL or psycopg2 is not installed;
- no secret in the repository.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port, mlflow_server
from test_pipeline_integration import copy_tiny_project, project_files

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = {"download", "validate", "decode", "split", "augment", "train", "evaluate", "promote"}
GIT_ID = {
    "GIT_AUTHOR_NAME": "alzstage-test",
    "GIT_AUTHOR_EMAIL": "alzstage-test@localhost",
    "GIT_COMMITTER_NAME": "alzstage-test",
    "GIT_COMMITTER_EMAIL": "alzstage-test@localhost",
}


# ----------------------------------------------------------------- helpers


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ALZSTAGE_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_ID)
    env.update(extra or {})
    return env


def _run(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def _git_commit(cwd: Path, message: str) -> None:
    _run(["git", "commit", "-qm", message], cwd)


@pytest.fixture(scope="module")
def team_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project after ``dvc repro``, with dvc.lock committed as a team would."""
    dest = copy_tiny_project(tmp_path_factory.mktemp("team") / "alzstage")
    _run(["dvc", "repro"], dest)
    # promotion.json is `cache: false` (a record of a registry decision, not data): it
    # travels through git, not the DVC remote. /reports/ is git-ignored, hence -f.
    _run(["git", "add", "dvc.lock"], dest)
    _run(["git", "add", "-f", "reports/promotion.json"], dest)
    _git_commit(dest, "pipeline results")
    return dest


# ----------------------------------------------------------------- DVC remote


@pytest.mark.integration
def test_dvc_remote_push_then_clone_pull_is_up_to_date(team_project: Path, tmp_path: Path):
    remote = tmp_path / "dvc-remote"
    _run(["dvc", "remote", "add", "-d", "local", str(remote)], team_project)
    _run(["git", "add", ".dvc/config"], team_project)
    _git_commit(team_project, "DVC remote")
    _run(["dvc", "push"], team_project)
    assert any((remote / "files" / "md5").rglob("*")), "nothing was pushed"

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(team_project), str(clone)], tmp_path)
    assert not (clone / "models" / "model.keras").exists()  # not in git
    _run(["dvc", "pull"], clone)
    # The default pipeline is up to date; cv/dvc.yaml (never run here) is listed as not run.
    status = json.loads(_run(["dvc", "status", "dvc.yaml", "--json"], clone).stdout or "{}")
    assert status == {}, status
    out = _run(["dvc", "repro"], clone).stdout
    assert "Running stage" not in out, out
    for rel in ("models/model.keras", "reports/metrics.json", "data/processed/split.csv"):
        assert (clone / rel).read_bytes() == (team_project / rel).read_bytes(), rel
    assert not (clone / "mlflow.db").exists()  # nothing ran, so nothing was logged


# ----------------------------------------------------------------- experiment queue


def _local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def _queue_status(cwd: Path) -> str:
    return _run(["dvc", "queue", "status"], cwd, timeout=120).stdout


@pytest.mark.integration
def test_experiment_queue_runs_land_in_main_mlflow_store(team_project: Path):
    import mlflow

    root = team_project
    baseline = _run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    rates = {"lr-hi": 0.01, "lr-lo": 0.0001}
    for name, lr in rates.items():
        _run(
            ["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.scratch.learning_rate={lr}"],
            root,
        )
    _run(["dvc", "queue", "start", "-j", "1"], root)
    deadline = time.monotonic() + 1500
    try:
        while True:
            status = _queue_status(root)
            if not re.search(r"\b(Queued|Running)\b", status):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"queue not done after 25 min:\n{status}")
            time.sleep(5)
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=root, env=_env(), capture_output=True)
    for name in rates:
        if not re.search(rf"\b{name}\b.*\bSuccess\b", status):
            logs = subprocess.run(
                ["dvc", "queue", "logs", name], cwd=root, env=_env(), capture_output=True, text=True
            )
            pytest.fail(f"{name} did not succeed:\n{status}\n{logs.stdout[-6000:]}")

    # What `dvc exp show` says ...
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], root).stdout)
    dvc_exps = {}
    for row in shown:
        for exp in row.get("experiments") or []:
            data = exp["revs"][0]["data"]
            dvc_exps[exp["name"]] = {
                "lr": data["params"]["params.yaml"]["data"]["train"]["scratch"]["learning_rate"],
                "bacc": data["metrics"]["reports/headline.json"]["data"]["bacc"],
            }
    assert set(rates) <= set(dvc_exps), shown

    # ... and what MLflow says, from the main checkout's store (the runs executed in
    # throw-away copies under .dvc/tmp/exps, which DVC has deleted by now).
    store = root / "mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("alzstage")
    assert experiment is not None
    assert _local_path(experiment.artifact_location).is_relative_to(root / "mlruns")
    pipeline_ids = set()
    for name, lr in rates.items():
        runs = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`dvc.exp_name` = '{name}'"
        )
        by_stage = {r.info.run_name: r for r in runs}
        # -S train.scratch.learning_rate touches train and what follows it, nothing before.
        assert set(by_stage) == {"train", "evaluate", "promote"}, sorted(by_stage)
        assert len(runs) == 3
        assert all(r.info.status == "FINISHED" for r in runs)
        assert {r.data.tags["dvc.exp_baseline_rev"] for r in runs} == {baseline}
        exp_roots = {r.data.tags["alzstage.root"] for r in runs}
        assert all("/.dvc/tmp/exps/" in p for p in exp_roots), exp_roots
        ids = {r.data.tags["alzstage.pipeline_id"] for r in runs}
        assert len(ids) == 1, ids
        pipeline_ids |= ids
        # The same story: the params and metrics of the DVC experiment are the run's.
        assert float(by_stage["train"].data.params["train.scratch.learning_rate"]) == lr
        assert dvc_exps[name]["lr"] == lr
        # (the headline keeps 3 digits)
        assert (
            round(by_stage["evaluate"].data.metrics["balanced_accuracy"], 3)
            == (dvc_exps[name]["bacc"])
        )
        # Artifacts live beside the main store, not in the deleted experiment copy.
        artifacts = client.list_artifacts(by_stage["train"].info.run_id)
        assert artifacts, "train run logged no artifact"
        artifact_dir = _local_path(by_stage["train"].info.artifact_uri)
        assert artifact_dir.is_relative_to(root / "mlruns") and artifact_dir.is_dir()
    assert len(pipeline_ids) == 2  # one pipeline id per experiment
    assert not list(root.glob(".dvc/tmp/exps/**/mlflow.db"))


# ----------------------------------------------------------------- PostgreSQL + server


def _pg_bindir() -> Path | None:
    """Directory holding initdb and pg_ctl: PATH first, then Debian's versioned layout."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    dirs = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    dirs = [d for d in dirs if (d / "pg_ctl").exists()]

    def version(d: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", d.parent.name)) or (0,)

    return max(dirs, key=version) if dirs else None


def _psycopg2():
    try:
        import psycopg2
    except ImportError:
        pytest.skip(
            "psycopg2 is not installed (pip install -e '.[postgres]'): "
            "the PostgreSQL tracking-server test needs it"
        )
    return psycopg2


@dataclass(frozen=True)
class PgBackend:
    """A libpq URI without password; the password travels as PGPASSWORD, never in a URI."""

    uri: str
    password: str | None = field(default=None, repr=False)

    @property
    def sqlalchemy_uri(self) -> str:
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; name the installed driver.
        return re.sub(r"^postgres(?:ql)?://", "postgresql+psycopg2://", self.uri)

    @property
    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password} if self.password else {}

    def connect(self):
        return _psycopg2().connect(
            self.uri, **({"password": self.password} if self.password else {})
        )


@contextlib.contextmanager
def _throwaway_cluster() -> Iterator[PgBackend]:
    """initdb a cluster in a temp dir, serve it on 127.0.0.1:<free port>, remove it after.

    initdb refuses to run as root, so as root the cluster belongs to the ``postgres``
    user (which Debian's package creates) and the commands run through ``runuser``.
    """
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under "
            "/usr/lib/postgresql/*/bin: apt-get install postgresql, or set "
            "ALZSTAGE_TEST_PG_URI to a server this test may create tables in"
        )
    prefix: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run initdb as")
        if not shutil.which("runuser"):
            pytest.skip("running as root and runuser (util-linux) is missing")
        prefix = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="alzstage-pg-"))
    password = secrets.token_urlsafe(18)  # lives only in this process and its children
    port = free_port()
    data = base / "data"
    pwfile = base / "pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if owner is not None:
        for p in (base, pwfile):
            os.chown(p, owner.pw_uid, owner.pw_gid)
    base.chmod(0o700)

    def pg(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return _run([*prefix, *args], base, env=dict(os.environ), timeout=timeout)

    started = False
    try:
        pg(
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "alzstage",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
        )
        pwfile.unlink()
        pg(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(base / "postgres.log"),
            "-w",
            "-t",
            "90",
            "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -k {base}",
            "start",
        )
        started = True
        psycopg2 = _psycopg2()
        conn = psycopg2.connect(
            host="127.0.0.1", port=port, user="alzstage", password=password, dbname="postgres"
        )
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")
        conn.close()
        yield PgBackend(f"postgresql://alzstage@127.0.0.1:{port}/mlflow", password)
    finally:
        if started:
            subprocess.run(
                [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                cwd=base,
                capture_output=True,
                timeout=120,
            )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_backend() -> Iterator[PgBackend]:
    """A PostgreSQL database for MLflow: ``ALZSTAGE_TEST_PG_URI`` or a throwaway cluster."""
    _psycopg2()
    given = os.environ.get("ALZSTAGE_TEST_PG_URI")
    if given:
        yield PgBackend(given)  # its password, if any, is the caller's business
        return
    with _throwaway_cluster() as backend:
        yield backend


@pytest.mark.integration
@pytest.mark.postgres
def test_postgres_tracking_server_runs_the_pipeline_over_http(
    postgres_backend: PgBackend, tmp_path: Path
):
    import mlflow

    model_name = f"alzstage-pg-{secrets.token_hex(4)}"  # unique on a shared server too
    project = copy_tiny_project(tmp_path / "alzstage", {"promote": {"model_name": model_name}})
    registered = f"{model_name}-demo"  # one registered model per dataset; the tiny one is demo
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    pg = postgres_backend
    with mlflow_server(pg.sqlalchemy_uri, server_dir, _env(pg.env)) as url:
        run_env = _env({"MLFLOW_TRACKING_URI": url})
        _run(["dvc", "repro"], project, env=run_env)

        client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
        experiment = client.get_experiment_by_name("alzstage")
        assert experiment is not None
        assert experiment.artifact_location.startswith("mlflow-artifacts:")
        runs = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`alzstage.root` = '{project}'"
        )
        assert {r.info.run_name for r in runs} == STAGES
        assert len(runs) == len(STAGES)
        assert len({r.data.tags["alzstage.pipeline_id"] for r in runs}) == 1
        champion = client.get_model_version_by_alias(registered, "champion")
        challenger = client.get_model_version_by_alias(registered, "challenger")
        assert champion.version == challenger.version == "1"
        assert champion.run_id in {r.info.run_id for r in runs}
        promo = json.loads((project / "reports" / "promotion.json").read_text())
        assert promo["promoted"] is True

        # A teammate's predict resolves the alias and downloads the model over HTTP.
        img = next((project / "data" / "raw" / "images").rglob("*.jpg"))
        out = _run(
            [
                "alzstage",
                "predict",
                str(img),
                "--format",
                "json",
                "--model",
                f"models:/{registered}@champion",
            ],
            project,
            env=run_env,
        ).stdout
        payload = json.loads(out[out.index("{") :])
        assert payload["predictions"][0]["stage"] in TINY_CLASSES

    # Nothing went to a local store: runs and registry are rows in PostgreSQL, artifacts
    # sit in the server's --artifacts-destination.
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()
    assert any((server_dir / "artifacts").rglob("MLmodel"))
    conn = pg.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM runs WHERE run_uuid = ANY(%s)",
                ([r.info.run_id for r in runs],),
            )
            assert cur.fetchone()[0] == len(STAGES)
            cur.execute(
                "SELECT alias, version FROM registered_model_aliases WHERE name = %s "
                "ORDER BY alias",
                (registered,),
            )
            assert cur.fetchall() == [("challenger", 1), ("champion", 1)]
    finally:
        conn.close()


TINY_CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]


# ----------------------------------------------------------------- tags (fast)


def test_stage_run_tags_dvc_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The env vars `dvc exp run` sets become tags that link MLflow runs to the exp."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as mlflow_uri

    from alzstage import tracking
    from alzstage.config import Params

    # stage_run sets MLflow's process-wide URI; put it back afterwards.
    monkeypatch.setattr(mlflow_uri, "_tracking_uri", mlflow_uri._tracking_uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_EXP_NAME", "lr-hi")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0" * 40)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with tracking.stage_run("train", Params(), tmp_path, ["train"]) as run:
        pass
    tags = mlflow.get_run(run.run_id).data.tags
    assert tags["dvc.exp_name"] == "lr-hi"
    assert tags["dvc.exp_baseline_rev"] == "0" * 40
    monkeypatch.delenv("DVC_EXP_NAME")
    monkeypatch.delenv("DVC_EXP_BASELINE_REV")
    with tracking.stage_run("train", Params(), tmp_path, ["train"]) as plain:
        pass
    assert "dvc.exp_name" not in mlflow.get_run(plain.run_id).data.tags


# ----------------------------------------------------------------- no secrets


# Built from pieces so that this file does not match its own patterns.
SECRET_PATTERNS = {
    "AWS access key id": r"(?<![A-Z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])",
    "AWS secret access key": r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{40}",
    "private key": "-" * 5 + r"BEGIN [A-Z ]*PRIVATE KEY" + "-" * 5,
    "GitHub token": r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})",
    "Slack token": r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    "Google API key": r"\bAIza[0-9A-Za-z_-]{35}",
    "password in a URI": r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"<>{}$]+:[^@\s/'\"<>{}$]+@[\w.-]+",
}


def _secret_hits(text: str) -> list[str]:
    return [name for name, pat in SECRET_PATTERNS.items() if re.search(pat, text)]


def test_secret_patterns_catch_planted_secrets():
    planted = {
        "AWS access key id": "key = " + "AKIA" + "Q" * 16,
        "private key": "-----BEGIN " + "RSA PRIVATE KEY-----",
        "GitHub token": "ghp" + "_" + "a1" * 18,
        "password in a URI": "postgresql://mlflow:" + "hunter2" + "@db.internal:5432/mlflow",
    }
    for name, text in planted.items():
        assert name in _secret_hits(text), name
    # What docs/team.md does instead must stay clean.
    assert _secret_hits("postgresql://mlflow@db.internal:5432/mlflow  PGPASSWORD=...") == []


def test_no_secrets_in_repository_files():
    files = project_files()
    hits = []
    for rel in files:
        path = REPO / rel
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        raw = path.read_bytes()
        if b"\0" in raw[:8192]:
            continue  # binary
        for name in _secret_hits(raw.decode("utf-8", errors="replace")):
            hits.append(f"{rel}: {name}")
    assert not hits, "possible secrets committed:\n" + "\n".join(hits)


def test_dvc_config_has_no_active_remote():
    """The remote template in .dvc/config is commented out: credentials and bucket names
    belong in each person's .dvc/config.local or environment, never in git."""
    active = [
        line
        for line in (REPO / ".dvc" / "config").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert not any("remote" in line for line in active), active
