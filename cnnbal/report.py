"""Presentation: rich tables and JSON payloads built from metrics (no computation here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cnnbal.metrics import METRIC_NAMES, Comparison

if TYPE_CHECKING:  # pragma: no cover
    from rich.table import Table

__all__ = [
    "COMPARISON_NOTE",
    "LABELS",
    "LOWER_IS_BETTER",
    "comparison_payload",
    "comparison_table",
    "info_sections",
    "info_table",
    "per_class_table",
]

#: Human names of the metrics, with what they mean in one phrase.
LABELS = {
    "total_accuracy": ("total accuracy", "all samples"),
    "low20_accuracy": ("low-20% (paper)", "worst 20% classes by RAW test accuracy; biased"),
    "low20_val_accuracy": ("low-20% (val-chosen)", "worst 20% classes by validation accuracy"),
    "worst20_accuracy": ("worst-20% mean", "mean of the worst 20% classes, recomputed"),
    "balanced_accuracy": ("balanced accuracy", "mean per-class recall"),
    "worst_class_accuracy": ("worst class", "lowest per-class recall"),
    "macro_f1": ("macro F1", "mean per-class F1"),
    "squared_error": ("squared error", "mean ||p - e_y||^2, lower is better"),
}
#: Metrics where a decrease is an improvement.
LOWER_IS_BETTER = frozenset({"squared_error"})
_LOWER_IS_BETTER = LOWER_IS_BETTER
#: Printed under the comparison table (a line of its own: a table caption wraps
#: at the table's width).
COMPARISON_NOTE = (
    "low-20% (paper): classes picked on the RAW results of this file, so biased upward; "
    "low-20% (val-chosen) and worst-20% are not (README, Metrics; docs/method.md section 5)."
)


def _fmt(name: str, value: float) -> str:
    if value != value:
        return "-"
    if name in ("squared_error", "macro_f1"):
        return f"{value:.4f}"
    return f"{100 * value:.2f}%"


def _delta(name: str, raw: float, new: float) -> str:
    if raw != raw or new != new:
        return "-"
    delta = new - raw
    better = delta < 0 if name in _LOWER_IS_BETTER else delta > 0
    worse = delta > 0 if name in _LOWER_IS_BETTER else delta < 0
    text = f"{delta:+.4f}" if name in ("squared_error", "macro_f1") else f"{100 * delta:+.2f} pts"
    if abs(delta) < 1e-12:
        return text
    return f"[green]{text}[/]" if better else (f"[red]{text}[/]" if worse else text)


def comparison_table(comparison: Comparison, title: str = "", *, raw_only: bool = False) -> Table:
    """metric | raw | corrected | change; ``raw_only``: metric | raw (there is no H).

    Print :data:`COMPARISON_NOTE` under it.
    """
    from rich.table import Table  # lazily: `evaluate --json` needs no tables

    # as wide as the title: a title wider than the table would be wrapped
    table = Table(title=title or None, title_justify="left", min_width=len(title))
    table.add_column("metric")
    table.add_column("raw", justify="right")
    if not raw_only:
        table.add_column("corrected", justify="right")
        table.add_column("change", justify="right")
    for name in METRIC_NAMES:
        raw, new = comparison.metrics[name]
        label = LABELS[name][0]
        if raw_only:
            if name != "low20_val_accuracy":  # needs H's validation accuracy
                table.add_row(label, _fmt(name, raw))
            continue
        table.add_row(label, _fmt(name, raw), _fmt(name, new), _delta(name, raw, new))
    if raw_only:
        return table
    c = comparison.changed
    table.add_section()
    table.add_row(
        "predictions changed",
        "",
        f"{c['fixed'] + c['broken'] + c['other']:,}",
        f"[green]+{c['fixed']} fixed[/] [red]-{c['broken']} broken[/] {c['other']} other",
    )
    return table


def per_class_table(
    comparison: Comparison, class_names=None, artifact=None, *, raw_only: bool = False
) -> Table:
    """Per-class recall raw vs corrected (``raw_only``: raw), lowest raw first."""
    from rich.table import Table  # lazily: `evaluate --json` needs no tables

    table = Table(title="per-class accuracy (lowest raw first)", title_justify="left")
    table.add_column("class")
    table.add_column("n", justify="right")
    if artifact is not None:
        table.add_column("val", justify="right")
    table.add_column("raw", justify="right")
    if not raw_only:
        table.add_column("corrected", justify="right")
        table.add_column("change", justify="right")
    raw = comparison.class_recall_raw
    order = np.argsort(np.where(np.isfinite(raw), raw, np.inf), kind="stable")
    for k in order:
        name = str(k) if not class_names else f"{k} {class_names[k]}"
        row = [name, f"{int(comparison.class_counts[k]):,}"]
        if artifact is not None:
            row.append(_fmt("acc", float(artifact.val_class_accuracy[k])))
        new = float(comparison.class_recall_corrected[k])
        row.append(_fmt("acc", float(raw[k])))
        if not raw_only:
            row += [_fmt("acc", new), _delta("acc", float(raw[k]), new)]
        table.add_row(*row)
    return table


def comparison_payload(comparison: Comparison, class_names=None) -> dict:
    """The JSON form of a comparison (fractions in [0, 1])."""
    per_class = []
    for k in range(len(comparison.class_counts)):
        per_class.append(
            {
                "class": k,
                "name": class_names[k] if class_names else None,
                "count": int(comparison.class_counts[k]),
                "raw": float(comparison.class_recall_raw[k]),
                "corrected": float(comparison.class_recall_corrected[k]),
            }
        )
    return {
        "n_samples": comparison.n_samples,
        "n_classes": len(comparison.class_counts),
        "metrics": {
            name: {"raw": raw, "corrected": new} for name, (raw, new) in comparison.metrics.items()
        },
        "changed": dict(comparison.changed),
        "low20_classes": comparison.low20_classes.tolist(),
        "low20_val_classes": (
            None if comparison.low20_val_classes is None else comparison.low20_val_classes.tolist()
        ),
        "per_class": per_class,
    }


def info_table(summary: dict, title: str = "") -> Table:
    """Key/value table of an artifact's description."""
    from rich.table import Table  # lazily: `evaluate --json` needs no tables

    table = Table(title=title or None, title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in summary.items():
        if key == "provenance" and isinstance(value, dict) and "fit_check" in value:
            for label, text in fit_check_rows(value["fit_check"]):
                table.add_row(label, text)
            value = {k: v for k, v in value.items() if k != "fit_check"}
        if key == "class_names" and value:
            value = ", ".join(value[:12]) + (
                f" ... ({len(value)} in all)" if len(value) > 12 else ""
            )
        elif isinstance(value, float):
            value = f"{value:.6g}"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) if value else "-"
            if len(value) > 300:
                value = value[:300] + " ..."
        table.add_row(key, str(value) if value not in (None, "") else "-")
    return table


