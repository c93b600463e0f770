"""The model card (``reports/model_card.md``), generated from the evaluation report.

Written by hand, a model card drifts from the numbers within a week; generated from the
same ``metrics.json`` that DVC tracks, it cannot. It states what a reader needs before
trusting any number: where the data came from, how the test set was separated from
training (and whether that leaks), the uncertainty of every headline metric, and what
the model must not be used for.

The words live in the Jinja2 template ``card.md.j2`` beside this module; this module
reads the reports into a :class:`~alzstage.evaluate.card_context.CardContext` (every
figure formatted as the card prints it, every choice the card makes already taken) and
renders the template with it. A sentence is edited in the template; a number's format or
a rule (which classes count as few, when a temperature is at its bound) here.
"""

from __future__ import annotations

from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alzstage.evaluate.card_context import (
    Baselines,
    Binary,
    BrainLevel,
    BrainVerdict,
    Calibration,
    CardContext,
    Conformal,
    DataFacts,
    Figure,
    Limitations,
    ModelFacts,
    Performance,
    SubjectLevel,
)
from alzstage.model.calibration import TEMPERATURE_BOUNDS

if TYPE_CHECKING:
    import jinja2

#: The template, beside this module (package data; the evaluate stage depends on it).
TEMPLATE = "card.md.j2"
RESEARCH_NOTICE = (
    "**Research use only. This model is not a medical device and must not be used for "
    "diagnosis, screening, triage or any clinical decision.**"
)
LEAKAGE_CAVEAT = (
    "**Leakage caveat:** the test split was made with a LEAKY protocol (`{strategy}`): "
    "slices of the same brain are on both sides of the train/test boundary, so the test "
    "scores below are inflated and do not estimate performance on new patients."
)
FEW_SUBJECTS = 3  # below this many test subjects a class's numbers are anecdotes
# The brain-level predictors brain_test_report scores, in the card's words and order.
BRAIN_PREDICTORS = {
    "brain_model": "brain model",
    "morphometric": "morphometric baseline (CSF fraction only)",
    "pool": "fixed pooling rule (mean log-probability)",
    "majority": "majority class",
}
_SCORES = ("balanced_accuracy", "accuracy", "macro_f1")  # the baselines table's columns


# --------------------------------------------------------------------------- formats


