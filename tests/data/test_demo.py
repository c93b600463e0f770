"""The synthetic demo dataset: layout, determinism, subject structure, visible severity.

The pipeline's default run and most other tests rely on this data behaving like the
Kaggle archive (layout, image mode) and like real MRI (subjects whose adjacent slices are
near-duplicates, atrophy that grows with the class), so those properties are pinned here.
Images are kept small so the whole module runs in seconds.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alzstage.data.demo import generate_demo, max_slices_per_subject
from alzstage.data.manifest import RawRecord

CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]
SIZE = (72, 64)  # (height, width): not square, so a swapped axis would show
SLICES = 5


def _generate(out: Path, **overrides: object) -> list[RawRecord]:
    kwargs: dict[str, object] = {
        "classes": CLASSES,
        "subjects_per_class": [3, 3, 3, 3],
        "slices_per_subject": SLICES,
        "image_size": SIZE,
        "seed": 7,
    }
    kwargs.update(overrides)
    return generate_demo(out, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[RawRecord]]:
    out = tmp_path_factory.mktemp("demo") / "images"
    return out, _generate(out)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.float64)


def _by_subject(records: list[RawRecord]) -> dict[str, list[RawRecord]]:
    groups: dict[str, list[RawRecord]] = defaultdict(list)
    for r in records:
        groups[r.subject].append(r)
    return {s: sorted(rs, key=lambda r: r.path.name) for s, rs in groups.items()}


def test_layout_and_records(dataset: tuple[Path, list[RawRecord]]) -> None:
    out, records = dataset
    assert len(records) == 4 * 3 * SLICES
    assert records == sorted(records, key=lambda r: str(r.path))
    on_disk = sorted(p.resolve() for p in out.rglob("*") if p.is_file())
    assert [r.path for r in records] == on_disk
    assert sorted(p.name for p in out.iterdir()) == sorted(CLASSES)
    subjects_by_class: dict[str, set[str]] = defaultdict(set)
    for r in records:
        assert r.path.is_absolute()
        assert r.path.parent.name == r.label
        assert r.source_split == ""
        assert r.path.name.startswith(f"{r.subject}_s") and r.path.suffix == ".jpg"
        subjects_by_class[r.label].add(r.subject)
        with Image.open(r.path) as im:
            assert im.format == "JPEG"
            assert im.mode == "L"
            assert im.size == (SIZE[1], SIZE[0])  # PIL reports (width, height)
    assert all(len(s) == 3 for s in subjects_by_class.values())
    all_subjects = [s for ss in subjects_by_class.values() for s in ss]
    assert len(set(all_subjects)) == len(all_subjects)  # ids unique across classes


def test_brain_centred_on_black_background(dataset: tuple[Path, list[RawRecord]]) -> None:
    _, records = dataset
    img = _pixels(records[2].path)
    h, w = img.shape
    corners = np.concatenate([img[:4, :4], img[:4, -4:], img[-4:, :4], img[-4:, -4:]])
    assert corners.max() < 10
    ys, xs = np.nonzero(img > 20)
    assert abs(ys.mean() - h / 2) < 0.1 * h and abs(xs.mean() - w / 2) < 0.1 * w
    assert 0.3 < (img > 20).mean() < 0.9


def test_deterministic(tmp_path: Path, dataset: tuple[Path, list[RawRecord]]) -> None:
    out, records = dataset
    again = _generate(tmp_path / "images")
    assert [r.path.relative_to(tmp_path / "images") for r in again] == [
        r.path.relative_to(out) for r in records
    ]
    assert [(r.label, r.subject) for r in again] == [(r.label, r.subject) for r in records]
    for a, b in zip(records, again, strict=True):
        assert a.path.read_bytes() == b.path.read_bytes()


def test_other_seed_differs(tmp_path: Path, dataset: tuple[Path, list[RawRecord]]) -> None:
    _, records = dataset
    other = _generate(tmp_path / "images", subjects_per_class=[1, 1, 1, 1], seed=8)
    assert other[0].path.read_bytes() != records[0].path.read_bytes()


def test_adding_subjects_keeps_existing_ones(
    tmp_path: Path, dataset: tuple[Path, list[RawRecord]]
) -> None:
    """Each subject has its own random stream, so growing one class changes nothing else."""
    out, records = dataset
    grown = _generate(tmp_path / "images", subjects_per_class=[1, 4, 1, 1])
    mine = {r.path.relative_to(out): r.path.read_bytes() for r in records}
    for r in grown:
        rel = r.path.relative_to(tmp_path / "images")
        if rel in mine:
            assert r.path.read_bytes() == mine[rel]


def test_adjacent_slices_are_near_duplicates(dataset: tuple[Path, list[RawRecord]]) -> None:
    """Like real MRI runs: neighbours nearly identical, other subjects clearly less so."""
    _, records = dataset
    stacks = {s: [_pixels(r.path).ravel() for r in rs] for s, rs in _by_subject(records).items()}
    adjacent = [
        np.corrcoef(a, b)[0, 1] for st in stacks.values() for a, b in itertools.pairwise(st)
    ]
    subjects = sorted(stacks)
    across = [
        np.corrcoef(stacks[s][2], stacks[t][2])[0, 1]
        for i, s in enumerate(subjects)
        for t in subjects[i + 1 :]
    ]
    assert np.mean(adjacent) > 0.93
    assert min(adjacent) > 0.85
    assert np.mean(across) < np.mean(adjacent) - 0.08


def test_severity_is_visible(dataset: tuple[Path, list[RawRecord]]) -> None:
    """The share of dark (CSF) pixels inside the brain grows with the class, on average."""
    _, records = dataset
    per_class: dict[str, list[float]] = defaultdict(list)
    for r in records:
        img = _pixels(r.path)
        brain = img > 20
        dark = brain & (img < 0.35 * 255)
        per_class[r.label].append(dark.sum() / brain.sum())
    means = [float(np.mean(per_class[c])) for c in CLASSES]
    assert all(a < b for a, b in itertools.pairwise(means)), means


def test_a_brains_dark_fraction_rises_with_its_class_so_stages_can_be_told_apart_per_brain(
    dataset: tuple[Path, list[RawRecord]],
) -> None:
    """The class signal survives pooling a subject's slices, and neighbours still overlap.

    The pipeline's headline is brain-level (one prediction per subject), so the signal
    must be in the brains, not only in a few slices; but a generator that sorted every
    brain perfectly would hide the overlap real cohorts have.
    """
    from scipy.stats import spearmanr

    # given: 3 generated brains per class, each a run of adjacent slices
    _, records = dataset
    brains = _by_subject(records)

    # when: each brain is reduced to one number, the share of dark (CSF) pixels in its brain
    stage, dark = [], []
    for rs in brains.values():
        stack = np.stack([_pixels(r.path) for r in rs])
        brain = stack > 20
        stage.append(CLASSES.index(rs[0].label))
        dark.append(float((brain & (stack < 0.35 * 255)).sum() / brain.sum()))
    stage_arr, dark_arr = np.array(stage), np.array(dark)

    # then: the brains' order by dark fraction follows their class closely ...
    rho = spearmanr(stage_arr, dark_arr).statistic
    assert rho > 0.7, (rho, sorted(zip(stage, dark, strict=True)))
    # ... and each class's mean brain is darker than the class before it
    means = [float(dark_arr[stage_arr == k].mean()) for k in range(len(CLASSES))]
    assert all(a < b for a, b in itertools.pairwise(means)), means
    # ... but not perfectly: some brain is darker than a brain of the next class up
    assert any(
        dark_arr[stage_arr == k].max() > dark_arr[stage_arr == k + 1].min()
        for k in range(len(CLASSES) - 1)
    ), sorted(zip(stage, dark, strict=True))


def test_any_number_of_classes(tmp_path: Path) -> None:
    classes = ["CN", "MCI", "LMCI", "AD", "Severe"]
    records = generate_demo(
        tmp_path,
        classes=classes,
        subjects_per_class=[1, 1, 1, 1, 1],
        slices_per_subject=2,
        image_size=(32, 32),
        seed=0,
    )
    assert sorted({r.label for r in records}) == sorted(classes)
    assert len({r.subject for r in records}) == 5


@pytest.mark.parametrize(
    ("overrides", "argument"),
    [
        ({"subjects_per_class": [3, 3]}, "subjects_per_class"),
        ({"subjects_per_class": [3, 0, 3, 3]}, "subjects_per_class"),
        ({"slices_per_subject": max_slices_per_subject() + 1}, "slices_per_subject"),
        ({"slices_per_subject": 0}, "slices_per_subject"),
        ({"classes": ["OnlyOne"], "subjects_per_class": [1]}, "classes"),
        ({"image_size": (8, 64)}, "image_size"),
        ({"image_size": (64,)}, "image_size"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, overrides: dict[str, object], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        _generate(tmp_path, **overrides)
    assert not any(tmp_path.iterdir())  # nothing written before the check
