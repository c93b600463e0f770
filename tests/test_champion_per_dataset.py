"""One champion per dataset: the demo model never stands in for a model trained on real data.

The registry is a real MLflow sqlite store in ``tmp_path``; the two "trained" models are
one-layer Keras networks whose bias makes each always answer one known class, so a
prediction shows which of them was served.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from test_split import make_project
from test_split import run as run_split
from typer.testing import CliRunner

from alzstage import tracking
from alzstage.artifacts import MetricsReport, TrainRun, read_manifest
from alzstage.config import ConfigError, Params, Paths, parse_params
from alzstage.data.identity import dataset_name, image_fingerprint
from alzstage.files import md5_file

CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]
HASHES = [f"{i:064x}" for i in range(5)]
# load_params caches by file mtime; each rewrite gets a distinct one.
_MTIMES = itertools.count(1_700_000_000, 10)


# --------------------------------------------------------------------------- the name


def test_demo_source_is_named_demo_and_other_sources_get_a_content_fingerprint() -> None:
    assert dataset_name("demo", HASHES) == "demo"
    name = dataset_name("archive", HASHES)
    assert name == f"archive-{image_fingerprint(HASHES)[:8]}"
    assert dataset_name("archive", HASHES, name="oasis-1") == "oasis-1"


def test_name_ignores_row_order_and_duplicates_but_not_a_changed_image() -> None:
    same = dataset_name("folder", [*reversed(HASHES), HASHES[0]])
    assert same == dataset_name("folder", HASHES)
    assert dataset_name("folder", [*HASHES[:-1], "f" * 64]) != same
    assert dataset_name("kaggle", HASHES) != dataset_name("folder", HASHES)


def test_data_name_must_be_registry_safe_and_demo_is_reserved_for_demo_data() -> None:
    def data(**kw: object) -> Params:
        raw = Params().model_dump(by_alias=True, mode="json")
        raw["data"].update(kw)
        return parse_params(raw)

    assert data(name="oasis-1.v2").data.name == "oasis-1.v2"
    with pytest.raises(ConfigError, match=r"data\.name"):
        data(name="my data/2")
    with pytest.raises(ConfigError, match="reserved"):
        data(source="folder", path="scans", name="demo")


def test_split_records_the_name_derived_from_the_validated_manifest(tmp_path: Path) -> None:
    # given a validated manifest
    paths = make_project(tmp_path)
    hashes = read_manifest(paths.validated_manifest)["sha256"]

    # when the split stage runs on it for three data configurations
    _, demo = run_split(paths, Params())
    folder = Params.model_validate({"data": {"source": "folder", "path": "scans"}})
    _, derived = run_split(paths, folder)
    named = Params.model_validate({"data": {"source": "folder", "path": "x", "name": "mine"}})
    _, given = run_split(paths, named)

    # then split.json names each dataset, ready for evaluate and promote
    assert (demo["dataset"], demo["data_source"]) == ("demo", "demo")
    assert derived["dataset"] == dataset_name("folder", hashes)
    assert derived["dataset"].startswith("folder-") and derived["data_source"] == "folder"
    assert given["dataset"] == "mine"


def test_only_nothing_a_version_or_an_alias_means_the_configured_datasets_model(
    tmp_path: Path,
) -> None:
    from alzstage.inference.predict import refers_to_dataset_model

    for ref in (None, "", "3", "@challenger", "champion"):
        assert refers_to_dataset_model(ref), ref
    for ref in ("models:/alzstage-x@champion", "runs:/abc/model", "nope.keras", str(tmp_path)):
        assert not refers_to_dataset_model(ref), ref


# --------------------------------------------------------------------------- registry


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A project root whose MLflow store is ``tmp_path/mlflow.db``; MLflow state restored."""
    from mlflow.tracking import fluent

    from alzstage.serve.demo import scoped_tracking_uri

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ALZSTAGE_ROOT", str(tmp_path))
    monkeypatch.setenv("ALZSTAGE_PIPELINE_ID", "test-champions")
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    had_experiment = "MLFLOW_EXPERIMENT_ID" in os.environ
    try:
        with scoped_tracking_uri(tracking.tracking_uri(tmp_path)):
            yield tmp_path
    finally:
        if not had_experiment:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def write_params(root: Path, **data: object) -> Params:
    """params.yaml with the defaults and ``data`` overrides, with a fresh mtime (cache key)."""
    raw = Params().model_dump(by_alias=True, mode="json")
    raw["data"].update(data)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    stamp = next(_MTIMES)
    os.utime(path, (stamp, stamp))
    return parse_params(raw)


def log_constant_model(root: Path, params: Params, answer: str) -> TrainRun:
    """Log a pyfunc that always predicts ``answer``; returns its train_run.json."""
    import keras

    from alzstage.inference.pyfunc import log_pyfunc

    inp = keras.Input((32, 32, 1))
    dense = keras.layers.Dense(len(CLASSES), activation="softmax")
    model = keras.Model(inp, dense(keras.layers.Flatten()(inp)))
    bias = np.where(np.array(CLASSES) == answer, 5.0, 0.0)
    dense.set_weights([np.zeros((32 * 32, len(CLASSES))), bias])
    model_file = root / "models" / f"{answer}.keras"
    model_file.parent.mkdir(parents=True, exist_ok=True)
    model.save(model_file)
    meta = {"classes": CLASSES, "input_size": [32, 32], "temperature": 1.0, "backbone": "tiny"}
    with tracking.stage_run("train", params, root, ["train"]) as run:
        uri = log_pyfunc(model_file, meta, np.zeros((1, 32, 32), dtype=np.uint8))
        model_md5 = md5_file(model_file)
        run.set_tags({tracking.TAG_MODEL_MD5: model_md5, tracking.TAG_MODEL_URI: uri})
    return TrainRun(
        model_md5=model_md5,
        temperature=1.0,
        input_size=(32, 32),
        recipe="scratch",
        backbone="tiny",
        weights="none",
    )


