"""``alzstage predict --output FILE``: thousands of slices or volumes, on the compute engine.

The interactive ``alzstage predict`` holds every result until it prints them; that is
right for a folder of scans and wrong for a cohort of 100,000 slices. Batch mode:

* splits the expanded inputs into chunks (:data:`CHUNK_IMAGES` images, or one volume:
  a volume is 32 slices plus ~11 s of preprocessing) and runs each chunk as one Dask
  task (:mod:`alzstage.compute`: a local cluster of worker processes by default);
* loads the model once per worker process (:func:`worker_model`, keyed by the model's
  URI and store), not once per chunk;
* writes each chunk's rows, in input order, to a temp file beside ``FILE`` as soon as
  every chunk before it is done, and renames it onto ``FILE`` at the end: a killed run
  leaves no half-written table;
* keeps at most two chunks per worker submitted and not yet written, so memory does not
  grow with the number of inputs (only the list of file names does).

The rows are :func:`alzstage.inference.prediction.records`, the table ``--format csv``
prints, with the same numbers: each chunk runs :func:`alzstage.inference.predict.predict_paths`.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alzstage.errors import InputError, ModelNotFound
from alzstage.files import atomic_path
from alzstage.inference.prediction import CHECK_COLUMNS, VOLUME_COLUMNS

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from alzstage.config import Params, Paths
    from alzstage.inference.loading import LoadedModel

# Images per task: ~0.3 s of work for the compact network, so the scheduler's few ms per
# task stay negligible, and a chunk's decoded images (~40 KB each) stay small.
CHUNK_IMAGES = 256
OUTPUT_SUFFIXES = (".csv", ".parquet")
# Parquet types of the record columns (any other column, e.g. a class name: float64).
_STRING = {"file", "stage", "error", "ood_reason", "kind", "aggregate", "brain_model"}
_STRING |= {"pooled_stage", "set_text"}
_BOOL = {"low_confidence", "out_of_distribution", "seen_in_training"}
_INT = {"n_slices", "n_slices_used"}


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to load the model itself: small, picklable, hashable."""

    uri: str
    classes: tuple[str, ...]
    input_size: tuple[int, int]
    tracking_uri: str
    registry_uri: str


@dataclass(frozen=True)
class ModelFacts:
    """What the client shows about the model, read on a worker (no TensorFlow here)."""

    label: str
    provenance: str
    classes: list[str]


@dataclass
class BatchSummary:
    """What ``alzstage predict --output`` says when it is done."""

    output: Path
    model: str
    n_inputs: int = 0
    n_errors: int = 0
    n_out_of_distribution: int = 0
    stage_counts: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def line(self) -> str:
        stages = ", ".join(f"{k} {v}" for k, v in sorted(self.stage_counts.items()))
        rate = self.n_inputs / self.seconds if self.seconds else 0.0
        return (
            f"{self.n_inputs} inputs -> {self.output} in {self.seconds:.0f} s ({rate:.0f}/s); "
            f"stages: {stages or 'none'}; {self.n_out_of_distribution} out of distribution, "
            f"{self.n_errors} errors; model {self.model}"
        )


# --------------------------------------------------------------------------- on a worker

_MODELS: dict[ModelSpec, LoadedModel] = {}


def worker_model(spec: ModelSpec) -> LoadedModel:
    """The model of ``spec``, loaded once per process (each Dask worker keeps its own)."""
    if spec not in _MODELS:
        from alzstage.inference.loading import LoadedModel

        _MODELS[spec] = LoadedModel(
            spec.uri,
            list(spec.classes),
            spec.input_size,
            tracking_uri=spec.tracking_uri,
            registry_uri=spec.registry_uri,
        )
    return _MODELS[spec]


def model_facts(spec: ModelSpec) -> ModelFacts:
    """Load the model on a worker (it stays loaded there) and say what it is."""
    model = worker_model(spec)
    return ModelFacts(model.info.label, model.info.ref.provenance, list(model.classes))


