"""Presentation: rich tables and JSON payloads built from metrics (no computation here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cnnbal.metrics import METRIC_NAMES, Comparison

if TYPE_CHECKING:  # pragma: no cover
    from rich.table import Table

__all__ = ["LABELS", "comparison_payload", "comparison_table", "info_table", "per_class_table"]

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
_LOWER_IS_BETTER = {"squared_error"}


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


def comparison_table(comparison: Comparison, title: str = "") -> Table:
    """metric | raw | corrected | change | meaning."""
    from rich.table import Table  # lazily: `evaluate --json` needs no tables

    table = Table(
        title=title or None,
        title_justify="left",
        caption="low-20% (paper): classes picked on the RAW results of this file, so biased "
        "upward; low-20% (val-chosen) and worst-20% are not (README, Metrics).",
        caption_justify="left",
    )
    table.add_column("metric")
    table.add_column("raw", justify="right")
    table.add_column("corrected", justify="right")
    table.add_column("change", justify="right")
    for name in METRIC_NAMES:
        raw, new = comparison.metrics[name]
        label = LABELS[name][0]
        table.add_row(label, _fmt(name, raw), _fmt(name, new), _delta(name, raw, new))
    c = comparison.changed
    table.add_section()
    table.add_row(
        "predictions changed",
        "",
        f"{c['fixed'] + c['broken'] + c['other']:,}",
        f"[green]+{c['fixed']} fixed[/] [red]-{c['broken']} broken[/]",
    )
    return table


def per_class_table(comparison: Comparison, class_names=None, artifact=None) -> Table:
    """Per-class recall raw vs corrected, lowest raw first."""
    from rich.table import Table  # lazily: `evaluate --json` needs no tables

    table = Table(title="per-class accuracy (lowest raw first)", title_justify="left")
    table.add_column("class")
    table.add_column("n", justify="right")
    if artifact is not None:
        table.add_column("val", justify="right")
    table.add_column("raw", justify="right")
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
        row += [
            _fmt("acc", float(raw[k])),
            _fmt("acc", new),
            _delta("acc", float(raw[k]), new),
        ]
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
    return [
        (
            f"fit check ({check.get('n_folds')}-fold CV)",
            f"{line(check.get('cross_validated', {}))}; {verdict} (--max-total-drop {limit:g})",
        ),
        ("fit check (in-sample)", line(check.get("in_sample", {}))),
    ]
