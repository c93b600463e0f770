"""Imports inside alzstage run one way: no cycles, and packages only import downwards.

The layers, lowest first (a module may import its own layer and the layers below it):

    foundation  errors, config (+ params, paths), files, result, artifacts (with contract and
                pixel_store), tracking (and its tracking_* helpers), compute, the package root
    neuro       volumes to MNI slices; knows nothing of data sources or models
    data        sources, manifest, validate, images (the decode function), pixels, similarity,
                split, augment, demo
    model       what a trained model is: network, brain-level model, temperature, conformal
    inference   predict, prediction types, OOD, Grad-CAM, the MLflow model
    jobs        train, evaluate, promote: siblings, none imports another (SIBLINGS)
    cv          subject k-fold CV: trains and scores each fold
    serve       the HTTP app over inference
    shell       stages (the registry), cli and preflight, which check, parse and delegate

Inference never imports training or evaluation code, and evaluation reads what training
wrote through a contract in ``artifacts``, not through training's modules (issue #22).
Imports are read with ``ast`` from the source (nothing is
imported), at the top of a module or inside functions; ``if TYPE_CHECKING:`` imports
never run and are left out (:func:`alzstage.stages.imported_modules`).
"""

from __future__ import annotations

import pytest

from alzstage.stages import PACKAGE, SRC, imported_modules

LAYERS: tuple[tuple[str, ...], ...] = (
    (
        *("", "errors", "config", "params", "paths", "files", "result", "artifacts"),
        *("tracking", "tracking_store", "tracking_models", "tracking_tags", "compute"),
        *("contract", "pixel_store", "cv_files"),  # what artifacts re-exports
    ),
    ("neuro",),
    ("data",),
    ("model",),
    ("inference",),
    ("train", "evaluate", "promote"),
    ("cv",),
    ("serve",),
    ("stages", "cli", "preflight"),
)
# Packages of one layer that must not import each other.
SIBLINGS: tuple[str, ...] = ("train", "evaluate", "promote")
# Known upward imports, each with why it is still there. Shrink this, never grow it.
EXCEPTIONS: set[tuple[str, str]] = set()


def all_modules() -> list[str]:
    """Every module of the package, by dotted name (``alzstage.data.sources.archive``)."""
    names = []
    for f in sorted(SRC.rglob("*.py")):
        parts = [PACKAGE, *f.relative_to(SRC).with_suffix("").parts]
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def import_graph() -> dict[str, set[str]]:
    return {m: imported_modules(m) - {m} for m in all_modules()}


def layer_of(module: str) -> int:
    """The index in LAYERS of the first name under ``alzstage`` ('' for the root)."""
    top = module.split(".")[1] if "." in module else ""
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module}: in no layer of tests/test_layering.py; add {top!r} to one")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} imports {target}"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module) and (module, target) not in EXCEPTIONS
    ]


# --------------------------------------------------------------------------- the package


def test_no_import_cycles_among_alzstage_modules() -> None:
    assert cycles(import_graph()) == []


def test_every_package_imports_only_its_own_layer_and_below() -> None:
    assert upward_imports(import_graph()) == []


def test_every_exception_is_still_needed() -> None:
    graph = import_graph()
    assert [pair for pair in sorted(EXCEPTIONS) if pair[1] not in graph[pair[0]]] == []


def test_neuro_imports_nothing_from_data_model_or_serve() -> None:
    # the direction issue #17 fixed: neuro.slices read its grid from data.demo
    graph = import_graph()
    neuro = {m: graph[m] for m in graph if m.startswith("alzstage.neuro")}
    assert "alzstage.neuro.space" in neuro
    assert {t for targets in neuro.values() for t in targets if layer_of(t) > 1} == set()


# --------------------------------------------------------------------------- the checks


def test_a_cycle_is_found_through_imports_inside_functions() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(
    ("module", "target"),
    [
        ("alzstage.neuro.slices", "alzstage.data.demo"),
        ("alzstage.data.split", "alzstage.model.metrics"),
        ("alzstage.evaluate.stage", "alzstage.serve.app"),
        ("alzstage.config", "alzstage.neuro.qc"),
    ],
)
def test_an_import_up_the_layers_is_reported(module: str, target: str) -> None:
    graph = {module: {target}, target: set()}
    assert upward_imports(graph) == [f"{module} imports {target}"]


def test_imports_inside_functions_count_and_type_checking_ones_do_not() -> None:
    # stages.py imports StageResult only for type checkers; the nifti source's volume task
    # imports preprocess in a function
    assert "alzstage.result" not in imported_modules("alzstage.stages")
    assert "alzstage.neuro.preprocess" in imported_modules("alzstage.data.sources.volume_cache")


def top_package(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_train_evaluate_and_promote_never_import_each_other() -> None:
    graph = import_graph()
    crossing = [
        f"{m} imports {t}"
        for m, targets in sorted(graph.items())
        for t in sorted(targets)
        if top_package(m) in SIBLINGS
        and top_package(t) in SIBLINGS
        and top_package(m) != top_package(t)
    ]
    assert crossing == []


def test_inference_imports_no_training_evaluation_or_cv_code() -> None:
    graph = import_graph()
    jobs = {"train", "evaluate", "cv", "promote", "serve"}
    bad = [
        f"{m} imports {t}"
        for m, targets in sorted(graph.items())
        if top_package(m) in {"inference", "model"}
        for t in sorted(targets)
        if top_package(t) in jobs
    ]
    assert bad == []
