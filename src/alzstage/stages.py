"""The stage registry: every pipeline stage defined once.

A :class:`Stage` names the stage as ``dvc.yaml`` does, its ``alzstage`` command, its run
function, the params it reads (spelled as ``dvc.yaml`` lists them), the data it reads and
the files it writes (its ``outs``, ``metrics`` and ``plots``).
Its code is not written down anywhere: :func:`code_deps` computes it as the import
closure of the run function's module inside ``alzstage``. The CLI builds the stage
commands from :data:`STAGES`, and ``tests/test_stages.py`` checks ``dvc.yaml`` and
``cv/dvc.yaml`` against it, so a stage cannot silently miss a dependency again.

Nothing here imports a stage module: the run function is named by a string and loaded
only when the stage runs, so ``alzstage --help`` stays instant.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alzstage.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.result import StageResult

PACKAGE = "alzstage"
SRC = Path(__file__).resolve().parent  # src/alzstage
REPO_SRC = SRC.parent.parent  # what dvc.yaml's paths are relative to


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: what DVC runs, what it reads, and the function that does it."""

    name: str  # the stage's key in its dvc.yaml (cv_fold: the foreach template)
    command: str  # ``alzstage <command>``
    entry: str  # ``module:function``, called as function(params, paths[, fold][, tracker])
    help: str
    params: tuple[str, ...]  # params.yaml sections or keys, as dvc.yaml lists them
    reads: tuple[str, ...] = ()  # data and reports it reads, as dvc.yaml lists them
    # What it writes, as dvc.yaml lists them: ``outs``, ``metrics`` and ``plots``
    # (cv_fold: ``${item}`` is the fold id).
    outs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    cached: bool = True  # False: every output is ``cache: false`` (committed with git)
    dvcfile: str = "dvc.yaml"
    per_fold: bool = False  # one run per id in cv.folds: the command takes --fold
    takes_tracker: bool = False  # the function logs as it goes: it gets the StageRun

    def written(self, fold: int | None = None) -> list[str]:
        """Every output path, repository-relative (``${item}``: ``fold``, for cv_fold)."""
        paths = [*self.outs, *self.metrics, *self.plots]
        if self.per_fold:
            if fold is None:
                raise ValueError(f"stage {self.name!r} writes per fold: pass fold")
            paths = [p.replace("${item}", str(fold)) for p in paths]
        return paths

    def function(self) -> Callable[..., StageResult]:
        """The run function, imported now (this is where TensorFlow & co. get loaded)."""
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(module), name)

    def run(self, params: Any, paths: Any, tracker: Any, **options: Any) -> StageResult:
        """Call the run function with what it takes: params, paths, --fold, the run.

        The function gets :class:`ScopedParams`: only what this entry's ``params``
        declare (and so what dvc.yaml tracks). Reading any other section is an error at
        the read, naming the stage and the key, so a stage cannot quietly depend on a
        param whose change would not re-run it.
        """
        extra = {"tracker": tracker} if self.takes_tracker else {}
        scoped = ScopedParams(params, self.params, self.name)
        return self.function()(scoped, paths, **options, **extra)


def _declares(declared: Iterable[str], key: str) -> bool:
    """Is ``key`` (``section`` or ``section.field``) inside what ``declared`` lists?"""
    return any(key == d or key.startswith(d + ".") for d in declared)


#: Derived values and the keys they read (``Params.recipe``, ``ModelParams.resolved_backbone``).
DERIVED: dict[str, tuple[str, ...]] = {
    "recipe": ("train.recipe", "model.weights"),
    "resolved_backbone": ("model.backbone", "model.weights"),
}
ATTRIBUTE = {"validate": "validate_"}  # params.yaml name -> Params attribute


