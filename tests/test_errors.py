"""The error hierarchy: one module, and a class only where a caller tells it apart."""

from __future__ import annotations

import ast
import builtins
import inspect
import pickle
from pathlib import Path

from alzstage import errors
from alzstage.errors import AlzstageError, ImageReadError, VolumeError, VolumeTooLarge

SRC = Path(__file__).resolve().parents[1] / "src" / "alzstage"
KEPT = {
    name: cls
    for name, cls in vars(errors).items()
    if inspect.isclass(cls) and issubclass(cls, AlzstageError)
}
BUILTIN_ERRORS = {
    n for n, c in vars(builtins).items() if inspect.isclass(c) and issubclass(c, BaseException)
}


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text())) for p in sorted(SRC.rglob("*.py"))]


def _names(node: ast.expr | None) -> set[str]:
    """The class names an ``except`` clause or a base list mentions."""
    if node is None:
        return set()
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
    }


def test_every_exception_class_is_defined_in_the_errors_module() -> None:
    # given every class statement in the package
    elsewhere = []
    for path, tree in _modules():
        if path.name == "errors.py" and path.parent == SRC:
            continue
        # when one derives from an alzstage error or a builtin exception
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = set().union(*(_names(b) for b in node.bases)) if node.bases else set()
                if bases & (set(KEPT) | BUILTIN_ERRORS):
                    elsewhere.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}")
    # then there is none: errors.py is the one place to look
    assert elsewhere == []


def test_every_error_class_is_caught_by_name_or_has_its_own_http_status() -> None:
    # given the names every except clause in the package catches
    caught = set()
    for _, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler):
                caught |= _names(node.type)
    # when a class is neither caught by name nor answered with a status its base lacks
    undistinguished = [
        name
        for name, cls in KEPT.items()
        if name not in caught
        and getattr(cls, "status", None) == getattr(cls.__mro__[1], "status", None)
    ]
    # then it should not exist (its raise sites would use the nearest kept base)
    assert undistinguished == []


def test_every_error_class_says_who_catches_it() -> None:
    # given the kept classes, when their docstrings are read, then each names a catcher
    # or its HTTP status (what makes it worth a class)
    vague = [
        name
        for name, cls in KEPT.items()
        if not cls.__doc__ or not any(w in cls.__doc__ for w in ("Caught", "caught", "HTTP"))
    ]
    assert vague == []


def test_a_volume_error_keeps_its_check_code_across_processes() -> None:
    # given volume errors as the preprocessing raises them (Dask pickles them to the client)
    raised = [
        VolumeError("scan.nii.gz: NaN voxels", check="nonfinite"),
        VolumeTooLarge("scan.nii.gz: 640x640x640"),
    ]
    # when they travel through pickle
    back = [pickle.loads(pickle.dumps(e)) for e in raised]
    # then type, message, reason code and HTTP status survive
    assert [(type(e), str(e), e.check, e.status) for e in back] == [
        (VolumeError, "scan.nii.gz: NaN voxels", "nonfinite", 422),
        (VolumeTooLarge, "scan.nii.gz: 640x640x640", "too_large", 413),
    ]
    assert isinstance(back[0], ImageReadError)