def info_sections(summary: dict, artifact, title: str = "") -> list:
    """What ``cnnbal info`` prints: the artifact in sections a person reads.

    Sections: the correction (method, parameters, gate, distance from the
    identity), validation (samples, competitive share, per-class accuracy in
    percent, lowest classes named), origin (input, hash, time, versions),
    provenance (e.g. the sweep that chose the parameters).
    """
    from rich.table import Table

    def section(name: str, rows: list[tuple[str, str]]) -> Table:
        table = Table(title=name, title_justify="left", show_header=False, box=None)
        table.add_column("field", style="bold", no_wrap=True)
        table.add_column("value")
        for key, value in rows:
            table.add_row(key, value)
        return table

    params = ", ".join(f"{k}={v:g}" for k, v in sorted(summary["params"].items())) or "none"
    correction = [
        ("file", title or "-"),
        ("method", summary["method"]),
        ("kind", summary.get("kind", "affine")),
        ("parameters", params),
    ]
    if summary.get("hyper_choice"):
        correction.append(("chosen", summary["hyper_choice"]))
    correction += _correction_rows(summary)
    correction.append(("classes", f"{summary['n_classes']:,}"))
    names = summary["class_names"]
    if names:
        shown = ", ".join(names[:12]) + (f" ... ({len(names)} in all)" if len(names) > 12 else "")
        correction.append(("class names", shown))
    n_val, n_comp = summary["n_val"], summary["n_competitive"]
    acc = np.asarray(artifact.val_class_accuracy, dtype=float)
    order = [int(k) for k in np.argsort(np.where(np.isfinite(acc), acc, np.inf))[:3]]
    lowest = ", ".join(
        f"{_class_label(k, names)} {_fmt('acc', float(acc[k]))}"
        for k in order
        if np.isfinite(acc[k])
    )
    validation = [("samples", f"{n_val:,}")]
    if summary.get("kind", "affine") == "affine":
        validation.append(("competitive", f"{n_comp:,} ({100 * n_comp / max(n_val, 1):.1f}%)"))
    validation += [
        (
            "per-class accuracy",
            f"{_fmt('acc', _num(summary['val_accuracy_min']))} .. "
            f"{_fmt('acc', _num(summary['val_accuracy_max']))}",
        ),
        ("lowest classes", lowest or "-"),
    ]
    origin = [
        ("fitted on", summary["input_name"] or "-"),
        ("sha256", summary["input_sha256"] or "-"),
        ("created", summary["created"] or "-"),
        ("cnnbal", f"{summary['cnnbal_version'] or '-'} (format {summary['format_version']})"),
    ]
    sections = [
        section("correction", correction),
        section("validation", validation),
        section("origin", origin),
    ]
    provenance = summary.get("provenance") or {}
    if provenance:
        sections.append(section("provenance", _provenance_rows(provenance)))
    return sections