class _Scoped:
    """Attribute access to ``target`` limited to ``declared`` keys under ``prefix``."""

    def __init__(self, target: Any, declared: tuple[str, ...], stage: str, prefix: str) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_declared", declared)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        key = self._prefix + ("validate" if name == "validate_" else name)
        needs = DERIVED.get(name, (key,))
        missing = [k for k in needs if not _declares(self._declared, k)]
        value = getattr(self._target, ATTRIBUTE.get(name, name))
        if not missing:
            return value
        deeper = [d for d in self._declared if d.startswith(key + ".")]
        if deeper and name not in DERIVED:
            return _Scoped(value, self._declared, self._stage, key + ".")
        raise ConfigError(
            f"stage {self._stage!r} reads params {missing[0]}, which it does not declare; "
            "add it to the stage's params in src/alzstage/stages.py and dvc.yaml"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("params are read-only")


class ScopedParams(_Scoped):
    """:class:`~alzstage.config.Params` as one stage may read them (see :meth:`Stage.run`)."""

    def __init__(self, params: Any, declared: tuple[str, ...], stage: str) -> None:
        super().__init__(params, tuple(declared), stage, "")


STAGES: tuple[Stage, ...] = (
    Stage(
        "download",
        "download",
        "alzstage.data.download:run_download",
        "Fetch the configured source (data.source) into data/raw with a manifest.",
        # compute: where nifti volumes are preprocessed (changes no output; cached volumes
        # are reused when it changes)
        params=("base", "data", "neuro.preprocess", "compute"),
        outs=("data/raw",),
    ),
    Stage(
        "validate",
        "validate",
        "alzstage.data.validate:run_validate",
        "Check the manifest and every image (great-expectations); fail or quarantine.",
        params=("base", "validate"),
        reads=("data/raw",),
        outs=(
            "data/interim/manifest.csv",
            "reports/validation",
            "reports/validation.json",  # counts per check and class (headline: valid)
        ),
    ),
    Stage(
        "decode",
        "decode",
        "alzstage.data.decode:run_decode",
        "Decode every validated image once: network inputs, thumbnails, input-check features.",
        # the network's input size and the split's thumbnail side
        params=("model.input_size", "split.thumb_size"),
        # the only stage after validate that opens data/raw
        reads=("data/interim/manifest.csv", "data/raw"),
        outs=("data/processed/pixels",),  # network inputs, thumbnails, input-check features
    ),
    Stage(
        "split",
        "split",
        "alzstage.data.split_stage:run_split",
        "Split into train/val/test by subject (default), slice (leaky) or source.",
        # data.source with data.name: the dataset's registry name
        params=("base", "split", "data.source", "data.name"),
        # thumbnails (from decode) recover subjects and measure leakage
        reads=("data/interim/manifest.csv", "data/processed/pixels"),
        outs=("data/processed/split.csv", "reports/split.json"),
    ),
    Stage(
        "augment",
        "augment",
        "alzstage.data.augment:run_augment",
        "Materialise augmented views of the training split only.",
        params=("base", "augment", "model.input_size"),
        reads=("data/processed/split.csv", "data/processed/pixels"),
        outs=("data/processed/augmented", "reports/figures/augment_preview.png"),
    ),
    Stage(
        "train",
        "train",
        "alzstage.train.stage:run_train_stage",
        "Train the classifier; log it to MLflow with a signature; write models/train_run.json.",
        # augment: online augmentation ranges (train.scratch.online_augment)
        # brain: the brain-level model fitted after the network
        params=("base", "model", "train", "augment", "brain"),
        # val slices, and the input check's measurements of the train slices
        reads=("data/processed/augmented", "data/processed/split.csv", "data/processed/pixels"),
        outs=(
            "models/model.keras",
            "models/train_run.json",
            "models/brain_model.json",  # the brain-level model and its conformal calibration
            "reports/train.json",  # recipe, epochs, temperature, timings
        ),
        plots=("reports/plots/train_history.csv",),
        takes_tracker=True,
    ),
    Stage(
        "evaluate",
        "evaluate",
        "alzstage.evaluate.stage:run_evaluate_stage",
        "Score the trained model on the test split; write reports/headline.json and detail.",
        params=("base", "data", "model", "evaluate", "brain"),
        reads=(
            "models/model.keras",
            "models/train_run.json",
            "models/brain_model.json",
            "data/processed/split.csv",
            "reports/split.json",
            "reports/validation.json",  # the validation counts in the headline
            "data/processed/pixels",  # test slices and the baselines' training thumbnails
        ),
        outs=(
            "reports/metrics.json",  # every test figure; promote reads it
            "reports/predictions_test.csv",
            "reports/model_card.md",
            "reports/baselines.json",
            *(f"reports/plots/{curve}.csv" for curve in ("roc", "pr", "reliability")),
            *(
                f"reports/figures/{figure}.png"
                for figure in ("confusion", "roc", "pr", "reliability", "gradcam_gallery")
            ),
        ),
        metrics=("reports/headline.json",),
        plots=("reports/plots/confusion.csv",),
    ),
    Stage(
        "promote",
        "promote",
        "alzstage.promote:run_promote",
        "Register the new model as challenger; move champion only if it is better.",
        params=("promote",),
        reads=("models/train_run.json", "reports/metrics.json"),
        outs=("reports/promotion.json",),
        cached=False,  # the registry's answer, not a cacheable product
    ),
    # Subject k-fold cross-validation: cv/dvc.yaml (its stages run with wdir: ..)
    Stage(
        "cv_split",
        "cv-split",
        "alzstage.cv.split:run_cv_split",
        "Assign every subject to one of cv.folds test folds (plus val subjects per fold).",
        params=("base", "split", "cv"),
        reads=("data/processed/split.csv",),
        dvcfile="cv/dvc.yaml",
        outs=("data/processed/cv/folds.csv", "reports/cv/folds.json"),
        cached=False,  # every CV output: see cv/dvc.yaml
    ),
    Stage(
        "cv_fold",
        "cv-fold",
        "alzstage.cv.fold:run_cv_fold",
        "Train on one fold's training subjects and predict its test subjects.",
        params=("base", "model", "train", "augment", "cv"),
        reads=("data/processed/cv/folds.csv", "data/processed/pixels"),
        dvcfile="cv/dvc.yaml",
        outs=("reports/cv/folds/fold_${item}",),
        cached=False,
        per_fold=True,
        takes_tracker=True,
    ),
    Stage(
        "cv_report",
        "cv-report",
        "alzstage.cv.report:run_cv_report",
        "Pool the folds' out-of-fold predictions: CIs, per-fold spread, baselines.",
        # train.recipe and model.weights: the report names the recipe (Params.recipe)
        params=("base", "cv", "brain", "train.recipe", "model.weights"),
        reads=(
            "data/processed/cv/folds.csv",
            "reports/cv/folds.json",
            "reports/cv/folds",  # every cv_fold stage's output
        ),
        dvcfile="cv/dvc.yaml",
        outs=(
            "reports/cv/report.json",
            "reports/cv/predictions_oof.csv",
            "reports/cv/brains_oof.csv",
            "reports/cv/metrics.json",  # the CV's headline: an out, not a DVC metric
        ),
        cached=False,
    ),
)

BY_NAME = {s.name: s for s in STAGES}


# --------------------------------------------------------------------------- code deps


def module_file(module: str) -> Path | None:
    """The file of an ``alzstage`` module (``alzstage.data.split``), or None if not one."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = SRC.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(nodes: Iterable[ast.AST]) -> set[str]:
    """The ``alzstage`` modules that ``nodes`` import, at any depth.

    Imports under ``if TYPE_CHECKING:`` never run and are left out. ``from alzstage.model
    import build`` names the module ``alzstage.model.network``.
    """
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if module_file(sub) else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for node in nodes:
        visit(node)
    return {m for m in found if module_file(m)}


def _parse(module: str) -> ast.Module:
    path = module_file(module)
    if path is None:
        raise ValueError(f"{module}: not a module of {PACKAGE} (looked under {SRC})")
    return ast.parse(path.read_text(), filename=str(path))


def imported_modules(module: str) -> set[str]:
    """Every ``alzstage`` module that ``module`` imports, at the top or inside functions."""
    return _imports([_parse(module)])


def entry_imports(module: str, function: str) -> set[str]:
    """The modules imported by what ``function`` can reach inside its own module.

    That is the module's top-level statements (they run on import) plus ``function`` and
    every top-level function or class those name, transitively. So three stages whose
    run functions share ``crossval.py`` do not each depend on the others' lazy imports.
    """
    tree = _parse(module)
    defined = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    defs = {n.name: n for n in tree.body if isinstance(n, defined)}
    if function not in defs:
        raise ValueError(f"{module}: defines no {function}")
    reached = [n for n in tree.body if not isinstance(n, defined)]
    todo = [defs[function]]
    names = {function}
    while todo:
        node = todo.pop()
        reached.append(node)
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and sub.id in defs and sub.id not in names:
                names.add(sub.id)
                todo.append(defs[sub.id])
    return _imports(reached)


def import_closure(module: str, function: str | None = None) -> set[str]:
    """``module`` and every ``alzstage`` module it imports, transitively.

    With ``function``, ``module`` itself counts only what that function reaches
    (:func:`entry_imports`). Every other module counts whole: a lazy import anywhere in it
    counts, even in a function this stage never calls. That can only add a dependency (a
    needless re-run), never miss one.
    """
    seen = {module}
    todo = list(entry_imports(module, function) if function else imported_modules(module))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported_modules(name) - seen)
    return seen


def code_deps(stage: Stage) -> list[str]:
    """The source files a stage runs, as dvc.yaml lists them (``src/alzstage/...``).

    Package ``__init__.py`` files are left out: they hold docstrings and a version string
    only (``tests/test_stages.py`` keeps it that way), so no stage output depends on them.
    A module's Jinja2 templates are code too: the files beside it named after it
    (``evaluate/card.py`` renders ``evaluate/card.md.j2``).
    """
    module, _, function = stage.entry.partition(":")
    found = {module_file(m) for m in import_closure(module, function)}
    files = {f for f in found if f is not None and f.name != "__init__.py"}
    files |= {t for f in files for t in f.parent.glob(f"{f.stem}.*.j2")}
    return sorted(str(f.relative_to(REPO_SRC)) for f in files)


def dvc_deps(stage: Stage) -> list[str]:
    """Everything the stage's dvc.yaml entry must list under ``deps``: data, then code."""
    return [*stage.reads, *code_deps(stage)]