def _num(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{float(v):.{digits}f}"


def _ci(block: dict | None, key: str) -> str:
    iv = (block or {}).get(key)
    return "n/a" if not iv else f"{iv['low']:.3f} - {iv['high']:.3f}"


def _diff(cmp: dict | None) -> tuple[str, str]:
    """A paired difference and its interval as the table shows them."""
    if not cmp:
        return "", ""
    d, iv = cmp.get("difference"), cmp.get("ci")
    diff = "n/a" if d is None else f"{d:+.3f}"
    return diff, "n/a" if not iv else f"{iv['low']:+.3f} to {iv['high']:+.3f}"


def _figure(block: dict, key: str, ci: dict | None) -> Figure:
    return Figure(_num(block.get(key)), _ci(ci, key))


# --------------------------------------------------------------------------- sections


def _model(classes: list[str], cal: dict, provenance: dict) -> ModelFacts:
    return ModelFacts(
        classes=classes,
        backbone=str(provenance.get("backbone", "?")),
        weights=str(provenance.get("weights", "?")),
        input_size="x".join(str(v) for v in provenance.get("input_size", [])),
        recipe=str(provenance.get("recipe", "?")),
        temperature=_num(cal.get("temperature"), 3),
        temperature_source=str(cal.get("temperature_source", "n/a")),
        model_md5=str(provenance.get("model_md5", "")),
        seed=str(provenance.get("seed", "?")),
    )


def _data(report: dict, split_info: dict, provenance: dict, classes: list[str]) -> DataFacts:
    counts = split_info.get("counts", {})
    subjects = split_info.get("subjects", {})
    rows = []
    for s in ("train", "val", "test") if counts else ():
        c, n = counts.get(s, {}), subjects.get(s, {})
        cells = [f"{c.get(k, 0)} / {n.get(k, 0)}" for k in [*classes, "total"]]
        rows.append([s, *cells])
    return DataFacts(
        source=str(provenance.get("data_source", "?")),
        reference=str(provenance.get("data_reference", "")),
        n_images=str(split_info.get("n_images", "?")),
        subject_ids=str(split_info.get("subject_ids", "?")),
        fingerprint=str(report.get("split_fingerprint", "")),
        strategy=str(report.get("split_strategy", "?")),
        leaky=bool(report.get("split_leaky")),
        test_size=str(split_info.get("test_size", "?")),
        val_size=str(split_info.get("val_size", "?")),
        split_rows=rows,
    )


def _performance(report: dict, classes: list[str]) -> Performance:
    """Slice-level test scores with their intervals, overall and per class."""
    ci = report.get("ci", {})
    per_class, rec_ci = report.get("per_class", {}), ci.get("recall", {})
    roc, pr = report.get("roc_auc", {}), report.get("pr_auc", {})
    rows = []
    for c in classes:
        m = per_class.get(c, {})
        rows.append(
            [
                c,
                *(_num(m.get(k)) for k in ("precision", "recall")),
                _ci(rec_ci, c),
                _num(m.get("f1")),
                _num(roc.get("per_class", {}).get(c)),
                _num(pr.get("per_class", {}).get(c)),
                str(m.get("support", 0)),
            ]
        )
    return Performance(
        n_test=str(report.get("n_test", 0)),
        method=str(ci.get("method", "bootstrap")),
        n_resamples=str(ci.get("n_resamples", "?")),
        n_units=str(ci.get("n_units", "?")),
        unit=str(ci.get("unit", "image")),
        seed=str(ci.get("seed", "?")),
        balanced_accuracy=_figure(report, "balanced_accuracy", ci),
        macro_f1=_figure(report, "macro_f1", ci),
        accuracy=_figure(report, "accuracy", ci),
        kappa=_num(report.get("quadratic_weighted_kappa")),
        roc_auc=_num(roc.get("macro")),
        pr_auc=_num(pr.get("macro")),
        class_rows=rows,
    )


def _subject(sub: dict, classes: list[str]) -> SubjectLevel | None:
    """The fixed pooling rule's subject-level scores (nothing without subject ids)."""
    if not sub.get("available"):
        return None
    sci = sub.get("ci", {})
    per = sub.get("n_subjects_per_class", {})
    return SubjectLevel(
        aggregation=str(sub.get("aggregation", "")),
        n_subjects=str(sub.get("n_subjects", 0)),
        subject_ids=str(sub.get("subject_ids", "?")),
        balanced_accuracy=_figure(sub, "balanced_accuracy", sci),
        macro_f1=_figure(sub, "macro_f1", sci),
        accuracy=_figure(sub, "accuracy", sci),
        kappa=_num(sub.get("quadratic_weighted_kappa")),
        per_class=", ".join(f"{c} {per.get(c, 0)}" for c in classes),
    )


def _brain_verdict(name: str, cmp: dict | None) -> BrainVerdict:
    """Beats: the whole 95% interval of the paired difference is above 0; worse: below 0;
    otherwise the interval includes 0 and the brain model "does not beat" it."""
    what = BRAIN_PREDICTORS.get(name, name).split(" (")[0]
    cmp = cmp or {}
    iv = cmp.get("ci")
    if not iv:
        return BrainVerdict(what, "no interval")
    kind = "beats" if iv["low"] > 0 else "worse" if iv["high"] < 0 else "includes 0"
    span = f"{iv['low']:+.3f} to {iv['high']:+.3f}"
    return BrainVerdict(what, kind, f"{cmp['difference']:+.3f}", span)


def _conformal(conformal: dict) -> Conformal:
    """The conformal sets' coverage on the test brains."""
    if not conformal or conformal.get("available") is False:
        return Conformal(False, reason=str((conformal or {}).get("reason", "no calibration")))
    chosen = conformal.get("selected", "marginal")
    cov = conformal.get(chosen, {})
    return Conformal(
        True,
        chosen=str(chosen),
        nominal=_num(cov.get("nominal", conformal.get("confidence")), 2),
        coverage=_num(cov.get("coverage")),
        n=str(cov.get("n", "?")),
        mean_set_size=_num(cov.get("mean_set_size"), 2),
        calibration_brains=str(conformal.get("calibration_brains", "?")),
    )


def _binary(binary: dict) -> Binary | None:
    """The screening view (not demented vs any dementia)."""
    if not binary:
        return None
    ci = binary.get("ci", {})
    return Binary(
        n_brains=str(binary.get("n_brains", "?")),
        **{k: _figure(binary, k, ci) for k in ("sensitivity", "specificity", "roc_auc")},
    )


def _brain(brain: dict) -> BrainLevel:
    """The brain model against the morphometric baseline and the fixed pooling rule on
    the same test brains, its conformal sets' coverage, and the binary view."""
    if brain.get("available") is False:
        return BrainLevel(False, reason=str(brain.get("reason", "no brains")))
    scores = brain.get("scores", {})
    predictors = scores.get("predictors", {})
    rows = []
    for name, label in BRAIN_PREDICTORS.items():
        if name not in predictors:
            continue
        p = predictors[name]
        ci, cmp = p.get("ci", {}), p.get("vs_reference", {})
        main, every = "balanced_accuracy_main", "balanced_accuracy"
        rows.append(
            [
                label,
                _num(p.get(main)),
                _ci(ci, main),
                _num(p.get(every)),
                _ci(ci, every),
                *_diff(cmp.get(main)),
                *_diff(cmp.get(every)),
            ]
        )
    return BrainLevel(
        True,
        aggregator=str(brain.get("aggregator", "?")),
        features=", ".join(brain.get("features", [])) or "?",
        n_brains=str(brain.get("n_brains", "?")),
        n_resamples=str(scores.get("n_resamples", "?")),
        main=", ".join(scores.get("main_classes", [])) or "?",
        rows=rows,
        verdicts=[
            _brain_verdict(n, predictors[n].get("vs_reference", {}).get("balanced_accuracy_main"))
            for n in ("morphometric", "pool")
            if n in predictors
        ],
        conformal=_conformal(brain.get("conformal", {})),
        binary=_binary(brain.get("binary", {})),
    )


def _baselines(baselines: dict) -> Baselines:
    """Each baseline's scores and whether the network beats it, verdicts verbatim: a
    network that does not beat the pixel baseline is reported as such."""
    net = baselines.get("network", {})
    blocks = baselines.get("baselines", {})
    any_cmp = next(iter(blocks.values()), {}).get("network_minus_baseline", {})
    rows = [["network", *(_num(net.get(k)) for k in _SCORES), "", "", ""]]
    for name, b in blocks.items():
        cmp = b.get("network_minus_baseline", {})
        diff, iv = cmp.get("difference"), cmp.get("ci")
        rows.append(
            [
                f"{name}: {b.get('description', '')}",
                *(_num(b.get(k)) for k in _SCORES),
                "n/a" if diff is None else f"{diff:+.3f}",
                "n/a" if not iv else f"{iv['low']:+.3f} to {iv['high']:+.3f}",
                "yes" if b.get("beats") else "**NO**",
            ]
        )
    return Baselines(
        n_test=str(baselines.get("n_test", "?")),
        fitted="n_train" in baselines,  # absent when pooled out-of-fold predictions compared
        n_train=str(baselines.get("n_train", "")),
        n_pixels=str(baselines.get("n_pixels", "?")),
        method=str(any_cmp.get("method", "paired bootstrap")),
        n_units=str(any_cmp.get("n_units", "?")),
        unit=str(any_cmp.get("unit", "unit")),
        n_resamples=str(any_cmp.get("n_resamples", "?")),
        level=f"{any_cmp.get('level', 0.95):.0%}",
        rows=rows,
        verdicts=[b["verdict"] for b in blocks.values()],
    )


def _calibration(cal: dict) -> Calibration | None:
    if not cal:
        return None
    before, after = cal.get("uncalibrated", {}), cal.get("calibrated", {})
    return Calibration(
        temperature=_num(cal.get("temperature"), 3),
        source=str(cal.get("temperature_source", "")),
        n_bins=str(cal.get("n_bins", "?")),
        rows=[[k, _num(before.get(k), 4), _num(after.get(k), 4)] for k in ("ece", "nll", "brier")],
    )


def _limitations(report: dict, split_info: dict, provenance: dict) -> Limitations:
    sub = report.get("subject_level", {})
    absent = report.get("classes_absent_from_test") or []
    per_class_subjects = sub.get("n_subjects_per_class") or split_info.get("subjects", {}).get(
        "test", {}
    )
    few = {
        c: n
        for c, n in per_class_subjects.items()
        if c != "total" and n < FEW_SUBJECTS and c not in absent
    }
    skipped = report.get("auc_skipped_classes") or {}
    cal = report.get("calibration", {})
    t = cal.get("temperature")
    lo, hi = TEMPERATURE_BOUNDS
    bound = "" if t is None else "top" if t >= hi * 0.99 else "bottom" if t <= lo * 1.01 else ""
    return Limitations(
        few_threshold=FEW_SUBJECTS,
        few_subjects=", ".join(f"{c} ({n})" for c, n in few.items()),
        absent=", ".join(absent),
        auc_skipped=", ".join(f"{c} ({r})" for c, r in skipped.items()),
        pseudo_ids=bool(sub.get("available")) and sub.get("subject_ids") in ("pseudo", "mixed"),
        no_subject_ids=not sub.get("available"),
        no_pretrained_weights=provenance.get("weights") == "none",
        demo_data=provenance.get("data_source") == "demo",
        calibrated=bool(cal.get("applied", True)),
        temperature=_num(t, 2),
        temperature_bound=bound,
        search_range=str(TEMPERATURE_BOUNDS),
    )


# --------------------------------------------------------------------------- rendering


def card_context(
    report: dict, split_info: dict, provenance: dict, baselines: dict | None = None
) -> CardContext:
    """What the card says about this run, from the same inputs as :func:`render_model_card`."""
    classes = list(provenance.get("classes") or report.get("per_class", {}))
    cal = report.get("calibration", {})
    leaky = report.get("split_leaky")
    pixel = (baselines or {}).get("baselines", {}).get("pixel")
    return CardContext(
        notice=RESEARCH_NOTICE,
        leakage=LEAKAGE_CAVEAT.format(strategy=report.get("split_strategy", "?")) if leaky else "",
        split_warning=str(report.get("split_warning") or ""),
        pixel_verdict=pixel["verdict"] if pixel and not pixel.get("beats") else "",
        model=_model(classes, cal, provenance),
        data=_data(report, split_info, provenance, classes),
        performance=_performance(report, classes),
        subject=_subject(report.get("subject_level", {}), classes),
        brain=_brain(report["brain_level"]) if report.get("brain_level") else None,
        baselines=_baselines(baselines) if baselines else None,
        calibration=_calibration(cal),
        limitations=_limitations(report, split_info, provenance),
    )


def render_model_card(
    report: dict, split_info: dict, provenance: dict, baselines: dict | None = None
) -> str:
    """Markdown model card from metrics.json, split.json, run provenance and baselines.json.

    Pure. ``baselines`` None (a report from before baselines existed) omits that section;
    so does a report without ``brain_level`` (from before the brain model) its section.
    """
    context = card_context(report, split_info, provenance, baselines)
    return _template().render({f.name: getattr(context, f.name) for f in fields(context)})


@cache
def _template() -> jinja2.Template:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=False,  # Markdown, not HTML
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,  # a misspelt field fails, never prints ""
    )
    env.filters["upfirst"] = lambda s: s[0].upper() + s[1:]  # a verdict as a sentence
    return env.get_template(TEMPLATE)
