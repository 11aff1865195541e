"""Evaluation results (DESIGN §5): metrics from scikit-learn, a confusion-matrix plot, an error gallery.

`evaluate_predictions` is pure (records + predictions → a JSON-ready dict), so both backends and the
tests share it; `write_results` writes the JSON and its side files. The side files take the results
file's suffix (`validation_results_gguf.json` → `errors_gguf.html`), so HF and GGUF evaluations in
one folder never overwrite each other's gallery or plot. The gallery embeds its thumbnails, so it
can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from .classify.base import Prediction
from .data.records import Record
from .errors import ElementalError
from .fileio import write_bytes_atomic, write_json_atomic, write_text_atomic
from .images import bounded, encode_jpeg, open_image

RESULTS_STEM = "validation_results"
THUMB_SIDE = 192


def evaluate_predictions(
    records: list[Record],
    predictions: list[Prediction],
    labels: Sequence[str],
    backend: str,
    model_files: dict[str, str],
) -> dict[str, Any]:
    """Metrics of `predictions` against the records' labels, plus every prediction, as a JSON-ready dict.

    `macro_f1` averages over the labels that occur in the truth or the predictions (scikit-learn's
    default): a label absent from both has no defined F1 and would otherwise count as 0.
    `per_class` lists every label, with support 0 where a label has no photos.
    """
    if len(records) != len(predictions):
        raise ValueError(f"{len(records)} records but {len(predictions)} predictions")
    if not records:
        raise ElementalError("nothing to evaluate: no records")
    labels = list(labels)
    for r in records:
        if r.element not in labels:
            raise ElementalError(
                f"{r.image_path}: label {r.element!r} is not one of the model's labels {labels}"
            )
    truth = [r.element for r in records]
    predicted = [p.label for p in predictions]
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=labels, zero_division=0
    )
    counts = confusion_matrix(truth, predicted, labels=labels)
    latencies = np.array([p.ms for p in predictions], dtype=float)
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
        "n": len(records),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion_matrix": {"labels": labels, "counts": counts.astype(int).tolist()},
        "predictions": [
            {
                "image_path": r.image_path,
                "element": r.element,
                "predicted": p.label,
                "probabilities": {k: float(v) for k, v in p.probabilities.items()},
                "ms": float(p.ms),
                "reason": r.reason,
            }
            for r, p in zip(records, predictions)
        ],
        "backend": backend,
        "model_files": dict(model_files),
        "latency_ms": {
            "p50": float(np.percentile(latencies, 50)),
            "p95": float(np.percentile(latencies, 95)),
        },
    }


def side_file_suffix(output_path: Path) -> str:
    """`validation_results_gguf.json` → `_gguf`; `validation_results.json` → ``; `x.json` → `_x`."""
    stem = Path(output_path).stem
    if stem.startswith(RESULTS_STEM):
        return stem[len(RESULTS_STEM):]
    return f"_{stem}"


def write_results(
    results: dict[str, Any], output_path: Path, dataset_dir: Path, plot_cm: bool = False
) -> list[Path]:
    """Write the results JSON, `errors{suffix}.html` and, with `plot_cm`, `confusion_matrix{suffix}.png`.

    The side files are written first and the JSON last, listing them under `files`, so a results
    file never names a side file that is not there. Returns the paths written, JSON first.
    """
    output_path = Path(output_path)
    folder, suffix = output_path.parent, side_file_suffix(output_path)
    side: dict[str, Path] = {}
    if plot_cm:
        side["confusion_matrix"] = folder / f"confusion_matrix{suffix}.png"
        write_bytes_atomic(side["confusion_matrix"], confusion_matrix_png(results["confusion_matrix"]))
    side["errors"] = folder / f"errors{suffix}.html"
    write_text_atomic(side["errors"], errors_html(results, Path(dataset_dir)))
    write_json_atomic(output_path, {**results, "files": {k: p.name for k, p in side.items()}})
    return [output_path, *side.values()]


def confusion_matrix_png(cm: dict[str, Any]) -> bytes:
    """The confusion matrix as a PNG: rows = truth, columns = prediction, every cell's count written."""
    # Figure without pyplot: no global backend state, renders with Agg, safe in threads and tests.
    from matplotlib.figure import Figure

    labels, counts = cm["labels"], np.array(cm["counts"])
    side = max(4.0, 0.55 * len(labels) + 2.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title("confusion matrix")
    threshold = counts.max() / 2 if counts.size and counts.max() > 0 else 0.5
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > threshold else "black", fontsize=8 if len(labels) > 15 else 10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def errors_html(results: dict[str, Any], dataset_dir: Path) -> str:
    """A self-contained HTML gallery of the misclassified photos, worst first (lowest P(truth))."""
    errors = [p for p in results["predictions"] if p["predicted"] != p["element"]]
    errors.sort(key=lambda p: (p["probabilities"].get(p["element"], 0.0), p["image_path"]))
    esc = html.escape
    head = (
        f"<p>backend <b>{esc(str(results.get('backend', '')))}</b> · {results['n']} photos · "
        f"accuracy {results['accuracy']:.3f} · macro F1 {results['macro_f1']:.3f} · "
        f"{len(errors)} misclassified</p>"
    )
    cards = [_error_card(p, dataset_dir) for p in errors] or ["<p>No misclassified photos.</p>"]
    return "\n".join([
        "<!doctype html>",
        '<html><head><meta charset="utf-8"><title>elemental: misclassified photos</title>',
        "<style>body{font-family:sans-serif;margin:1.5em}"
        ".card{display:flex;gap:1em;border-bottom:1px solid #ddd;padding:.6em 0}"
        ".card img{max-width:192px;max-height:192px}.miss{color:#b00}"
        "table{border-collapse:collapse}td{padding:0 .6em 0 0}</style></head><body>",
        "<h1>Misclassified photos</h1>",
        head,
        *cards,
        "</body></html>",
        "",
    ])


def _error_card(p: dict[str, Any], dataset_dir: Path) -> str:
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(label)}</td><td>{prob:.3f}</td></tr>"
        for label, prob in sorted(p["probabilities"].items(), key=lambda kv: -kv[1])
    )
    return (
        f'<div class="card">{_thumbnail(dataset_dir, p["image_path"])}<div>'
        f"<div><code>{esc(p['image_path'])}</code></div>"
        f"<div>truth <b>{esc(p['element'])}</b> · "
        f"predicted <b class=\"miss\">{esc(p['predicted'])}</b></div>"
        f"<div>reason: {esc(str(p.get('reason') or ''))}</div>"
        f"<table>{rows}</table></div></div>"
    )


