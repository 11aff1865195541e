"""Evaluation results (DESIGN §5): metrics from scikit-learn, a confusion-matrix plot, an error gallery.

`evaluate_predictions` is pure (records + predictions → a JSON-ready dict), so both backends and the
tests share it; `write_results` writes the JSON and its side files. The side files take the results
file's suffix (`validation_results_gguf.json` → `errors_gguf.html`), so HF and GGUF evaluations in
one folder never overwrite each other's gallery or plot. The gallery embeds its thumbnails, so it
can be mailed or archived on its own.

`compare_results` / `format_comparison` put two results side by side (fine-tuned vs its zero-shot
base for `evaluate --baseline`, HF vs GGUF or Q8_0 vs Q4_K_M for `evaluate --compare`).
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
from .fileio import read_json, write_bytes_atomic, write_json_atomic, write_text_atomic
from .images import bounded, encode_jpeg, open_image

RESULTS_STEM = "validation_results"
THUMB_SIDE = 192
ECE_BINS = 10


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
    `confusion_matrix.normalized` divides each row by its support, so a rare class's errors read as
    plainly as a common one's; a label without photos gets a row of zeros.
    `top2_accuracy` and `ece` / `ece_bins` are described at `top_k_accuracy` and `calibration`.
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
    rows = counts.sum(axis=1, keepdims=True)
    normalized = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    scores = np.array([[p.probabilities.get(label, 0.0) for label in labels] for p in predictions], dtype=float)
    truth_index = np.array([labels.index(t) for t in truth])
    confidence = np.array([p.probabilities.get(p.label, 0.0) for p in predictions], dtype=float)
    ece, ece_bins = calibration(confidence, np.array(truth) == np.array(predicted))
    latencies = np.array([p.ms for p in predictions], dtype=float)
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
        "top2_accuracy": top_k_accuracy(scores, truth_index, 2),
        "ece": ece,
        "ece_bins": ece_bins,
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
        "confusion_matrix": {
            "labels": labels,
            "counts": counts.astype(int).tolist(),
            "normalized": normalized.tolist(),
        },
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


def top_k_accuracy(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Share of rows whose true column is among the `k` highest scores; ties count in the truth's favour.

    scikit-learn's `top_k_accuracy_score` gives the same value when there are no ties, but it breaks
    ties by label order and refuses a two-label task; here the rule is explicit and any label count works.
    """
    true_scores = scores[np.arange(len(truth)), truth]
    higher = (scores > true_scores[:, None]).sum(axis=1)
    return float(np.mean(higher < k))


