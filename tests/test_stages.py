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
    REPO_SRC,
    SRC,
    STAGES,
    Stage,
    code_deps,
    dvc_deps,
    entry_imports,
    import_closure,
    module_file,
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


def entries(dvcfile: str, spec: dict, key: str) -> dict[str, dict]:
    """A stage's ``outs``, ``metrics`` or ``plots``: repository path -> its options."""
    out = {}
    for entry in spec.get(key, []):
        for path, options in entry.items() if isinstance(entry, dict) else [(entry, {})]:
            out[repo_relative(dvcfile, spec, path)] = options or {}
    return out


def declared(stage: Stage) -> dict:
    rel, spec = dvc_stages()[stage.name]
    return {
        "file": rel,
        "cmd": spec["cmd"],
        "params": spec.get("params", []),
        "deps": [repo_relative(rel, spec, d) for d in spec.get("deps", [])],
        **{key: entries(rel, spec, key) for key in ("outs", "metrics", "plots")},
    }


def entry_file(stage: Stage) -> str:
    """The run module of ``stage`` as dvc.yaml lists code (``src/alzstage/...``)."""
    path = module_file(stage.entry.partition(":")[0])
    assert path is not None, stage.entry
    return str(path.relative_to(REPO_SRC))


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
def test_dvc_outs_metrics_and_plots_are_what_the_registry_says_the_stage_writes(
    stage: Stage,
) -> None:
    # given: what the stage writes, by the registry and by its dvc.yaml entry
    found = declared(stage)
    for key, expected in (("outs", stage.outs), ("metrics", stage.metrics), ("plots", stage.plots)):
        in_dvc = list(found[key])
        # then: the same paths, no more, no fewer
        assert sorted(in_dvc) == sorted(expected), drift(key, stage, in_dvc, list(expected))


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_an_uncached_stage_marks_every_output_cache_false(stage: Stage) -> None:
    # given: each output of the stage and its dvc.yaml options
    for key in ("outs", "metrics", "plots"):
        for path, options in declared(stage)[key].items():
            # then: cached exactly when the registry says the stage's outputs are
            assert options.get("cache", True) == stage.cached, f"{stage.name}: {path}"


def test_every_data_dependency_is_written_by_an_earlier_stage() -> None:
    # given: every registered output (a fold's, as its folder), with the stage writing it
    order = [s.name for s in STAGES]
    writer = {
        out.split("${item}")[0].rstrip("_/"): s.name
        for s in STAGES
        for out in (*s.outs, *s.metrics, *s.plots)
    }
    for stage in STAGES:
        for path in stage.reads:
            # then: each read is an output, inside one, or the folder of the folds' outputs
            writers = {
                name
                for out, name in writer.items()
                if path == out or path.startswith(out + "/") or out.startswith(path + "/")
            }
            assert writers, f"{stage.name} reads {path}, which no stage writes"
            assert all(order.index(w) < order.index(stage.name) for w in writers), (
                f"{stage.name} reads {path}, written by {sorted(writers)} (not earlier)"
            )


def test_a_stage_lists_its_outputs_as_paths_and_a_fold_stage_for_its_fold() -> None:
    from alzstage.stages import BY_NAME

    # given the evaluate stage and the per-fold cv_fold stage
    evaluate, fold = BY_NAME["evaluate"], BY_NAME["cv_fold"]
    # then evaluate's outputs include its metric and its plot data
    assert {"reports/headline.json", "reports/plots/confusion.csv"} <= set(evaluate.written())
    # and cv_fold's are those of the fold asked for
    assert fold.written(fold=3) == ["reports/cv/folds/fold_3"]
    with pytest.raises(ValueError, match="pass fold"):
        fold.written()


# Stages whose code deps hold another stage's run module, each with why; a change to that
# module re-runs both stages. Shrink this, never grow it (the test below fails on an
# entry that no longer applies, so that it is removed).
SHARED_RUN_MODULES: dict[tuple[str, str], str] = {}


def run_modules_in_deps() -> set[tuple[str, str]]:
    """(stage, other stage) for each stage whose code deps hold the other's run module."""
    found = set()
    for stage in STAGES:
        deps = set(code_deps(stage))
        for other in STAGES:
            if entry_file(other) != entry_file(stage) and entry_file(other) in deps:
                found.add((stage.name, other.name))
    return found


def test_no_stage_depends_on_another_stages_run_module() -> None:
    # given: each stage's code deps and every other stage's run module
    found = run_modules_in_deps()
    # then: none holds another's, but for the known, explained ones
    unexplained = sorted(found - set(SHARED_RUN_MODULES))
    assert not unexplained, (
        f"(stage, stage whose run module it imports): {unexplained}; move what both use "
        "out of the run module into a module of its own"
    )
    # and every explained one still applies (a fixed one is struck off the list)
    assert not sorted(set(SHARED_RUN_MODULES) - found), "remove these from SHARED_RUN_MODULES"


def test_each_stage_has_a_run_module_of_its_own() -> None:
    # given: the run modules of every stage; then: no two stages share one
    files = [entry_file(s) for s in STAGES]
    assert len(set(files)) == len(files), files


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
    # cv.fold imports train inside _fold_repeat, and StageRun only for type checkers
    fold = import_closure("alzstage.cv.fold", "run_cv_fold")
    assert {"alzstage.train.recipe", "alzstage.model.calibration"} <= fold
    assert "alzstage.model.network" in fold  # lazily, inside train/recipe.py
    assert "alzstage.cv.fold" in fold
    assert "alzstage.tracking" not in entry_imports("alzstage.cv.fold", "run_cv_fold")


def test_closure_of_one_run_function_leaves_out_its_neighbours_imports() -> None:
    # cv_split does not train: the training code run_cv_fold imports is not its dependency
    split = import_closure("alzstage.cv.split", "run_cv_split")
    assert "alzstage.data.split" in split
    assert "alzstage.train.recipe" not in split and "alzstage.evaluate.stage" not in split


def test_a_module_s_template_is_code_of_the_stages_that_import_the_module() -> None:
    # given: evaluate/card.py renders the model card from evaluate/card.md.j2, beside it
    by_name = {s.name: s for s in STAGES}
    template = "src/alzstage/evaluate/card.md.j2"
    # then: editing the template re-runs evaluate, and not a stage that never renders it
    assert template in code_deps(by_name["evaluate"])
    assert "src/alzstage/evaluate/card.py" in code_deps(by_name["evaluate"])
    assert template not in code_deps(by_name["train"])


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
