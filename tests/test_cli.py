"""The CLI starts fast (no heavy imports) and rejects bad params with one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from alzstage.cli import app
from alzstage.stages import STAGES

HEAVY = ("tensorflow", "keras", "mlflow", "great_expectations", "sklearn")


def test_importing_cli_loads_no_heavy_library():
    code = f"import sys, alzstage.cli; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_help_lists_every_stage_and_predict():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in [*(s.command for s in STAGES), "predict", "promote"]:
        assert name in result.output


def test_stage_commands_are_the_registry_names_with_dashes():
    assert [s.command for s in STAGES] == [s.name.replace("_", "-") for s in STAGES]


def test_each_stage_command_runs_its_registry_stage(monkeypatch):
    from alzstage import cli

    # given: the runner replaced by a recorder
    calls = []
    monkeypatch.setattr(cli, "_run_stage", lambda stage, **options: calls.append((stage, options)))
    # when: every stage command is invoked (cv-fold with its --fold)
    for stage in STAGES:
        args = [stage.command, *(["--fold", "2"] if stage.per_fold else [])]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    # then: each ran its own stage, and only cv-fold got a fold
    assert calls == [(s, {"fold": 2} if s.per_fold else {}) for s in STAGES]


def _write_params(tmp_path, mutate):
    from alzstage.config import Params

    raw = Params().model_dump(by_alias=True, mode="json")
    mutate(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")


def test_bad_value_is_one_line_naming_key(tmp_path, monkeypatch):
    _write_params(tmp_path, lambda r: r["train"].update(epochs="many"))
    monkeypatch.setenv("ALZSTAGE_ROOT", str(tmp_path))
    result = CliRunner().invoke(app, ["check-params"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "train.epochs" in lines[0] and "'many'" in lines[0]


def test_unknown_choice_lists_allowed_values(tmp_path, monkeypatch):
    _write_params(tmp_path, lambda r: r["validate"].update(on_failure="ignore"))
    monkeypatch.setenv("ALZSTAGE_ROOT", str(tmp_path))
    result = CliRunner().invoke(app, ["check-params"])
    assert result.exit_code == 2
    assert "validate.on_failure" in result.output and "'quarantine'" in result.output


def test_predict_without_champion_says_how_to_fix(tmp_path, monkeypatch):
    from PIL import Image

    _write_params(tmp_path, lambda r: None)
    monkeypatch.setenv("ALZSTAGE_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    img = tmp_path / "slice.jpg"
    Image.new("L", (176, 208), 80).save(img)
    result = CliRunner().invoke(app, ["predict", str(img)])
    assert result.exit_code == 1
    assert "dvc repro" in result.output and "alzstage promote" in result.output


# --------------------------------------------------------------------------- ordinary mistakes


def alzstage(root, *args: str) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process, as a person runs it, against the project at ``root``."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, "-m", "alzstage.cli", *args],
        cwd=root,
        env={**env, "ALZSTAGE_ROOT": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a failed command; no traceback anywhere."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_split_fractions_summing_to_one_are_refused_by_check_params(tmp_path):
    _write_params(tmp_path, lambda r: r["split"].update(test_size=0.6, val_size=0.5))
    line = one_line_error(alzstage(tmp_path, "check-params"))
    assert "split.test_size (0.6) + split.val_size (0.5)" in line and "lower one" in line


def test_predict_with_a_missing_model_file_says_no_such_file(tmp_path):
    from PIL import Image

    _write_params(tmp_path, lambda r: None)
    Image.new("L", (176, 208), 80).save(tmp_path / "slice.png")
    missing = tmp_path / "nope.keras"
    line = one_line_error(alzstage(tmp_path, "predict", "--model", str(missing), "slice.png"))
    assert f"--model {missing}: no such file" in line


def test_predict_with_a_file_that_is_not_a_keras_model_says_so(tmp_path):
    from PIL import Image

    _write_params(tmp_path, lambda r: None)
    Image.new("L", (176, 208), 80).save(tmp_path / "slice.png")
    fake = tmp_path / "model.keras"
    fake.write_bytes(b"PK\x03\x04 but not really")
    line = one_line_error(alzstage(tmp_path, "predict", "--model", str(fake), "slice.png"))
    assert f"--model {fake}: not a Keras model file" in line and "File not found" not in line


def test_predict_with_a_damaged_keras_archive_says_it_cannot_be_loaded(tmp_path):
    import zipfile

    from PIL import Image

    _write_params(tmp_path, lambda r: None)
    Image.new("L", (176, 208), 80).save(tmp_path / "slice.png")
    damaged = tmp_path / "model.keras"
    with zipfile.ZipFile(damaged, "w") as zf:
        zf.writestr("config.json", "{not json")
    line = one_line_error(alzstage(tmp_path, "predict", "--model", str(damaged), "slice.png"))
    assert f"--model {damaged}: cannot load this Keras model" in line


def test_promote_to_a_version_that_does_not_exist(tmp_path):
    _write_params(tmp_path, lambda r: None)
    line = one_line_error(alzstage(tmp_path, "promote", "--version", "999"))
    assert "no version 999" in line and "dvc repro" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--version", "1", "--alias", ""], "--alias '': Registered model alias name cannot be"),
        (["--alias", ""], "--alias '' needs --version"),
    ],
)
def test_promote_with_an_empty_alias(tmp_path, args, expected):
    _write_params(tmp_path, lambda r: None)
    assert expected in one_line_error(alzstage(tmp_path, "promote", *args))


def test_damaged_archive_is_one_line_naming_the_file(tmp_path):
    import zipfile

    archive = tmp_path / "scans.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("NonDemented/a.png", b"x" * 4000)
    archive.write_bytes(archive.read_bytes()[:100])
    _write_params(tmp_path, lambda r: r["data"].update(source="archive", path=str(archive)))
    line = one_line_error(alzstage(tmp_path, "download"))
    assert f"{archive}: starts like a zip archive" in line and "download it again" in line


def test_every_error_class_in_alzstage_is_an_alzstage_error():
    """The CLI catches AlzstageError once, so no error class may live outside it."""
    import importlib
    import pkgutil

    import alzstage
    from alzstage.errors import AlzstageError

    names = [m.name for m in pkgutil.walk_packages(alzstage.__path__, "alzstage.")]
    stray = []
    for name in names:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if (
                isinstance(obj, type)
                and issubclass(obj, Exception)
                and obj.__module__.startswith("alzstage")
                and not issubclass(obj, AlzstageError)
            ):
                stray.append(f"{name}.{attr}")
    assert stray == []