def _thumbnail(dataset_dir: Path, image_path: str) -> str:
    """An embedded JPEG thumbnail; a placeholder if the photo has gone since it was classified.

    A missing thumbnail must not cost the results of a long evaluation, so it is not an error here.
    """
    try:
        jpeg = encode_jpeg(bounded(open_image(dataset_dir / image_path), THUMB_SIDE), quality=80)
    except ElementalError as e:
        return f"<div>(no thumbnail: {html.escape(str(e))})</div>"
    data = base64.b64encode(jpeg).decode("ascii")
    return f'<img alt="{html.escape(image_path, quote=True)}" src="data:image/jpeg;base64,{data}">'


def agreement(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Share of photos on which two results (e.g. HF and GGUF) predict the same label."""
    pa, pb = _predicted_by_path(a, "first"), _predicted_by_path(b, "second")
    if pa.keys() != pb.keys():
        only_a, only_b = sorted(pa.keys() - pb.keys()), sorted(pb.keys() - pa.keys())
        example = (only_a or only_b)[0]
        raise ElementalError(
            f"the two results cover different photos: {len(only_a)} only in the first, "
            f"{len(only_b)} only in the second (e.g. {example})"
        )
    return sum(pa[k] == pb[k] for k in pa) / len(pa)


def _predicted_by_path(results: dict[str, Any], which: str) -> dict[str, str]:
    preds = results.get("predictions")
    if not isinstance(preds, list) or not preds:
        raise ElementalError(f"the {which} results have no predictions")
    out: dict[str, str] = {}
    for i, p in enumerate(preds):
        try:
            path, label = p["image_path"], p["predicted"]
        except (KeyError, TypeError):
            raise ElementalError(
                f"the {which} results: predictions[{i}] lacks image_path/predicted"
            ) from None
        if path in out:
            raise ElementalError(f"the {which} results: predictions[{i}].image_path: duplicate {path!r}")
        out[path] = label
    return out
