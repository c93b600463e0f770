"""dvc.yaml and cv/dvc.yaml say what the stage registry says: params, data and code.

A stage whose code deps miss a module it imports is cached when that module changes
(a stale temperature in a "cached" model); these tests make that drift a failing test.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import yaml

from alzstage.stages import (
    SRC,
    STAGES,
    Stage,
    code_deps,
    dvc_deps,
    entry_imports,
    import_closure,
)

REPO = Path(__file__).resolve().parents[1]
DVC_FILES = ("dvc.yaml", "cv/dvc.yaml")


def dvc_stages() -> dict[str, tuple[str, dict]]:
    """Every stage of both dvc.yaml files: name -> (file, definition; foreach: its ``do``)."""
    out = {}
    for rel in DVC_FILES:
        for name, spec in yaml.safe_load((REPO / rel).read_text())["stages"].items():
            out[name] = (rel, spec.get("do", spec))
    return out


def repo_relative(dvcfile: str, spec: dict, path: str) -> str:
    """A dep as a repository path: dvc.yaml paths are relative to the stage's wdir."""
    wdir = (REPO / dvcfile).parent / spec.get("wdir", ".")
    return Path(os.path.normpath(wdir / path)).relative_to(REPO).as_posix()


def declared(stage: Stage) -> dict:
    rel, spec = dvc_stages()[stage.name]
    return {
        "file": rel,
        "cmd": spec["cmd"],
        "params": spec.get("params", []),
        "deps": [repo_relative(rel, spec, d) for d in spec.get("deps", [])],
    }


def drift(what: str, stage: Stage, in_dvc: list[str], in_registry: list[str]) -> str:
    missing = sorted(set(in_registry) - set(in_dvc))
    extra = sorted(set(in_dvc) - set(in_registry))
    return (
        f"{stage.dvcfile} stage {stage.name!r}: {what} differ from the registry "
        f"(src/alzstage/stages.py); add {missing}, remove {extra}"
    )


# --------------------------------------------------------------------------- the drift test


