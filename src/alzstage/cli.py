"""The ``alzstage`` command line: one command per pipeline stage, plus predict and promote.

Nothing heavy is imported at module level: TensorFlow, MLflow and great-expectations load
inside the command that needs them, so ``alzstage --help`` answers instantly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.config import Params, Paths
    from alzstage.result import StageResult
    from alzstage.tracking import StageRun

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

app = typer.Typer(
    help="alzstage: reproducible, leakage-aware Alzheimer's-stage classification from brain MRI.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Params sections each stage reads; dvc.yaml declares the same sections as dependencies.
STAGE_SECTIONS = {
    "download": ["base", "data"],
    "validate": ["base", "validate"],
    "split": ["base", "split"],
    "augment": ["base", "augment", "model"],
    "train": ["base", "model", "train"],
    "evaluate": ["base", "model", "evaluate"],
    "promote": ["promote"],
}


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _load() -> tuple[Params, Paths]:
    from alzstage.config import ConfigError, Paths, load_params

    try:
        paths = Paths()
        return load_params(paths.root / "params.yaml"), paths
    except ConfigError as exc:
        _fail(str(exc))
        raise  # unreachable; keeps type checkers happy


def _run_stage(stage: str, fn: Callable[[Params, Paths, StageRun], StageResult]) -> None:
    """Validate params, open the stage's MLflow run, run it, log what it returned."""
    params, paths = _load()
    from alzstage import tracking

    known = _known_errors()
    try:
        with tracking.stage_run(stage, params, paths.root, STAGE_SECTIONS[stage]) as run:
            result = fn(params, paths, run)
            run.log_metrics(result.metrics)
            if result.tags:
                run.set_tags(result.tags)
            for art in result.artifacts:
                run.log_artifact(art)
    except known as exc:
        _fail(f"{stage}: {exc}", code=1)
    typer.echo(f"[{stage}] {result.summary}".rstrip())


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is already written for a person: print it, no traceback."""
    from alzstage.config import ConfigError
    from alzstage.data.download import DownloadError
    from alzstage.data.validate import ValidationFailed
    from alzstage.errors import WeightsError
    from alzstage.model.inputs import ImageReadError

    return (
        ConfigError,
        DownloadError,
        ImageReadError,
        FileNotFoundError,
        ValidationFailed,
        WeightsError,
    )


@app.command()
def download() -> None:
    """Fetch the configured source (data.source) into data/raw with a manifest."""
    from alzstage.data.download import run_download

    _run_stage("download", lambda p, paths, run: run_download(p, paths))


@app.command()
def validate() -> None:
    """Check the manifest and every image (great-expectations); fail or quarantine."""
    from alzstage.data.validate import run_validate

    _run_stage("validate", lambda p, paths, run: run_validate(p, paths))


@app.command()
def split() -> None:
    """Split into train/val/test by subject (default), slice (leaky) or source."""
    from alzstage.data.split import run_split

    _run_stage("split", lambda p, paths, run: run_split(p, paths))


@app.command()
def augment() -> None:
    """Materialise augmented views of the training split only."""
    from alzstage.data.augment import run_augment

    _run_stage("augment", lambda p, paths, run: run_augment(p, paths))


@app.command()
def train() -> None:
    """Transfer-learn the classifier; log the model to MLflow with a signature."""

    def _train(params: Params, paths: Paths, run: StageRun) -> StageResult:
        from alzstage.files import read_json, write_json
        from alzstage.model.train import run_train

        result = run_train(params, paths, run)
        import numpy as np

        from alzstage.model.pyfunc import log_pyfunc

        h, w = params.model.input_size
        meta = {
            "classes": params.base.classes,
            "input_size": [h, w],
            "temperature": read_json(paths.train_report)["temperature"],
            "backbone": params.model.backbone,
        }
        example = np.zeros((1, h, w), dtype=np.uint8)
        model_uri = log_pyfunc(paths.model_file, meta, example)
        write_json(
            paths.train_run,
            {
                "run_id": run.run_id,
                "model_uri": model_uri,
                "runs_uri": f"runs:/{run.run_id}/model",
                "temperature": meta["temperature"],
                "input_size": [h, w],
            },
        )
        result.artifacts.append(paths.train_run)
        return result

    _run_stage("train", _train)


@app.command()
def evaluate() -> None:
    """Score the trained model on the test split; write reports/metrics.json and plots."""

    def _evaluate(params: Params, paths: Paths, run: StageRun) -> StageResult:
        from alzstage import tracking
        from alzstage.files import read_json
        from alzstage.model.evaluate import run_evaluate

        result = run_evaluate(params, paths)
        train_run = read_json(paths.train_run)
        run.set_tags({"alzstage.train_run_id": train_run["run_id"]})
        # The test numbers also go on the training run, where the model lives in the UI.
        client = tracking.client()
        for k in ("accuracy", "balanced_accuracy", "macro_f1"):
            client.log_metric(train_run["run_id"], f"test_{k}", result.metrics[k])
        return result

    _run_stage("evaluate", _evaluate)


@app.command()
def promote(
    version: Annotated[
        int | None, typer.Option(help="Set an alias on this version by hand.")
    ] = None,
    alias: Annotated[str, typer.Option(help="Alias to set with --version.")] = "champion",
) -> None:
    """Register the new model as challenger; move champion only if it is better."""
    if version is not None:
        params, paths = _load()
        from alzstage import tracking
        from alzstage.model.promote import set_alias_by_hand

        tracking.configure(paths.root)
        typer.echo(set_alias_by_hand(params, version, alias))
        return
    from alzstage.model.promote import run_promote

    _run_stage("promote", lambda p, paths, run: run_promote(p, paths))


@app.command()
def predict(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.")],
    model: Annotated[
        str | None,
        typer.Option(help="Version number, alias, models:/ URI or local path. Default: champion."),
    ] = None,
    output: Annotated[str, typer.Option("--format", "-f", help="table, json or csv")] = "table",
) -> None:
    """Predict the stage of each image with calibrated probabilities."""
    if output not in ("table", "json", "csv"):
        _fail(f"--format must be one of table, json, csv (got {output!r})")
    params, paths = _load()
    from alzstage import tracking
    from alzstage.model.predict import LoadedModel, ModelNotFound, expand_inputs, resolve_model_uri

    try:
        files = expand_inputs(inputs)
    except FileNotFoundError as exc:
        _fail(str(exc))
    if not files:
        _fail("no image files found in the given inputs (expected .jpg, .jpeg or .png)")
    uri = resolve_model_uri(model, params.promote.model_name)
    if not Path(uri).exists():
        tracking.configure(paths.root)
    try:
        loaded = LoadedModel(uri, params.base.classes, params.model.input_size)
    except ModelNotFound as exc:
        _fail(str(exc), code=1)
    from alzstage.model.predict import predict_files

    df = predict_files(loaded, files, params.evaluate.low_confidence)
    if output == "json":
        typer.echo(
            json.dumps(
                {"model": uri, "predictions": json.loads(df.to_json(orient="records"))}, indent=2
            )
        )
    elif output == "csv":
        typer.echo(df.to_csv(index=False), nl=False)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"alzstage predictions ({uri})")
        for col in ["file", "stage", "confidence", *loaded.classes]:
            table.add_column(col)
        for _, r in df.iterrows():
            if r.get("error"):
                table.add_row(
                    Path(r["file"]).name,
                    f"[red]{r['error']}[/red]",
                    "",
                    *[""] * len(loaded.classes),
                )
                continue
            flag = " (low)" if r["low_confidence"] else ""
            table.add_row(
                Path(r["file"]).name,
                r["stage"],
                f"{r['confidence']:.3f}{flag}",
                *[f"{r[c]:.3f}" for c in loaded.classes],
            )
        Console().print(table)
    if df["error"].astype(bool).any():
        raise typer.Exit(1)


@app.command("check-params")
def check_params() -> None:
    """Validate params.yaml and print the resolved values."""
    params, _ = _load()
    typer.echo(json.dumps(params.model_dump(by_alias=True, mode="json"), indent=2))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