def predict_chunk(files: Sequence[str], spec: ModelSpec, params: Params) -> pd.DataFrame:
    """The Dask task: one chunk's record rows, as ``--format csv`` has them."""
    import pandas as pd

    from alzstage.inference.predict import predict_paths
    from alzstage.inference.prediction import records

    model = worker_model(spec)
    predictions = predict_paths(model, [Path(f) for f in files], params)
    return pd.DataFrame(records(predictions, model.classes))


# --------------------------------------------------------------------------- on the client


def output_columns(classes: Sequence[str], has_images: bool, has_volumes: bool) -> list[str]:
    """The columns of :func:`~alzstage.inference.prediction.records` for the whole batch.

    A chunk's own rows lack the columns of kinds it does not hold; every chunk is
    written with these, so the file has one schema.
    """
    columns = ["file", "stage", "confidence", "low_confidence", "error", *classes]
    if has_images:
        columns += CHECK_COLUMNS
    if has_volumes:
        columns += ["kind", *VOLUME_COLUMNS]
    return columns


def chunked(files: Sequence[Path], size: int = CHUNK_IMAGES) -> Iterator[list[str]]:
    """Runs of up to ``size`` images; each volume alone (it is worth ~size images)."""
    from alzstage.neuro.volume import is_volume_path

    run: list[str] = []
    for f in files:
        if is_volume_path(f):
            if run:
                yield run
                run = []
            yield [str(f)]
            continue
        run.append(str(f))
        if len(run) >= size:
            yield run
            run = []
    if run:
        yield run


@contextlib.contextmanager
def result_writer(target: Path, columns: list[str]) -> Iterator[Callable[[pd.DataFrame], None]]:
    """A function that appends a chunk's rows, in the order it is called, to a temp file
    beside ``target``; renamed onto ``target`` when the block ends without an error.

    CSV as ``--format csv`` writes it; Parquet one row group per chunk, with the column
    types fixed up front (a chunk whose rows are all null in a column keeps its type).
    """
    csv = Path(target).suffix.lower() == ".csv"
    with atomic_path(Path(target)) as tmp:
        parquet: list[Any] = []  # the ParquetWriter, opened with the first chunk
        first = True

        def write(frame: pd.DataFrame) -> None:
            nonlocal first
            frame = frame.reindex(columns=columns)
            if "kind" in frame:  # an image chunk of a mixed batch has no kind of its own
                frame["kind"] = frame["kind"].fillna("image")
            if csv:
                mode = "w" if first else "a"
                frame.to_csv(tmp, mode=mode, header=first, index=False, lineterminator="\n")
            else:
                table = arrow_table(frame, columns)
                if not parquet:
                    import pyarrow.parquet as pq

                    parquet.append(pq.ParquetWriter(tmp, table.schema))
                parquet[0].write_table(table)
            first = False

        try:
            yield write
        finally:
            if parquet:
                parquet[0].close()


def arrow_table(frame: pd.DataFrame, columns: list[str]) -> Any:
    """``frame`` as an Arrow table with the types of :data:`_STRING`, :data:`_BOOL`,
    :data:`_INT` (float64 otherwise), whatever its own values are."""
    import pandas as pd
    import pyarrow as pa

    arrays, fields = [], []
    for name in columns:
        values = frame[name]
        missing = values.isna().tolist()
        if name in _STRING:
            kind = pa.string()
            data: Any = [None if m else str(v) for v, m in zip(values, missing, strict=True)]
        elif name in _BOOL:
            kind = pa.bool_()
            data = [None if m else bool(v) for v, m in zip(values, missing, strict=True)]
        elif name in _INT:
            kind, data = pa.int64(), pd.to_numeric(values).astype("Int64")
        else:
            kind, data = pa.float64(), pd.to_numeric(values, errors="coerce")
        arrays.append(pa.array(data, type=kind, from_pandas=True))
        fields.append(pa.field(name, kind))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def failed_rows(files: Sequence[str], error: str) -> pd.DataFrame:
    """Rows for a chunk whose task gave no result (its worker died, it raised)."""
    import pandas as pd

    return pd.DataFrame(
        {"file": list(files), "stage": "", "error": [f"{f}: {error}" for f in files]}
    )


