"""A tiny registered champion in seconds, for tests, the benchmark and a first look at the page.

Why: the serving code needs a real ``models:/alzstage-demo@champion`` (pyfunc, signature,
registry tags, alias) to be exercised honestly, but running the pipeline takes minutes.
This builds the project's own network at 32x32 with random weights, logs it through the
same :func:`alzstage.inference.pyfunc.log_pyfunc` the ``train`` stage uses, and registers it
with the same tags ``promote`` writes, into a store of its own. Its predictions mean
nothing; its contract is exactly the production one, input check, leak guard and
brain-level model included: they are fitted, as ``train`` fits them, on JPEG slices
from the demo generator (:func:`demo_training_files`); the brain model on the first
subjects of each class, its conformal sets calibrated on the last (:func:`demo_brain_model`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alzstage.tracking import ALIAS_CHAMPION, alias_uri, register_standalone, registered_name
from alzstage.tracking import scoped_tracking_uri as scoped_tracking_uri  # re-exported

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.model.brain import BrainModel

# The generator's own Kaggle-sized slices: 4 classes x 3 subjects x 8 adjacent slices.
DEMO_IMAGE_SIZE = (208, 176)
DEMO_SUBJECTS = 3
DEMO_SLICES = 8

DEMO_CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]
DEMO_TAGS = {
    "balanced_accuracy": "0.625",
    "macro_f1": "0.6",
    "accuracy": "0.7",
    "split_strategy": "subject",
    "split_leaky": "False",
    "split_fingerprint": "demo",
    # The demo dataset's champion (one per dataset), labelled synthetic wherever shown.
    "dataset": "demo",
    "data_source": "demo",
    "recipe": "untrained",
    "backbone": "resnet50",
    "weights": "none",
}


@dataclass(frozen=True)
class DemoChampion:
    """Where the demo model lives and what it is."""

    root: Path
    tracking_uri: str
    model_name: str  # the registered name: ``<promote.model_name>-demo``
    version: str
    classes: list[str]
    input_size: tuple[int, int]
    temperature: float

    @property
    def uri(self) -> str:
        return alias_uri(self.model_name, ALIAS_CHAMPION)


def demo_training_files(folder: Path, seed: int = 0) -> list[Path]:
    """The generator's JPEGs that the demo champion's input check is fitted on (made once)."""
    from alzstage.data.demo import generate_demo

    files = sorted(Path(folder).rglob("*.jpg"))
    if files:
        return files
    records = generate_demo(
        Path(folder),
        classes=DEMO_CLASSES,
        subjects_per_class=[DEMO_SUBJECTS] * len(DEMO_CLASSES),
        slices_per_subject=DEMO_SLICES,
        image_size=DEMO_IMAGE_SIZE,
        seed=seed,
    )
    return sorted(r.path for r in records)


def demo_brain_model(
    net: Any, files: list[Path], input_size: tuple[int, int], temperature: float
) -> BrainModel:
    """The brain model ``train`` would fit, on the demo slices: fitted on every class's
    first subjects, calibrated on each class's last (brains the fit never saw).

    The files are ``<class>/<subject>_s<k>.jpg`` as the generator writes them; the atrophy
    is measured on the full-size slices, the probabilities are the network's calibrated
    ones, so the logged model answers brains through the production path.
    """
    import numpy as np
    from PIL import Image

    from alzstage.config import BrainParams
    from alzstage.inference.brain import morphometry_rows
    from alzstage.inference.pyfunc import probabilities
    from alzstage.model.brain import brain_table, fit_from_params

    grays = []
    for f in files:
        with Image.open(f) as im:
            grays.append(np.asarray(im.convert("L")))
    subjects = np.array([f.stem.rsplit("_s", 1)[0] for f in files])
    y = np.array([DEMO_CLASSES.index(f.parent.name) for f in files])
    probs = probabilities(net, np.stack(grays), input_size, temperature)
    morph = morphometry_rows(grays)
    last = {c: max(subjects[y == c]) for c in np.unique(y)}
    held = np.array([s == last[c] for s, c in zip(subjects, y, strict=True)])
    tables = [brain_table(subjects[m], probs[m], morph[m], y[m]) for m in (~held, held)]
    return fit_from_params(*tables, DEMO_CLASSES, BrainParams())


def ensure_demo_champion(
    root: Path,
    model_name: str = "alzstage",
    input_size: tuple[int, int] = (32, 32),
    temperature: float = 1.5,
    seed: int = 0,
) -> DemoChampion:
    """Build (once; reused when ``root`` already holds one) a registered demo champion.

    The default ResNet50 backbone, because with random weights it is the one whose
    outputs still vary with the input (MobileNetV2's and EfficientNet's activations
    vanish to a uniform 0.25), so probability comparisons in tests mean something.
    """
    root = Path(root).resolve()
    marker = root / "demo_champion.json"
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    if marker.exists():
        info = json.loads(marker.read_text())
        return DemoChampion(
            root=root,
            tracking_uri=tracking_uri,
            model_name=info["model_name"],
            version=info["version"],
            classes=info["classes"],
            input_size=tuple(info["input_size"]),
            temperature=info["temperature"],
        )
    root.mkdir(parents=True, exist_ok=True)
    import keras

    from alzstage.config import ModelParams
    from alzstage.inference.ood import fit_from_files
    from alzstage.inference.pyfunc import log_pyfunc
    from alzstage.model.network import build_network

    keras.utils.set_random_seed(seed)  # the backbone's initialisers draw from the global seed
    params = ModelParams(backbone="resnet50", weights="none", input_size=input_size, dense_units=8)
    net = build_network(params, n_classes=len(DEMO_CLASSES), seed=seed)
    model_file = root / "model.keras"
    net.model.save(model_file)
    # As ``train`` does: fitted on the training images, stored beside the weights.
    files = demo_training_files(root / "training-slices", seed)
    check, thumbs = fit_from_files(files, input_size)
    brain = demo_brain_model(net.model, files, input_size, temperature)
    meta = {
        "classes": DEMO_CLASSES,
        "input_size": list(input_size),
        "temperature": temperature,
        "backbone": params.backbone,
        "input_check": check.model_dump(mode="json"),
        "brain_model": brain.to_dict(),
    }
    registered = registered_name(model_name, DEMO_TAGS["dataset"])
    version = register_standalone(
        tracking_uri,
        root / "mlruns",
        "alzstage-demo",
        lambda: log_pyfunc(model_file, meta, training_thumbnails=thumbs),
        registered,
        DEMO_TAGS,
        ALIAS_CHAMPION,
    )
    info = {
        "model_name": registered,
        "version": version,
        "classes": DEMO_CLASSES,
        "input_size": list(input_size),
        "temperature": temperature,
    }
    marker.write_text(json.dumps(info, indent=2))
    return ensure_demo_champion(root, model_name, input_size, temperature, seed)