def test_the_dvc_files_hold_exactly_the_registry_stages() -> None:
    # given: both dvc.yaml files; then: the same stage names, each in its declared file
    stages = dvc_stages()
    assert sorted(stages) == sorted(s.name for s in STAGES)
    for stage in STAGES:
        assert stages[stage.name][0] == stage.dvcfile, stage.name


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_dvc_runs_the_registry_command(stage: Stage) -> None:
    fold = " --fold ${item}" if stage.per_fold else ""
    assert declared(stage)["cmd"] == f"alzstage {stage.command}{fold}"


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_dvc_params_are_the_sections_the_stage_reads(stage: Stage) -> None:
    params = declared(stage)["params"]
    assert all(isinstance(p, str) for p in params), params
    assert len(set(params)) == len(params), params
    assert sorted(params) == sorted(stage.params), drift("params", stage, params, stage.params)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_dvc_deps_are_the_data_it_reads_and_its_import_closure(stage: Stage) -> None:
    # given: the stage's data (registry) and the import closure of its run function
    expected = dvc_deps(stage)
    # then: dvc.yaml lists exactly those, no more, no fewer
    deps = declared(stage)["deps"]
    assert len(set(deps)) == len(deps), deps
    assert sorted(deps) == sorted(expected), drift("deps", stage, deps, expected)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_the_run_function_takes_what_the_registry_passes(stage: Stage) -> None:
    # Read from the source: importing the stage modules would load TensorFlow.
    module, _, function = stage.entry.partition(":")
    tree = ast.parse((SRC.joinpath(*module.split(".")[1:]).with_suffix(".py")).read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    args = [a.arg for a in fn.args.args]
    expected = ["params", "paths"]
    expected += ["fold"] if stage.per_fold else []
    expected += ["tracker"] if stage.takes_tracker else []
    assert args == expected


# --------------------------------------------------------------------------- the closure


def test_package_inits_hold_no_code_so_no_stage_depends_on_them() -> None:
    # code_deps leaves __init__.py out; that is honest only while they import nothing
    for init in sorted(SRC.rglob("__init__.py")):
        for node in ast.parse(init.read_text()).body:
            docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            version = isinstance(node, ast.Assign) and [
                t.id for t in node.targets if isinstance(t, ast.Name)
            ] == ["__version__"]
            assert docstring or version, f"{init.relative_to(REPO)}:{node.lineno}"


def test_closure_follows_lazy_imports_and_skips_type_checking_ones() -> None:
    # crossval imports train inside run_cv_fold, and StageRun only for type checkers
    fold = import_closure("alzstage.cv.stages", "run_cv_fold")
    assert {"alzstage.train.recipe", "alzstage.model.calibration"} <= fold
    assert "alzstage.model.network" in fold  # lazily, inside train.py
    assert "alzstage.cv.stages" in fold
    assert "alzstage.tracking" not in entry_imports("alzstage.cv.stages", "run_cv_fold")


def test_closure_of_one_run_function_leaves_out_its_neighbours_imports() -> None:
    # cv_split does not train: the training code run_cv_fold imports is not its dependency
    split = import_closure("alzstage.cv.stages", "run_cv_split")
    assert "alzstage.data.split" in split
    assert "alzstage.train.recipe" not in split and "alzstage.evaluate.stage" not in split


def test_code_deps_are_repository_paths_of_existing_files() -> None:
    for stage in STAGES:
        for dep in code_deps(stage):
            assert dep.startswith("src/alzstage/") and (REPO / dep).is_file(), dep


# --------------------------------------------------------------------------- metrics


def test_dvc_metrics_are_the_headlines_only() -> None:
    # The detail (metrics.json, split.json, validation.json, train.json) is stage outputs.
    main = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert main["metrics"] == ["reports/headline.json"]
    per_stage = {}
    for name, (_, spec) in dvc_stages().items():
        for entry in spec.get("metrics", []):
            per_stage[name] = [
                *per_stage.get(name, []),
                *(entry if isinstance(entry, dict) else [entry]),
            ]
    # The CV's headline is a plain output: a clone that never ran the CV must not get an
    # empty row and a warning from `dvc metrics show`.
    assert per_stage == {"evaluate": ["reports/headline.json"]}


# --------------------------------------------------------------------------- scoped params


def test_a_stage_reads_only_the_params_it_declares() -> None:
    from alzstage.config import Params
    from alzstage.errors import ConfigError
    from alzstage.stages import ScopedParams

    # given the augment stage's view of the params (base, augment, model.input_size)
    scoped = ScopedParams(Params(), ("base", "augment", "model.input_size"), "augment")
    # then its own sections and keys read as usual
    assert scoped.base.seed == Params().base.seed
    assert scoped.augment.rotation_deg == Params().augment.rotation_deg
    assert tuple(scoped.model.input_size) == tuple(Params().model.input_size)
    # and another stage's section, or an undeclared key of a declared one, is an error
    with pytest.raises(ConfigError, match="'augment' reads params split"):
        _ = scoped.split
    with pytest.raises(ConfigError, match=r"reads params model\.widths"):
        _ = scoped.model.widths


def test_derived_params_need_every_key_they_read() -> None:
    from alzstage.config import Params
    from alzstage.errors import ConfigError
    from alzstage.stages import ScopedParams

    # cv_report declares train.recipe and model.weights: Params.recipe reads exactly those
    assert ScopedParams(Params(), ("train.recipe", "model.weights"), "x").recipe == "scratch"
    with pytest.raises(ConfigError, match=r"model\.weights"):
        _ = ScopedParams(Params(), ("train",), "x").recipe
    # params.yaml's "validate" section is the attribute validate_
    assert ScopedParams(Params(), ("validate",), "x").validate_ == Params().validate_
