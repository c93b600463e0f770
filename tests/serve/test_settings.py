"""``ServeSettings``' defaults are the pipeline's, not a third copy that can drift."""

from __future__ import annotations

from pathlib import Path

from alzstage.config import load_params
from alzstage.serve.state import ServeSettings
from alzstage.tracking import champion_uri

REPO = Path(__file__).resolve().parents[2]


def test_serve_defaults_agree_with_the_shipped_params_yaml() -> None:
    # given the repository's params.yaml
    params = load_params(REPO / "params.yaml")
    # when a server is set up without a project (create_app() with no settings)
    settings = ServeSettings()
    # then every value params.yaml also holds is params.yaml's
    assert settings.classes == list(params.base.classes)
    assert settings.input_size == tuple(params.model.input_size)
    assert settings.image_size == tuple(params.base.image_size)
    assert settings.low_confidence == params.evaluate.low_confidence
    assert settings.neuro == params.neuro
    assert settings.nifti_qc == params.validate_.nifti
    assert settings.model_uri == champion_uri(params.promote.model_name, "demo")


def test_each_server_gets_its_own_list_of_classes() -> None:
    # given two servers' default settings
    first, second = ServeSettings(), ServeSettings()
    # when one list is changed in place
    first.classes.append("Other")
    # then the other server's classes are untouched
    assert "Other" not in second.classes