def calibration(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error of the top-1 probability, over `n_bins` equal-width bins of [0, 1].

    Bin i holds the photos whose top-1 probability lies in (i/n, (i+1)/n]; ECE = Σ (bin size / N) ·
    |accuracy in bin − mean top-1 probability in bin|. 0 means "a 0.8 answer is right 80% of the time",
    which is what an app needs before it shows a probability or thresholds on one. The bins are
    returned too (accuracy and confidence are None in an empty bin), for a reliability diagram.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    ece, bins = 0.0, []
    for i in range(n_bins):
        members = index == i
        count = int(members.sum())
        acc = float(correct[members].mean()) if count else None
        conf = float(confidence[members].mean()) if count else None
        if count:
            ece += count / len(confidence) * abs(acc - conf)
        bins.append({"lower": float(edges[i]), "upper": float(edges[i + 1]), "count": count,
                     "accuracy": acc, "confidence": conf})
    return float(ece), bins


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
    """The confusion matrix as a PNG: rows = truth, columns = prediction, every cell's count written.

    Cells are shaded by their share of the row (the normalised matrix), so a rare class's confusions
    stand out as much as a common one's; the numbers written are the counts.
    """
    # Figure without pyplot: no global backend state, renders with Agg, safe in threads and tests.
    from matplotlib.figure import Figure

    labels, counts, shares = cm["labels"], np.array(cm["counts"]), np.array(cm["normalized"])
    side = max(4.0, 0.55 * len(labels) + 2.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title("confusion matrix")
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if shares[i, j] > 0.5 else "black", fontsize=8 if len(labels) > 15 else 10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def errors_html(results: dict[str, Any], dataset_dir: Path) -> str:
    """A self-contained HTML gallery of the misclassified photos, worst first (lowest P(truth)).

    A per-class table heads it, so the page names every class, including those without errors.
    """
    errors = [p for p in results["predictions"] if p["predicted"] != p["element"]]
    errors.sort(key=lambda p: (p["probabilities"].get(p["element"], 0.0), p["image_path"]))
    esc = html.escape
    head = (
        f"<p>backend <b>{esc(str(results.get('backend', '')))}</b> · {results['n']} photos · "
        f"accuracy {results['accuracy']:.3f} · macro F1 {results['macro_f1']:.3f} · "
        f"top-2 {results['top2_accuracy']:.3f} · ECE {results['ece']:.3f} · "
        f"{len(errors)} misclassified</p>"
    )
    missed: dict[str, int] = {}
    for p in errors:
        missed[p["element"]] = missed.get(p["element"], 0) + 1
    class_rows = "".join(
        f'<tr class="class"><td>{esc(label)}</td><td>{m["precision"]:.3f}</td><td>{m["recall"]:.3f}</td>'
        f"<td>{m['f1']:.3f}</td><td>{m['support']}</td><td>{missed.get(label, 0)}</td></tr>"
        for label, m in results["per_class"].items()
    )
    classes = ("<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th>"
               f"<th>misclassified</th></tr>{class_rows}</table>")
    cards = [_error_card(p, dataset_dir) for p in errors] or ["<p>No misclassified photos.</p>"]
    return "\n".join([
        "<!doctype html>",
        '<html><head><meta charset="utf-8"><title>elemental: misclassified photos</title>',
        "<style>body{font-family:sans-serif;margin:1.5em}"
        ".card{display:flex;gap:1em;border-bottom:1px solid #ddd;padding:.6em 0}"
        ".card img{max-width:192px;max-height:192px}.miss{color:#b00}"
        "table{border-collapse:collapse}td,th{padding:0 .6em 0 0;text-align:left}</style></head><body>",
        "<h1>Misclassified photos</h1>",
        head,
        classes,
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


def agreement(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("first", "second")) -> float:
    """Share of photos on which two results (e.g. HF and GGUF) predict the same label.

    `names` say which results an error is about (file names, for `evaluate --compare`).
    """
    pa, pb = _predicted_by_path(a, names[0]), _predicted_by_path(b, names[1])
    if pa.keys() != pb.keys():
        only_a, only_b = sorted(pa.keys() - pb.keys()), sorted(pb.keys() - pa.keys())
        example = (only_a or only_b)[0]
        raise ElementalError(
            f"the two results cover different photos: {len(only_a)} only in the {names[0]}, "
            f"{len(only_b)} only in the {names[1]} (e.g. {example})"
        )
    return sum(pa[k] == pb[k] for k in pa) / len(pa)


def disagreements(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """The photos two results label differently (image_path, truth, a, b), by path: where to look first
    when HF and GGUF, or two quantisations, disagree. Call after `agreement`, which checks the photos match."""
    pb = _predicted_by_path(b, "second")
    return sorted(
        ({"image_path": p["image_path"], "element": p.get("element"), "a": p["predicted"], "b": pb[p["image_path"]]}
         for p in a["predictions"] if p["predicted"] != pb[p["image_path"]]),
        key=lambda d: d["image_path"],
    )


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


# -- side by side ----------------------------------------------------------------------------------

def baseline_results_path(output_path: Path) -> Path:
    """`validation_results.json` → `validation_results_baseline.json` (its side files follow the suffix)."""
    output_path = Path(output_path)
    return output_path.with_name(f"{output_path.stem}_baseline{output_path.suffix}")


def load_results(path: Path) -> dict[str, Any]:
    """A results file written by `evaluate`, checked for the keys a comparison reads (DESIGN §5)."""
    path = Path(path)
    data = read_json(path, "results file")
    if not isinstance(data, dict):
        raise ElementalError(f"{path}: not a results file (expected a JSON object)")
    for key, kind, what in (("accuracy", (int, float), "a number"), ("macro_f1", (int, float), "a number"),
                            ("per_class", dict, "an object"), ("predictions", list, "a list")):
        if key not in data:
            raise ElementalError(f"{path}: not a results file (no {key!r})")
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise ElementalError(f"{path}: {key}: expected {what}, got {type(data[key]).__name__}")
    for label, m in data["per_class"].items():
        if not isinstance(m, dict) or not isinstance(m.get("f1"), (int, float)):
            raise ElementalError(f"{path}: per_class.{label}.f1: missing or not a number")
    return data


def compare_results(a: dict[str, Any], b: dict[str, Any], latency: bool = True) -> list[dict[str, Any]]:
    """Rows of `metric`, `a`, `b` and `diff` (b − a; None where either side lacks the metric).

    Overall metrics first, then latency (if asked), then F1 per class over both files' labels. Results
    written before top-2 and ECE existed compare too, with those rows empty.
    """
    def get(results: dict[str, Any], *keys: str) -> float | None:
        value: Any = results
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    specs: list[tuple[str, tuple[str, ...]]] = [
        ("accuracy", ("accuracy",)),
        ("macro-F1", ("macro_f1",)),
        ("top-2 accuracy", ("top2_accuracy",)),
        ("ECE (lower is better)", ("ece",)),
    ]
    if latency:
        specs += [("latency p50 (ms)", ("latency_ms", "p50")), ("latency p95 (ms)", ("latency_ms", "p95"))]
    labels = list(dict.fromkeys([*a.get("per_class", {}), *b.get("per_class", {})]))
    specs += [(f"F1 {label}", ("per_class", label, "f1")) for label in labels]
    rows = []
    for name, keys in specs:
        va, vb = get(a, *keys), get(b, *keys)
        rows.append({"metric": name, "a": va, "b": vb,
                     "diff": vb - va if va is not None and vb is not None else None})
    return rows


def format_comparison(rows: list[dict[str, Any]], headers: tuple[str, str, str]) -> str:
    """The rows as a plain-text table: metric, a, b, diff (signed); milliseconds with one decimal."""
    def cell(value: float | None, ms: bool, signed: bool = False) -> str:
        if value is None:
            return "n/a"
        return f"{value:{'+' if signed else ''}.{1 if ms else 3}f}"

    table = [("", *headers)]
    for r in rows:
        ms = r["metric"].endswith("(ms)")
        table.append((r["metric"], cell(r["a"], ms), cell(r["b"], ms), cell(r["diff"], ms, signed=True)))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    return "\n".join(
        "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))]).rstrip()
        for row in table
    )