def pipeline_outputs(paths: Paths, train_run: TrainRun, dataset: str, source: str, score: float):
    """What train, split and evaluate would have written for one run on one dataset."""
    paths.reports.mkdir(parents=True, exist_ok=True)
    train_run.write(paths.train_run)
    paths.split_report.write_text(json.dumps({"dataset": dataset, "data_source": source}))
    MetricsReport(
        balanced_accuracy=score,
        macro_f1=score,
        accuracy=score,
        split_fingerprint=f"test-split-of-{dataset}",
        split_strategy="subject",
        split_leaky=False,
        dataset=dataset,
        data_source=source,
    ).write(paths.metrics)


def predict_json(image: Path) -> dict:
    from alzstage.cli import app

    result = CliRunner().invoke(app, ["predict", str(image), "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_demo_then_real_data_each_keep_a_champion_and_predict_follows_params(
    project: Path,
) -> None:
    from alzstage.promote import run_promote

    paths = Paths(project)
    tracking.configure(project)
    real = dataset_name("folder", HASHES)

    # given a demo run (champion of demo), then a run on real data that scores lower
    demo_params = write_params(project)
    demo_run = log_constant_model(project, demo_params, "NonDemented")
    pipeline_outputs(paths, demo_run, "demo", "demo", score=0.9)
    run_promote(demo_params, paths)
    real_params = write_params(project, source="folder", path="scans")
    real_run = log_constant_model(project, real_params, "MildDemented")
    pipeline_outputs(paths, real_run, real, "folder", score=0.4)

    # when the real run is promoted
    run_promote(real_params, paths)

    # then it is champion of its own dataset, and the demo champion is untouched
    report = json.loads(paths.promotion.read_text())
    assert report["promoted"] is True and report["dataset"] == real
    assert report["model_uri"] == f"models:/alzstage-{real}@champion"
    champions = {
        d: tracking.get_alias_version(tracking.registered_name("alzstage", d), "champion")
        for d in ("demo", real)
    }
    assert {d: mv.tags["dataset"] for d, mv in champions.items()} == {"demo": "demo", real: real}
    # each champion is the version of the train run that wrote its model file
    for d, run in ((real, real_run), ("demo", demo_run)):
        assert champions[d].run_id == tracking.trained_model(run.model_md5, "store").run_id
    assert champions[real].tags["recipe"] == "scratch"
    assert champions[real].tags["split_strategy"] == "subject"
    assert tracking.dataset_champions("alzstage") == sorted(["demo", real])

    # and predict with no --model serves the champion of the configured data
    image = project / "slice.png"
    Image.new("L", (44, 52), 90).save(image)
    doc = predict_json(image)
    assert doc["model_name"] == f"alzstage-{real}" and doc["dataset"] == real
    assert doc["predictions"][0]["stage"] == "MildDemented"
    assert doc["synthetic_demo"] is False and "recipe scratch" in doc["provenance"]
    assert "derived from the validated manifest" in doc["model_choice"]

    write_params(project)  # back to data.source: demo
    doc = predict_json(image)
    assert doc["model_name"] == "alzstage-demo" and doc["dataset"] == "demo"
    assert doc["predictions"][0]["stage"] == "NonDemented"
    assert doc["synthetic_demo"] is True and "SYNTHETIC" in doc["provenance"]


def test_predict_says_why_when_the_configured_data_has_no_known_name(project: Path) -> None:
    from alzstage.cli import app

    # given real data configured, but a split report left from the demo data
    write_params(project, source="archive", path="scans.zip")
    paths = Paths(project)
    paths.reports.mkdir(parents=True, exist_ok=True)
    paths.split_report.write_text(json.dumps({"dataset": "demo", "data_source": "demo"}))
    image = project / "slice.png"
    Image.new("L", (44, 52), 90).save(image)

    # when predict runs without --model
    result = CliRunner().invoke(app, ["predict", str(image)])

    # then it refuses to guess (no demo model in place of the real one) and says how to fix
    assert result.exit_code == 1
    assert "'demo'" in result.output and "'archive'" in result.output
    assert "data.name" in result.output and "--model" in result.output


def test_predict_names_the_datasets_that_do_have_a_champion(project: Path) -> None:
    from alzstage.cli import app
    from alzstage.promote import run_promote

    # given only a demo champion, and params that name another dataset
    paths = Paths(project)
    tracking.configure(project)
    demo_params = write_params(project)
    pipeline_outputs(
        paths, log_constant_model(project, demo_params, "NonDemented"), "demo", "demo", score=0.9
    )
    run_promote(demo_params, paths)
    write_params(project, source="folder", path="scans", name="oasis")
    image = project / "slice.png"
    Image.new("L", (44, 52), 90).save(image)

    # when predict runs without --model
    result = CliRunner().invoke(app, ["predict", str(image)])

    # then it fails, naming the configured dataset and the one that has a champion
    assert result.exit_code == 1
    assert "models:/alzstage-oasis@champion" in result.output
    assert "dataset oasis (data.name in params.yaml)" in result.output
    assert "champions exist for dataset(s) demo" in result.output