def _correction_rows(summary: dict) -> list[tuple[str, str]]:
    """What the correction does, in the terms of its kind (see Artifact.describe)."""
    kind = summary.get("kind", "affine")
    if kind == "affine":
        gate = summary["apply_gate"]
        return [
            (
                "apply gate",
                "every output" if gate == float("inf") else f"outputs whose max prob < {gate:g}",
            ),
            ("|H - [I 0]|", f"{summary['h_distance_from_identity']:.4f}"),
            ("max |H|", f"{summary['h_max_abs']:.4f}"),
        ]
    if kind == "logit_bias":
        return [
            ("temperature", f"{summary['temperature']:g}"),
            (
                "bias",
                f"{summary['bias_min']:+.4f} .. {summary['bias_max']:+.4f} "
                f"(range {summary['bias_range']:.4f}; lowest {summary['bias_lowest_class']}, "
                f"highest {summary['bias_highest_class']})",
            ),
        ]
    if kind == "temperature":
        return [("temperature", f"{summary['temperature']:.4f} (changes no prediction)")]
    return [
        ("scale", f"{summary['scale_min']:.4f} .. {summary['scale_max']:.4f}"),
        ("bias", f"{summary['bias_min']:+.4f} .. {summary['bias_max']:+.4f}"),
    ]


def _class_label(k: int, names) -> str:
    return f"{k} ({names[k]})" if names else str(k)


def _num(value) -> float:
    return float("nan") if value is None else float(value)


def _provenance_rows(provenance: dict) -> list[tuple[str, str]]:
    """Readable lines for a provenance object: the sweep's choice and search, else key=value."""
    rows = []
    for key, value in provenance.items():
        if key == "sweep" and isinstance(value, dict):
            rows += _sweep_rows(value)
        elif key == "fit_check" and isinstance(value, dict):
            rows += fit_check_rows(value)
        elif key == "cv" and isinstance(value, dict):
            rows += _cv_rows(value)
        elif key == "compare" and isinstance(value, dict):
            rows.append(
                (
                    "chosen by",
                    f"cnnbal compare: {value.get('recommended')} recommended on VAL "
                    f"({value.get('objective')}, CV total within "
                    f"{value.get('max_total_drop')} pts of raw)",
                )
            )
        else:
            rows.append((key, _short(value)))
    return rows


