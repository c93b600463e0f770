"""The Great Expectations adapter: the rule specs become a suite, run over the frames.

GX is imported only inside these functions, so importing ``alzstage.data.validate``
stays fast and free of GX. The results come back as plain values: a
:class:`~alzstage.data.validation.rules.SuiteResult`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alzstage.config import Params
from alzstage.data.manifest import MANIFEST_COLUMNS
from alzstage.data.validation.rules import (
    ExpectationResult,
    ExpectationSpec,
    SuiteResult,
    expectation_specs,
    suite_frames,
    volume_frame,
    volume_specs,
)
from alzstage.errors import AlzstageError

SUITE_PREFIX = "alzstage"


def _gx_context(docs_dir: Path | None) -> Any:
    """An in-memory GX context whose only Data Docs site (if any) is ``docs_dir``.

    Ephemeral: GX configuration lives in code and params.yaml, not in a second project
    tree (gx/) that could drift from them.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        sites["local_site"] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(Path(docs_dir).resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _jsonable(value: Any) -> Any:
    """GX results hold numpy scalars; reports and messages want plain Python values."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(x) for x in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(x) for k, x in value.items()}
    return str(value)


def run_manifest_suite(
    manifest: pd.DataFrame,
    params: Params,
    docs_dir: Path | None,
    volumes: pd.DataFrame | None = None,
) -> SuiteResult:
    """Validate the manifest with Great Expectations; build Data Docs into ``docs_dir``.

    With ``volumes`` (the per-volume QC of a ``nifti`` source) its expectations run in
    the same suite, keyed by volume file instead of image path.

    Returns plain values (no GX objects), so callers and tests need not know GX.
    ``unexpected`` holds paths for row-level rules and class names for ``class_min_count``.
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise AlzstageError(
            f"manifest is missing columns {missing} (has {list(manifest.columns)}); "
            "re-run `dvc repro download` to rebuild data/raw/manifest.csv"
        )
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx

    specs = expectation_specs(params)
    frames = suite_frames(manifest, params)
    if volumes is not None:
        specs += volume_specs(params)
        frames["volumes"] = volume_frame(volumes)
    context = _gx_context(docs_dir)
    source = context.data_sources.add_pandas(SUITE_PREFIX)

    by_key = {s.key: s for s in specs}
    out: dict[str, ExpectationResult] = {}
    for frame_name, frame in frames.items():
        frame_specs = [s for s in specs if s.frame == frame_name]
        if not frame_specs:
            continue
        batch = source.add_dataframe_asset(frame_name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=f"{SUITE_PREFIX}.{frame_name}"))
        for s in frame_specs:
            cls = getattr(gx.expectations, s.gx_class)
            suite.add_expectation(cls(**s.kwargs, meta={"key": s.key}, description=s.description))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{SUITE_PREFIX}.{frame_name}", data=batch, suite=suite)
        )
        index = frame_specs[0].index
        actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs")] if docs_dir else []
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"{SUITE_PREFIX}.{frame_name}",
                validation_definitions=[definition],
                actions=actions,
                result_format={
                    "result_format": "COMPLETE",
                    "unexpected_index_column_names": [index],
                    "return_unexpected_index_query": False,
                },
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": frame})
        for vres in run.run_results.values():
            for r in vres.results:
                key = (r.expectation_config.meta or {})["key"]
                out[key] = _summarise_result(r, by_key[key])

    docs_index = None
    if docs_dir is not None:
        docs_index = str(Path(docs_dir).resolve() / "index.html")
    return SuiteResult(
        success=all(e.success for e in out.values()),
        expectations={s.key: out[s.key] for s in specs},
        data_docs=docs_index,
    )


def _summarise_result(r: Any, spec: ExpectationSpec) -> ExpectationResult:
    """Flatten one GX ExpectationValidationResult into the plain values we report."""
    res = r.result or {}
    column = spec.column
    index_list = res.get("unexpected_index_list") or []
    exc = r.exception_info or {}
    if not isinstance(exc, dict) or "raised_exception" not in exc:
        # Multi-metric failures come keyed by metric; take the first that raised.
        raised = [
            v
            for v in (exc.values() if isinstance(exc, dict) else [])
            if isinstance(v, dict) and v.get("raised_exception")
        ]
        exc = raised[0] if raised else {}
    return ExpectationResult(
        spec=spec,
        success=bool(r.success),
        unexpected_count=int(res.get("unexpected_count") or 0),
        unexpected=tuple(_jsonable(d.get(spec.index)) for d in index_list),
        values=tuple(_jsonable(d.get(column)) for d in index_list) if column else (),
        observed_value=_jsonable(res.get("observed_value")),
        exception=exc.get("exception_message") if exc.get("raised_exception") else None,
        type=r.expectation_config.type,
    )