def run_batch_predict(
    inputs: list[str],
    model_ref: str | None,
    params: Params,
    paths: Paths,
    output: Path,
    announce: Callable[[str], None] = print,
    chunk_images: int | None = None,
) -> BatchSummary:
    """Predict every input on the compute engine and stream the rows to ``output``.

    Raises :class:`~alzstage.errors.InputError` for an output that is neither ``.csv``
    nor ``.parquet`` or inputs that name no file, and the model errors of
    :func:`alzstage.inference.command.run_predict`.
    """
    from alzstage.compute import Progress, engine
    from alzstage.inference.predict import choose_model, missing_champion_hint, store_uris
    from alzstage.neuro.volume import is_volume_path

    # 1. The output and the inputs, refused before anything starts.
    output = Path(output)
    files = _input_files(inputs, output)
    started = time.perf_counter()
    # 2. The model --model names, as a spec each worker loads it from.
    tracking_uri, registry_uri = store_uris(paths.root)
    choice = choose_model(model_ref, params, paths)
    announce(f"model: {choice.reason}")
    spec = ModelSpec(
        choice.uri,
        tuple(params.base.classes),
        tuple(params.model.input_size),
        tracking_uri,
        registry_uri,
    )
    # 3. The inputs in chunks, mapped in order over the engine, each chunk's rows written.
    kinds = [is_volume_path(f) for f in files]
    has_images, has_volumes, n_inputs = not all(kinds), any(kinds), len(files)
    chunks = list(chunked(files, chunk_images or CHUNK_IMAGES))
    del files, kinds  # the chunks hold the names, as plain strings
    with engine(params.compute, f"predict: {n_inputs} inputs", announce) as eng:
        try:
            facts = eng.client.submit(model_facts, spec, pure=False).result()
        except ModelNotFound as exc:
            hint = missing_champion_hint(
                choice, params.promote.model_name, tracking_uri, registry_uri
            )
            raise ModelNotFound(f"{exc}; {hint}" if hint else str(exc)) from None
        summary = BatchSummary(output=output, model=facts.label)
        columns = output_columns(facts.classes, has_images, has_volumes)
        progress = Progress(n_inputs, "predict", "input")
        try:
            with result_writer(output, columns) as write:
                for outcome in eng.map_ordered(
                    predict_chunk,
                    chunks,
                    spec,
                    params,
                    name="predict",
                    progress=progress,
                    weight=len,
                    failures=lambda frame: int((frame["error"] != "").sum()),
                ):
                    frame = outcome.value
                    if frame is None:
                        frame = failed_rows(chunks[outcome.index], str(outcome.error))
                    write(frame)
                    _count(summary, frame)
        finally:
            progress.close()
    # 4. The summary line's figures.
    summary.seconds = time.perf_counter() - started
    return summary


def _input_files(inputs: list[str], output: Path) -> list[Path]:
    """The files the inputs name, once ``output`` is a .csv or .parquet path."""
    from alzstage.inference.predict import expand_inputs

    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(
            f"--output {output}: write a .csv or a .parquet file (the suffix picks the format)"
        )
    try:
        files = expand_inputs(inputs)
    except FileNotFoundError as exc:
        raise InputError(str(exc)) from None
    if not files:
        raise InputError("no image files found in the given inputs (.jpg, .png, .nii, .nii.gz)")
    return files


def _count(summary: BatchSummary, frame: pd.DataFrame) -> None:
    summary.n_inputs += len(frame)
    errors = frame["error"].fillna("") != ""
    summary.n_errors += int(errors.sum())
    if "out_of_distribution" in frame:
        summary.n_out_of_distribution += sum(v is True for v in frame["out_of_distribution"])
    stages = frame.loc[~errors & (frame["stage"].fillna("") != ""), "stage"]
    summary.stage_counts.update(stages.tolist())
