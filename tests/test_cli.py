"""The CLI starts fast (no heavy imports) and rejects bad params with one clear line."""

from __future__ import annotations

import subprocess
import sys

import yaml
from typer.testing import CliRunner

from alzstage.cli import STAGE_SECTIONS, app

HEAVY = ("tensorflow", "keras", "mlflow", "great_expectations", "sklearn")


def test_importing_cli_loads_no_heavy_library():
    code = f"import sys, alzstage.cli; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_help_lists_every_stage_and_predict():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in [*STAGE_SECTIONS, "predict", "promote"]:
        assert name in result.output


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
