"""What every request of one server shares: its settings and the model cache.

Kept apart from :mod:`alzstage.serve.app` (assembly) and :mod:`alzstage.serve.routes`
(the endpoints) so both, and :mod:`alzstage.serve.batch`, can import it without a cycle.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from alzstage.config import NeuroParams, NiftiQCParams
from alzstage.tracking import champion_uri

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.config import Params, Paths
    from alzstage.inference.predict import LoadedModel

log = logging.getLogger("alzstage.serve")


@dataclass(frozen=True)
class ServeSettings:
    """Everything the app needs, resolved by the CLI (or a test) before it starts.

    ``classes`` and ``input_size`` are only used for a bare ``.keras`` model; a registry
    model carries its own in the pyfunc.
    """

    model_uri: str = champion_uri("alzstage", "demo")
    model_choice: str = ""  # why this model (predict.ModelChoice.reason), shown by /model
    tracking_uri: str | None = None
    registry_uri: str | None = None
    classes: list[str] = field(
        default_factory=lambda: [
            "NonDemented",
            "VeryMildDemented",
            "MildDemented",
            "ModerateDemented",
        ]
    )
    input_size: tuple[int, int] = (112, 96)
    low_confidence: float = 0.5
    max_file_bytes: int = 20 * 2**20
    max_request_bytes: int = 200 * 2**20
    max_files: int = 64
    max_pixels: int = 4096 * 4096
    # Decoded pixels (from the headers) of all images in one request together: four
    # maximum-size images, or 64 slices of 1024 x 1024. Without it, 64 files of 4096^2
    # passed every per-file cap and cost 1 GB (issue 16).
    max_request_pixels: int = 4 * 4096 * 4096
    # Prediction requests running at once, and waiting; more get 503. Two overlap one
    # request's decoding with another's inference; more would only share the same cores
    # while multiplying peak memory.
    max_concurrent: int = 2
    max_queued: int = 8
    # Origins besides this server's own that may POST (e.g. a team's dashboard), and
    # Host names besides loopback ones served over loopback (e.g. behind a local proxy).
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    # NIfTI volumes (POST /predict/volume): how they are cut into slices and judged.
    max_volume_bytes: int = 128 * 2**20
    neuro: NeuroParams = field(default_factory=NeuroParams)
    nifti_qc: NiftiQCParams = field(default_factory=NiftiQCParams)
    image_size: tuple[int, int] = (208, 176)

    @classmethod
    def for_project(
        cls, params: Params, paths: Paths, model_ref: str | None, **limits: Any
    ) -> ServeSettings:
        """The settings ``alzstage serve`` starts with: the model ``--model`` names (by
        default the configured dataset's champion), params.yaml's classes, sizes and
        volume rules, and the limits given on the command line.

        Raises :class:`~alzstage.errors.DatasetUnknown` when no model can be chosen.
        """
        from alzstage.inference.predict import choose_model, store_uris

        choice = choose_model(model_ref, params, paths)
        tracking_uri, registry_uri = store_uris(paths.root)
        return cls(
            model_uri=choice.uri,
            model_choice=choice.reason,
            tracking_uri=tracking_uri,
            registry_uri=registry_uri,
            classes=list(params.base.classes),
            input_size=tuple(params.model.input_size),
            low_confidence=params.evaluate.low_confidence,
            neuro=params.neuro,
            nifti_qc=params.validate_.nifti,
            image_size=tuple(params.base.image_size),
            **limits,
        )


class ModelCache:
    """Load the model once, on first use, and share it between requests.

    A failed load is not cached: after ``alzstage promote`` the next request succeeds
    without restarting the server. Inference holds a lock because one Keras model is
    not guaranteed to be safe under concurrent ``predict`` calls, and on a CPU box
    parallel calls would only compete for the same cores.
    """

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self._model: LoadedModel | None = None
        self._load_lock = threading.Lock()
        self.infer_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self) -> LoadedModel:
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    from alzstage.inference.predict import LoadedModel

                    s = self.settings
                    self._model = LoadedModel(
                        s.model_uri,
                        s.classes,
                        s.input_size,
                        tracking_uri=s.tracking_uri,
                        registry_uri=s.registry_uri,
                    )
                    log.info("loaded %s", self._model.info.label)
        return self._model
