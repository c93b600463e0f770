"""Tests for params parsing: bad params.yaml fail at once, in one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alzstage.config import (
    REQUIRED_SECTIONS,
    BaseParams,
    ConfigError,
    DataParams,
    Params,
    load_params,
    parse_params,
)

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def sections(**overrides: dict) -> dict:
    """Every required section (empty = defaults), with some replaced."""
    return {s: {} for s in REQUIRED_SECTIONS} | overrides


def config_error(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message


def test_repository_params_parse() -> None:
    params = load_params(REPO_PARAMS)
    assert params.base.classes == Params().base.classes
    assert params.data.source in ("demo", "archive", "folder", "kaggle", "huggingface")


def leaves(tree: dict, prefix: str = "") -> dict:
    """``{"train.scratch.epochs": 30, ...}``: every path to a value that is not a mapping."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_model_defaults_are_the_repository_params_key_by_key() -> None:
    # given: params.yaml as shipped, and Params() built from config.py's defaults alone
    shipped = leaves(yaml.safe_load(REPO_PARAMS.read_text()))
    defaults = leaves(Params().model_dump(by_alias=True, mode="json"))
    # then: params.yaml is complete, and no default is a second opinion
    assert sorted(set(defaults) - set(shipped)) == [], "keys with a default, not in params.yaml"
    assert sorted(set(shipped) - set(defaults)) == [], "keys in params.yaml without a model"
    differ = {k: f"config.py {defaults[k]!r}, params.yaml {shipped[k]!r}" for k in defaults}
    assert {k: v for k, v in differ.items() if defaults[k] != shipped[k]} == {}


def test_empty_sections_take_the_defaults() -> None:
    params = parse_params(sections(base=None))  # a bare `base:` is also "defaults"
    assert params == Params()
    assert params.data.source == "demo"
    assert params.data.kaggle_dataset == "tourist55/alzheimers-dataset-4-class-of-images"
    assert params.base.height == 208 and params.base.width == 176


def test_missing_section() -> None:
    raw = sections()
    del raw["train"]
    message = config_error(raw)
    assert "missing section(s) ['train']" in message


def test_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match="expected a mapping of sections, got list"):
        parse_params([1, 2])  # type: ignore[arg-type]


def test_wrong_type_names_the_key() -> None:
    message = config_error(sections(train={"epochs": "many"}))
    assert message.startswith("params.yaml: train.epochs: ")
    assert "(got 'many')" in message


def test_unknown_literal_lists_allowed_values() -> None:
    message = config_error(sections(split={"strategy": "random"}))
    assert "split.strategy: must be one of" in message
    for allowed in ("'subject'", "'stratified'", "'source'"):
        assert allowed in message
    message = config_error(sections(data={"source": "s3"}))
    assert "data.source: must be one of" in message and "'huggingface'" in message


def test_unknown_key() -> None:
    message = config_error(sections(train={"epoch": 3}))
    assert "train.epoch: unknown key" in message
    assert "unknown key" in config_error(sections(data={"kaggle": "x"}))
    assert "unknown key" in config_error(sections(nonsense={}))


def test_several_problems_stay_on_one_line() -> None:
    message = config_error(sections(train={"epochs": 0}, split={"test_size": 2}))
    assert "train.epochs" in message and "split.test_size" in message


@pytest.mark.parametrize("raw", ["Mild_Demented", "mild demented", "MildDemented", "MILD-DEMENTED"])
def test_class_spellings_map_onto_the_class(raw: str) -> None:
    assert BaseParams().canonical_label(raw) == "MildDemented"


def test_class_aliases() -> None:
    base = BaseParams(class_aliases={"Moderate": "ModerateDemented"})
    assert base.canonical_label("moderate") == "ModerateDemented"
    assert base.canonical_label("Demented") is None
    message = config_error(sections(base={"class_aliases": {"AD": "Alzheimer"}}))
    assert "base: " in message and "'Alzheimer' is not one of classes" in message


def test_adni_style_class_list() -> None:
    raw = sections(
        base={"classes": ["CN", "MCI", "LMCI", "AD"]},
        data={"demo": {"subjects_per_class": [4, 3, 2, 2]}},
        train={"class_weight": {"AD": 2.0, "CN": 1.0}},
    )
    params = parse_params(raw)
    assert params.base.classes == ["CN", "MCI", "LMCI", "AD"]
    assert params.base.canonical_label("lmci") == "LMCI"
    assert params.base.canonical_label("mci") == "MCI"
    assert params.base.canonical_label("MildDemented") is None


def test_classes_must_be_unique_ignoring_spelling() -> None:
    message = config_error(sections(base={"classes": ["CN", "cn", "AD"]}))
    assert "base.classes" in message and "unique" in message


def test_demo_counts_must_match_classes() -> None:
    message = config_error(sections(base={"classes": ["CN", "MCI", "AD"]}))
    assert "data.demo.subjects_per_class needs one count per class" in message


def test_class_weight_keys_must_be_classes() -> None:
    message = config_error(sections(train={"class_weight": {"Healthy": 1.0}}))
    assert "train.class_weight has unknown classes ['Healthy']" in message


def test_archive_source_needs_a_path() -> None:
    message = config_error(sections(data={"source": "archive"}))
    assert "data.path is required when data.source is 'archive'" in message


@pytest.mark.parametrize("source", ["kaggle", "huggingface", "demo"])
def test_sources_without_a_path(source: str) -> None:
    assert DataParams(source=source).path is None


def test_sha256_pins_are_checked() -> None:
    assert "data.sha256: " in config_error(sections(data={"sha256": "abc"}))
    message = config_error(sections(data={"hf_files": {"x.parquet": "nothex"}}))
    assert "data.hf_files: " in message and "'x.parquet': sha256 must be 64 hex" in message
    digest = "AB" * 32
    assert DataParams(sha256=digest).sha256 == digest.lower()


def test_hf_files_are_bare_names() -> None:
    message = config_error(sections(data={"hf_files": {"data/x.parquet": None}}))
    assert "data.hf_files: " in message and "bare file name" in message
    message = config_error(sections(data={"source": "huggingface", "hf_files": {}}))
    assert "data.hf_files must list at least one parquet file" in message


def test_load_params_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("base: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text(yaml.safe_dump(sections(train={"epochs": "x"})))
    with pytest.raises(ConfigError, match=r"^params\.yaml: train\.epochs: "):
        load_params(bad)


def test_seed_must_be_non_negative() -> None:
    """numpy's default_rng([seed, ...]) (augment, split) rejects negative seeds."""
    assert "base.seed: " in config_error(sections(base={"seed": -1}))


@pytest.mark.parametrize(("test_size", "val_size"), [(0.5, 0.5), (0.6, 0.5), (0.9, 0.2)])
def test_split_fractions_that_leave_no_training_data_fail_at_load(
    test_size: float, val_size: float
) -> None:
    message = config_error(sections(split={"test_size": test_size, "val_size": val_size}))
    assert message.startswith("params.yaml: split: split.test_size (")
    assert f"split.test_size ({test_size}) + split.val_size ({val_size})" in message
    assert "lower one of them" in message
    assert "Value error" not in message and "(got {" not in message  # no pydantic noise


def test_cross_field_messages_do_not_dump_the_section() -> None:
    message = config_error(sections(train={"class_weight": {"Healthy": 1.0}}))
    assert "(got {" not in message and "Value error" not in message