def _sweep_rows(sweep: dict) -> list[tuple[str, str]]:
    """The sweep that chose the parameters, as a person reads it (scores in percent)."""
    rows = [("chosen by", "cnnbal sweep: cross-validation on the validation file only")]
    if isinstance(sweep.get("chosen"), dict):
        rows.append(("chosen", ", ".join(f"{k}={v:g}" for k, v in sweep["chosen"].items())))
    if "decision" in sweep:
        decision = (
            "use the correction: it beats raw in cross-validation"
            if sweep.get("beats_raw")
            else "keep the raw outputs: no configuration beats raw in cross-validation"
        )
        rows.append(("decision", decision))
    scores = sweep.get("chosen_scores") or {}
    raw = sweep.get("raw") or {}
    for name, value in scores.items():
        if isinstance(value, dict) and "mean" in value:
            before = raw.get(name, {}).get("mean")
            text = f"{100 * value['mean']:.2f}% ± {100 * value.get('std', 0):.2f}"
            if before is not None:
                text += f" (raw {100 * before:.2f}%)"
            rows.append((f"cv {name}", text))
    if "objective" in sweep:
        limit = sweep.get("max_total_drop_points")
        within = "" if limit is None else f", total accuracy at most {limit:g} pts below raw"
        rows.append(("objective", f"{sweep['objective']}{within}"))
    folds = sweep.get("n_folds")
    if folds is not None:
        rows.append(("folds", f"{folds} (seed {sweep.get('seed')}), mode {sweep.get('mode')}"))
    grid = sweep.get("grid")
    if isinstance(grid, dict):
        rows.append(
            ("grid", "; ".join(f"{k} {', '.join(f'{x:g}' for x in v)}" for k, v in grid.items()))
        )
    if "n_configs" in sweep:
        rows.append(
            (
                "configurations",
                f"{sweep['n_configs']} ({sweep.get('n_eligible', '?')} eligible; every score: "
                "cnnbal info --json)",
            )
        )
    return rows


def _cv_rows(cv: dict) -> list[tuple[str, str]]:
    """How cross-validation chose a method's hyper-parameter (cnnbal.methods.MethodFit.cv)."""
    rows = []
    grid = ", ".join(f"{v:g}" for v in cv.get("grid", []))
    rows.append(("cv grid", f"{cv.get('name')}: {grid}"))
    rows.append(
        (
            "cv rule",
            f"best {cv.get('objective')} with total at most {cv.get('max_total_drop')} pts below "
            f"raw; {cv.get('n_folds')} folds (seed {cv.get('seed')})",
        )
    )
    return rows


def _short(value, limit: int = 200) -> str:
    if isinstance(value, dict):
        text = ", ".join(f"{k}={_short(v, 60)}" for k, v in value.items())
    elif isinstance(value, list):
        text = ", ".join(_short(v, 60) for v in value[:8]) + (" ..." if len(value) > 8 else "")
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def fit_check_rows(check: dict) -> list[tuple[str, str]]:
    """Rows ``(label, text)`` describing a fit check (``provenance["fit_check"]``)."""
    names = (
        ("total_accuracy", "total"),
        ("worst20_accuracy", "worst-20%"),
        ("balanced_accuracy", "balanced"),
    )

    def line(scores: dict) -> str:
        parts = []
        for key, label in names:
            pair = scores.get(key)
            if not pair or pair.get("raw") is None or pair["raw"] != pair["raw"]:
                continue
            raw, new = pair["raw"], pair["corrected"]
            parts.append(f"{label} {100 * raw:.2f}% -> {100 * new:.2f}% ({100 * (new - raw):+.2f})")
        return "; ".join(parts) or "-"

    if check.get("skipped"):
        return [("fit check", f"skipped: {check['skipped']}")]
    verdict = "passed" if check.get("passed") else "FAILED"
    limit = check.get("max_total_drop_points")
    source = f", {check['source']}" if check.get("source") else ""
    return [
        (
            f"fit check ({check.get('n_folds')}-fold CV{source})",
            f"{line(check.get('cross_validated', {}))}; {verdict} (--max-total-drop {limit:g})",
        ),
        ("fit check (in-sample)", line(check.get("in_sample", {}))),
    ]
