"""The model card: byte for byte the card the string renderer wrote before the template.

``golden/<case>.json`` holds a fixed report, split.json body, provenance and baselines;
``golden/<case>.md`` the card :func:`render_model_card` made of them at f9906b2, before
the card moved into a Jinja2 template. The cases cover every branch of the card: a leaky
split with its warning, a lost pixel baseline, brain level with and without conformal
sets, pseudo and mixed subject ids, one class only, no calibration, the temperature at
either end of its range, the demo run's own reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alzstage.evaluate.card import render_model_card

GOLDEN = Path(__file__).parent / "golden"
CASES = ("leaky_full", "honest_transfer", "uncalibrated_one_class", "cold_temperature_mixed")


@pytest.mark.parametrize("case", CASES)
def test_the_card_is_byte_identical_to_the_one_the_string_renderer_wrote(case: str) -> None:
    # given: the inputs of one captured card, and that card's bytes
    inputs = json.loads((GOLDEN / f"{case}.json").read_text())
    expected = (GOLDEN / f"{case}.md").read_bytes().decode("utf-8")
    # when
    card = render_model_card(**inputs)
    # then
    assert card == expected
