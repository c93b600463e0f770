"""The model card (``reports/model_card.md``), generated from the evaluation report.

Written by hand, a model card drifts from the numbers within a week; generated from the
same ``metrics.json`` that DVC tracks, it cannot. It states what a reader needs before
trusting any number: where the data came from, how the test set was separated from
training (and whether that leaks), the uncertainty of every headline metric, and what
the model must not be used for.
"""

from __future__ import annotations

from typing import Any

from alzstage.model.calibration import TEMPERATURE_BOUNDS

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


def _num(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{float(v):.{digits}f}"


def _ci(block: dict | None, key: str) -> str:
    iv = (block or {}).get(key)
    return "n/a" if not iv else f"{iv['low']:.3f} - {iv['high']:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table followed by the blank line that ends it."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return [*lines, ""]


def limitations(report: dict, split_info: dict, provenance: dict) -> list[str]:
    """The caveats that follow from this particular run's data, split and model."""
    out: list[str] = []
    if report.get("split_leaky"):
        out.append(LEAKAGE_CAVEAT.format(strategy=report.get("split_strategy", "?")))
    sub = report.get("subject_level", {})
    per_class_subjects = sub.get("n_subjects_per_class") or split_info.get("subjects", {}).get(
        "test", {}
    )
    few = {
        c: n
        for c, n in per_class_subjects.items()
        if c != "total" and n < FEW_SUBJECTS and c not in report.get("classes_absent_from_test", [])
    }
    if few:
        listed = ", ".join(f"{c} ({n})" for c, n in few.items())
        out.append(
            f"Classes with fewer than {FEW_SUBJECTS} test subjects: {listed}. Their per-class "
            "numbers rest on one or two brains, and their bootstrap intervals are too narrow: "
            "resampling (stratified by class) cannot vary a class that has a single subject."
        )
    absent = report.get("classes_absent_from_test") or []
    if absent:
        out.append(
            f"Classes absent from the test split: {', '.join(absent)}. They are not scored; "
            "balanced accuracy and macro-F1 average over the remaining classes only."
        )
    if report.get("auc_skipped_classes"):
        skipped = ", ".join(f"{c} ({r})" for c, r in report["auc_skipped_classes"].items())
        out.append(f"ROC/PR-AUC not computed for: {skipped}.")
    ids = sub.get("subject_ids") if sub.get("available") else None
    if ids in ("pseudo", "mixed"):
        out.append(
            "Subject ids were (partly) recovered from image similarity (pseudo-subjects), not "
            "given by the source; a wrongly merged or split volume would bias subject-level "
            "numbers and the subject-disjointness of the split."
        )
    if not sub.get("available"):
        out.append(
            "No subject ids: confidence intervals resample single slices and assume they are "
            "independent, which neighbouring slices of one brain are not; intervals are too narrow."
        )
    if provenance.get("weights") == "none":
        out.append(
            "No pretrained weights (`model.weights: none`): the whole network was trained "
            "from random initialisation on this dataset alone (the `scratch` recipe)."
        )
    if provenance.get("data_source") == "demo":
        out.append(
            "Trained and tested on SYNTHETIC demo data; these numbers say nothing about "
            "performance on real MRI."
        )
    out.append(
        "Input is a single 2-D axial slice; the stage is a property of a person. The public "
        "4-class slice datasets document neither how images were acquired and selected nor "
        "how labels were assigned, and carry no scanner, site, age or sex metadata: shifts "
        "in any of these are untested, and there is no external validation."
    )
    cal = report.get("calibration", {})
    t = cal.get("temperature")
    if not cal.get("applied", True):
        out.append("No calibration temperature was recorded: probabilities are uncalibrated.")
        return out
    out.append(
        f"Calibration (temperature {_num(t, 2)}) was fitted on the validation split of the "
        "same cohort; probabilities on other data may again be over- or under-confident."
    )
    lo, hi = TEMPERATURE_BOUNDS
    if t is not None and t >= hi * 0.99:
        out.append(
            f"The fitted temperature is at the top of its search range {TEMPERATURE_BOUNDS}: "
            "on validation the model's confidence carried (almost) no information, so the "
            "calibrated probabilities are close to uniform."
        )
    elif t is not None and t <= lo * 1.01:
        out.append(
            f"The fitted temperature is at the bottom of its search range {TEMPERATURE_BOUNDS}; "
            "the calibration fit is unreliable."
        )
    return out


def baselines_section(baselines: dict) -> list[str]:
    """The baselines table: each baseline's scores and whether the network beats it.

    A network is only worth its cost if it beats models that need no deep learning on
    the same test subjects; the verdict is printed verbatim so that a model that does
    not beat the pixel baseline is reported as such, not left for the reader to infer.
    """
    net = baselines.get("network", {})
    blocks = baselines.get("baselines", {})
    any_cmp = next(iter(blocks.values()), {}).get("network_minus_baseline", {})
    fitted = ""
    if "n_train" in baselines:  # absent when pooled out-of-fold predictions were compared
        fitted = (
            f", fitted on the {baselines['n_train']} original (not augmented) training "
            f"slices, downsampled to {baselines.get('n_pixels', '?')} pixels each"
        )
    lines = [
        "## Baselines",
        "",
        f"Scored on the same {baselines.get('n_test', '?')} test slices{fitted}. "
        "Difference: the network's balanced accuracy minus the baseline's, with a "
        f"{any_cmp.get('method', 'paired bootstrap')} over {any_cmp.get('n_units', '?')} "
        f"{any_cmp.get('unit', 'unit')}s ({any_cmp.get('n_resamples', '?')} resamples). "
        f"The network beats a baseline only when the whole {any_cmp.get('level', 0.95):.0%} "
        "interval is above 0.",
        "",
    ]
    rows = [
        [
            "network",
            _num(net.get("balanced_accuracy")),
            _num(net.get("accuracy")),
            _num(net.get("macro_f1")),
            "",
            "",
            "",
        ]
    ]
    for name, b in blocks.items():
        cmp = b.get("network_minus_baseline", {})
        diff, iv = cmp.get("difference"), cmp.get("ci")
        rows.append(
            [
                f"{name}: {b.get('description', '')}",
                _num(b.get("balanced_accuracy")),
                _num(b.get("accuracy")),
                _num(b.get("macro_f1")),
                "n/a" if diff is None else f"{diff:+.3f}",
                "n/a" if not iv else f"{iv['low']:+.3f} to {iv['high']:+.3f}",
                "yes" if b.get("beats") else "**NO**",
            ]
        )
    lines += _table(
        [
            "model",
            "balanced accuracy",
            "accuracy",
            "macro-F1",
            "network minus baseline",
            "CI",
            "network beats it",
        ],
        rows,
    )
    lines += [f"- {b['verdict'][0].upper()}{b['verdict'][1:]}." for b in blocks.values()]
    return [*lines, ""]


# The brain-level predictors brain_test_report scores, in the card's words and order.
BRAIN_PREDICTORS = {
    "brain_model": "brain model",
    "morphometric": "morphometric baseline (CSF fraction only)",
    "pool": "fixed pooling rule (mean log-probability)",
    "majority": "majority class",
}


def _diff(cmp: dict | None) -> tuple[str, str]:
    """A paired difference and its interval as the table shows them."""
    if not cmp:
        return "", ""
    d, iv = cmp.get("difference"), cmp.get("ci")
    diff = "n/a" if d is None else f"{d:+.3f}"
    return diff, "n/a" if not iv else f"{iv['low']:+.3f} to {iv['high']:+.3f}"


def brain_verdict(name: str, cmp: dict | None) -> str:
    """``the brain model does not beat the morphometric baseline (...)``, in plain words.

    Beats: the whole 95% interval of the paired difference is above 0; worse: below 0;
    otherwise the interval includes 0 and the brain model "does not beat" it.
    """
    what = BRAIN_PREDICTORS.get(name, name).split(" (")[0]
    iv = (cmp or {}).get("ci")
    if not iv:
        return f"the brain model's difference from the {what} has no interval (too few brains)"
    span = (
        f"paired difference {cmp['difference']:+.3f}, 95% CI {iv['low']:+.3f} to {iv['high']:+.3f}"
    )
    if iv["low"] > 0:
        return f"the brain model beats the {what} ({span})"
    if iv["high"] < 0:
        return f"the brain model is WORSE than the {what} ({span})"
    return f"the brain model does not beat the {what} ({span}: the interval includes 0)"


def _brain_conformal(conformal: dict) -> str:
    """The conformal sets' coverage on the test brains, in one sentence."""
    if not conformal or conformal.get("available") is False:
        why = (conformal or {}).get("reason", "no calibration")
        return f"Conformal sets: none ({why})."
    chosen = conformal.get("selected", "marginal")
    cov = conformal.get(chosen, {})
    nominal = cov.get("nominal", conformal.get("confidence"))
    return (
        f"Conformal sets ({chosen}, nominal coverage {_num(nominal, 2)}): coverage "
        f"{_num(cov.get('coverage'))} on {cov.get('n', '?')} test brains, mean set size "
        f"{_num(cov.get('mean_set_size'), 2)}; calibrated on "
        f"{conformal.get('calibration_brains', '?')} validation brains (never fitted on)."
    )


def _brain_binary(binary: dict) -> str:
    """The screening view (not demented vs any dementia), in one sentence."""
    if not binary:
        return "Binary view: not reported."
    ci = binary.get("ci", {})
    parts = [
        f"{label} {_num(binary.get(key))} ({_ci(ci, key)})"
        for key, label in (
            ("sensitivity", "sensitivity"),
            ("specificity", "specificity"),
            ("roc_auc", "ROC AUC"),
        )
    ]
    return (
        f"Binary view (not demented vs any dementia, {binary.get('n_brains', '?')} brains): "
        + ", ".join(parts)
        + "."
    )


def brain_level_section(brain: dict) -> list[str]:
    """The brain-level answer users get: the brain model against the morphometric
    baseline and the fixed pooling rule on the same test brains, its conformal sets'
    coverage, and the binary view.

    The verdicts are printed, not left to the reader: a brain model whose paired
    interval against the CSF-fraction baseline includes 0 "does not beat" it, however
    its point estimate looks.
    """
    if brain.get("available") is False:
        return ["## Brain level", "", f"Not scored: {brain.get('reason', 'no brains')}.", ""]
    scores = brain.get("scores", {})
    predictors = scores.get("predictors", {})
    main = ", ".join(scores.get("main_classes", [])) or "?"
    lines = [
        "## Brain level",
        "",
        f"One stage per test brain from all its slices, as `predict` answers a volume or a "
        f"folder of one brain's slices: the brain model (`{brain.get('aggregator', '?')}` "
        f"over {', '.join(brain.get('features', [])) or '?'}, fitted on the training "
        f"brains), on {brain.get('n_brains', '?')} test brains. 95% intervals: bootstrap "
        f"over brains ({scores.get('n_resamples', '?')} resamples, stratified by class); "
        "differences are the brain model's balanced accuracy minus the other's, paired on "
        f"the same draws. Main classes (at least 3 brains): {main}.",
        "",
    ]
    rows = []
    for name, label in BRAIN_PREDICTORS.items():
        if name not in predictors:
            continue
        p = predictors[name]
        ci = p.get("ci", {})
        cmp = p.get("vs_reference", {})
        diff, interval = _diff(cmp.get("balanced_accuracy_main"))
        diff_all, interval_all = _diff(cmp.get("balanced_accuracy"))
        rows.append(
            [
                label,
                _num(p.get("balanced_accuracy_main")),
                _ci(ci, "balanced_accuracy_main"),
                _num(p.get("balanced_accuracy")),
                _ci(ci, "balanced_accuracy"),
                diff,
                interval,
                diff_all,
                interval_all,
            ]
        )
    lines += _table(
        [
            "predictor",
            "balanced accuracy (main)",
            "95% CI",
            "balanced accuracy (all)",
            "95% CI",
            "brain model minus it (main)",
            "CI",
            "minus it (all)",
            "CI",
        ],
        rows,
    )
    for name in ("morphometric", "pool"):
        if name in predictors:
            cmp = predictors[name].get("vs_reference", {}).get("balanced_accuracy_main")
            text = brain_verdict(name, cmp)
            lines.append(f"- {text[0].upper()}{text[1:]}, main classes.")
    lines += [
        f"- {_brain_conformal(brain.get('conformal', {}))}",
        f"- {_brain_binary(brain.get('binary', {}))}",
        "",
    ]
    return lines


def _header(report: dict, baselines: dict | None) -> list[str]:
    """Title, research notice, the leakage caveat and a lost pixel baseline: what a reader
    must see before any number."""
    lines: list[str] = ["# Model card: alzstage Alzheimer's-stage classifier", ""]
    lines += [RESEARCH_NOTICE, ""]
    if report.get("split_leaky"):
        lines += [
            "> " + LEAKAGE_CAVEAT.format(strategy=report.get("split_strategy", "?")),
            "",
        ]
        if report.get("split_warning"):
            lines += [f"> {report['split_warning']}", ""]

    pixel = (baselines or {}).get("baselines", {}).get("pixel")
    if pixel and not pixel.get("beats"):
        # Said at the top: a network no better than PCA + logistic regression on 32x32
        # thumbnails has not shown that it learned anything a linear model could not.
        lines += [f"> **{pixel['verdict'][0].upper()}{pixel['verdict'][1:]}.**", ""]
    return lines


def _model_sections(classes: list[str], cal: dict, provenance: dict) -> list[str]:
    """What the model is and what it is for."""
    lines = ["## Model", ""]
    lines += [
        f"- Task: classify a brain MRI slice into ordered stages {' < '.join(classes)}.",
        f"- Architecture: {provenance.get('backbone', '?')} backbone "
        f"(weights: `{provenance.get('weights', '?')}`) with a small dense head; input "
        f"{'x'.join(str(v) for v in provenance.get('input_size', []))} grayscale.",
        f"- Recipe: `{provenance.get('recipe', '?')}` "
        + (
            "(every layer trained from random weights, one phase, warm-up + cosine)."
            if provenance.get("recipe") == "scratch"
            else "(pretrained trunk: head first, then fine-tuning from `train.fine_tune_from`)."
        ),
        f"- Output: calibrated class probabilities (temperature "
        f"{_num(cal.get('temperature'), 3)}; {cal.get('temperature_source', 'n/a')}).",
        f"- MLflow run: `{provenance.get('run_id', '')}`; "
        f"model: `{provenance.get('model_uri', '')}`.",
        f"- Seed: {provenance.get('seed', '?')}.",
        "",
    ]

    lines += ["## Intended use", ""]
    lines += [
        "- Methods research on leakage-aware evaluation of MRI stage classifiers, teaching, "
        "and benchmarking of training choices.",
        "- Not intended for any individual's diagnosis or care, nor for drawing clinical "
        "conclusions. " + RESEARCH_NOTICE,
        "",
    ]
    return lines


def _data_sections(
    report: dict, split_info: dict, provenance: dict, classes: list[str]
) -> list[str]:
    """Where the data came from and how the test brains were kept apart."""
    lines = ["## Data and provenance", ""]
    counts = split_info.get("counts", {})
    subjects = split_info.get("subjects", {})
    lines += [
        f"- Source: `{provenance.get('data_source', '?')}` - "
        f"{provenance.get('data_reference', '')}",
        f"- Images after validation: {split_info.get('n_images', '?')}; subject ids: "
        f"{split_info.get('subject_ids', '?')}.",
        f"- Test-set fingerprint (sha256 of the test rows of split.csv): "
        f"`{report.get('split_fingerprint', '')}`.",
        "",
    ]

    lines += ["## Split protocol", ""]
    leaky = report.get("split_leaky")
    lines += [
        f"- Strategy: `{report.get('split_strategy', '?')}` "
        f"({'LEAKY' if leaky else 'subject-disjoint: no brain in more than one split'}); "
        f"test fraction {split_info.get('test_size', '?')}, validation fraction "
        f"{split_info.get('val_size', '?')}.",
        "",
    ]
    if counts:
        rows = []
        for s in ("train", "val", "test"):
            c, n = counts.get(s, {}), subjects.get(s, {})
            rows.append(
                [
                    s,
                    *[f"{c.get(k, 0)} / {n.get(k, 0)}" for k in classes],
                    f"{c.get('total', 0)} / {n.get('total', 0)}",
                ]
            )
        lines += ["Images / subjects per split:", ""]
        lines += _table(["split", *classes, "total"], rows)
    return lines


def _performance_section(report: dict, classes: list[str]) -> list[str]:
    """Slice-level test scores with their intervals, overall and per class."""
    ci = report.get("ci", {})
    lines = ["## Test performance", ""]
    unit = ci.get("unit", "image")
    lines += [
        f"{report.get('n_test', 0)} test slices. 95% intervals: {ci.get('method', 'bootstrap')}, "
        f"{ci.get('n_resamples', '?')} resamples of {ci.get('n_units', '?')} {unit}s "
        f"(seed {ci.get('seed', '?')}).",
        "",
    ]
    rows = [
        ["balanced accuracy", _num(report.get("balanced_accuracy")), _ci(ci, "balanced_accuracy")],
        ["macro-F1", _num(report.get("macro_f1")), _ci(ci, "macro_f1")],
        ["accuracy", _num(report.get("accuracy")), _ci(ci, "accuracy")],
        ["quadratic weighted kappa", _num(report.get("quadratic_weighted_kappa")), ""],
        ["ROC-AUC (macro, one-vs-rest)", _num(report.get("roc_auc", {}).get("macro")), ""],
        ["PR-AUC (macro, average precision)", _num(report.get("pr_auc", {}).get("macro")), ""],
    ]
    lines += _table(["metric (slice level)", "value", "95% CI"], rows)

    per_class = report.get("per_class", {})
    rec_ci = ci.get("recall", {})
    rows = []
    for c in classes:
        m = per_class.get(c, {})
        rows.append(
            [
                c,
                _num(m.get("precision")),
                _num(m.get("recall")),
                "n/a" if not rec_ci.get(c) else f"{rec_ci[c]['low']:.3f} - {rec_ci[c]['high']:.3f}",
                _num(m.get("f1")),
                _num(report.get("roc_auc", {}).get("per_class", {}).get(c)),
                _num(report.get("pr_auc", {}).get("per_class", {}).get(c)),
                str(m.get("support", 0)),
            ]
        )
    lines += _table(
        ["class", "precision", "recall", "recall 95% CI", "F1", "ROC-AUC", "PR-AUC", "slices"],
        rows,
    )
    return lines


def _subject_section(sub: dict, classes: list[str]) -> list[str]:
    """The fixed pooling rule's subject-level scores (nothing without subject ids)."""
    if not sub.get("available"):
        return []
    sci = sub.get("ci", {})
    lines = [
        "### Subject level",
        "",
        f"Slices pooled per subject ({sub.get('aggregation', '')}); "
        f"{sub.get('n_subjects', 0)} subjects (ids: {sub.get('subject_ids', '?')}).",
        "",
    ]
    rows = [
        [
            "balanced accuracy",
            _num(sub.get("balanced_accuracy")),
            _ci(sci, "balanced_accuracy"),
        ],
        ["macro-F1", _num(sub.get("macro_f1")), _ci(sci, "macro_f1")],
        ["accuracy", _num(sub.get("accuracy")), _ci(sci, "accuracy")],
        ["quadratic weighted kappa", _num(sub.get("quadratic_weighted_kappa")), ""],
    ]
    lines += _table(["metric (subject level)", "value", "95% CI"], rows)
    per = sub.get("n_subjects_per_class", {})
    lines += [
        "Test subjects per class: " + ", ".join(f"{c} {per.get(c, 0)}" for c in classes),
        "",
    ]
    return lines


def _calibration_section(cal: dict) -> list[str]:
    lines = ["## Calibration", ""]
    if cal:
        before, after = cal.get("uncalibrated", {}), cal.get("calibrated", {})
        rows = [[k, _num(before.get(k), 4), _num(after.get(k), 4)] for k in ("ece", "nll", "brier")]
        lines += [
            f"Temperature scaling, T = {_num(cal.get('temperature'), 3)} "
            f"({cal.get('temperature_source', '')}); ECE over {cal.get('n_bins', '?')} "
            "confidence bins. Reported probabilities are the calibrated ones.",
            "",
        ]
        lines += _table(["test", "uncalibrated", "calibrated"], rows)
    return lines


def render_model_card(
    report: dict, split_info: dict, provenance: dict, baselines: dict | None = None
) -> str:
    """Markdown model card from metrics.json, split.json, run provenance and baselines.json.

    Pure. ``baselines`` None (a report from before baselines existed) omits that section;
    so does a report without ``brain_level`` (from before the brain model) its section.
    """
    classes = provenance.get("classes") or list(report.get("per_class", {}))
    cal = report.get("calibration", {})
    lines = _header(report, baselines)
    lines += _model_sections(classes, cal, provenance)
    lines += _data_sections(report, split_info, provenance, classes)
    lines += _performance_section(report, classes)
    lines += _subject_section(report.get("subject_level", {}), classes)
    if report.get("brain_level"):
        lines += brain_level_section(report["brain_level"])
    if baselines:
        lines += baselines_section(baselines)
    lines += _calibration_section(cal)

    lines += ["## Figures", ""]
    lines += [
        "`reports/figures/`: confusion.png, roc.png, pr.png, reliability.png, "
        "gradcam_gallery.png (Grad-CAM on the backbone's last convolutional block for "
        "confident right and wrong test predictions per class). Grad-CAM maps are coarse "
        "(one cell per 32x32 pixels for ResNet) and show what the model used, not what is "
        "clinically relevant.",
        "",
    ]

    lines += ["## Limitations", ""]
    lines += [f"- {item}" for item in limitations(report, split_info, provenance)] + [""]
    return "\n".join(lines)
