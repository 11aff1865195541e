"""Evaluation: metrics checked against values worked out by hand, side files, gallery, agreement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from elemental.classify.base import Prediction
from elemental.data.records import Record
from elemental.errors import ElementalError
from elemental.evaluate import agreement, evaluate_predictions, write_results

LABELS = ["water", "land", "fire", "metal"]  # "metal" occurs in neither truth nor predictions
TRUTH = ["water", "water", "water", "land", "land", "fire", "fire", "fire"]
PRED = ["water", "water", "land", "land", "fire", "fire", "fire", "water"]
# Awkward characters in a path and a reason, to prove the gallery escapes them.
PATHS = [f"images/{i}.jpg" for i in range(8)]
PATHS[2] = "images/a<b>&'c\".jpg"
REASONS = ["r"] * 8
REASONS[4] = "<script>alert(1)</script> & more"


def _predictions() -> list[Prediction]:
    preds = []
    for i, label in enumerate(PRED):
        # An error's P(truth) is (1 - p_label) / 3, which grows with i: errors 2, 4, 7 are worst first.
        p_label = 0.9 - 0.05 * i
        rest = (1 - p_label) / 3
        probs = {lb: (p_label if lb == label else rest) for lb in LABELS}
        preds.append(Prediction(label=label, probabilities=probs, ms=10.0 * (i + 1)))
    return preds


def _records() -> list[Record]:
    return [
        Record(image_id=str(i), image_path=PATHS[i], element=t, reason=REASONS[i], confidence=1.0)
        for i, t in enumerate(TRUTH)
    ]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    ds = tmp_path / "dataset"
    (ds / "images").mkdir(parents=True)
    for i, path in enumerate(PATHS):
        Image.new("RGB", (64 + 10 * i, 48), (20 * i, 100, 200)).save(ds / path)
    return ds


@pytest.fixture
def results() -> dict:
    return evaluate_predictions(_records(), _predictions(), LABELS, "hf", {"model.safetensors": "ab" * 32})


def test_metrics_match_hand_computed_values(results: dict):
    # Correct: 0, 1, 3, 5, 6 → 5 of 8.
    assert results["accuracy"] == pytest.approx(5 / 8)
    # water: TP 2, predicted 3 (0, 1, 7), support 3. land: TP 1, predicted 2 (2, 3), support 2.
    # fire: TP 2, predicted 3 (4, 5, 6), support 3. metal: absent everywhere, all zeros.
    expected = {
        "water": (2 / 3, 2 / 3, 2 / 3, 3),
        "land": (1 / 2, 1 / 2, 1 / 2, 2),
        "fire": (2 / 3, 2 / 3, 2 / 3, 3),
        "metal": (0.0, 0.0, 0.0, 0),
    }
    for label, (p, r, f, s) in expected.items():
        got = results["per_class"][label]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f))
        assert got["support"] == s
    # Macro over the labels that occur (metal has no defined F1): (2/3 + 1/2 + 2/3) / 3 = 11/18.
    assert results["macro_f1"] == pytest.approx(11 / 18)
    assert results["confusion_matrix"] == {
        "labels": LABELS,
        "counts": [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]],
    }
    # ms = 10..80; numpy's linear percentile: p50 at rank 3.5 → 45, p95 at rank 6.65 → 76.5.
    assert results["latency_ms"] == pytest.approx({"p50": 45.0, "p95": 76.5})
    assert results["n"] == 8 and results["backend"] == "hf"
    assert results["model_files"] == {"model.safetensors": "ab" * 32}
    first = results["predictions"][2]
    assert {k: first[k] for k in ("image_path", "element", "predicted", "ms")} == {
        "image_path": PATHS[2], "element": "water", "predicted": "land", "ms": 30.0,
    }
    assert first["probabilities"]["land"] == pytest.approx(0.8)
    json.dumps(results)  # JSON-ready: no numpy types left


def test_truth_outside_the_model_labels(results: dict):
    records = _records()
    records[0] = records[0].model_copy(update={"element": "wood"})
    with pytest.raises(ElementalError, match=r"images/0\.jpg: label 'wood' is not one of the model's labels"):
        evaluate_predictions(records, _predictions(), LABELS, "hf", {})


def test_write_results_with_suffix_and_plot(results: dict, dataset: Path, tmp_path: Path):
    out = tmp_path / "runs" / "x" / "validation_results_gguf.json"
    written = write_results(results, out, dataset, plot_cm=True)
    folder = out.parent
    assert written == [out, folder / "confusion_matrix_gguf.png", folder / "errors_gguf.html"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in written)  # no temp files left
    saved = json.loads(out.read_text())
    assert saved["files"] == {"confusion_matrix": "confusion_matrix_gguf.png", "errors": "errors_gguf.html"}
    assert saved["accuracy"] == results["accuracy"] and "files" not in results

    png = (folder / "confusion_matrix_gguf.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(folder / "confusion_matrix_gguf.png") as img:
        img.verify()
        assert img.size[0] >= 300 and img.size[1] >= 300


def test_errors_gallery(results: dict, dataset: Path, tmp_path: Path):
    write_results(results, tmp_path / "validation_results.json", dataset)
    page = (tmp_path / "errors.html").read_text()
    assert not (tmp_path / "confusion_matrix.png").exists()
    errors = [i for i in range(8) if TRUTH[i] != PRED[i]]  # 2, 4, 7
    # Worst first: lowest probability of the true label (0.2/3, 0.3/3, 0.45/3 for errors 2, 4, 7).
    escaped = "images/a&lt;b&gt;&amp;&#x27;c&quot;.jpg"
    positions = [page.index(escaped)] + [page.index(f"images/{i}.jpg") for i in (4, 7)]
    assert positions == sorted(positions)
    for i in range(8):
        if i not in errors:
            assert f"images/{i}.jpg" not in page
    # Escaped: no raw markup from a path or a reason gets into the page.
    assert "<script>" not in page and "a<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    # Self-contained: one embedded thumbnail per error, no links to files.
    assert page.count('src="data:image/jpeg;base64,') == len(errors)
    assert "truth <b>fire</b>" in page and 'predicted <b class="miss">water</b>' in page


def test_gallery_survives_a_vanished_photo(results: dict, dataset: Path, tmp_path: Path):
    (dataset / "images" / "7.jpg").unlink()
    write_results(results, tmp_path / "r.json", dataset)
    page = (tmp_path / "errors_r.html").read_text()
    assert "(no thumbnail: image not found:" in page and page.count("data:image/jpeg") == 2


def test_no_errors_gallery(dataset: Path, tmp_path: Path):
    records = _records()[:2]
    res = evaluate_predictions(records, _predictions()[:2], LABELS, "hf", {})
    write_results(res, tmp_path / "validation_results_hf.json", dataset)
    assert "No misclassified photos." in (tmp_path / "errors_hf.html").read_text()


def test_two_backends_in_one_folder_keep_their_files(results: dict, dataset: Path, tmp_path: Path):
    write_results(results, tmp_path / "validation_results.json", dataset, plot_cm=True)
    write_results(results, tmp_path / "validation_results_gguf.json", dataset, plot_cm=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "confusion_matrix.png", "confusion_matrix_gguf.png", "errors.html", "errors_gguf.html",
        "validation_results.json", "validation_results_gguf.json",
    ]


def _res(pairs: list[tuple[str, str]]) -> dict:
    return {"predictions": [{"image_path": p, "predicted": label} for p, label in pairs]}


def test_agreement():
    a = _res([("a", "fire"), ("b", "water"), ("c", "land"), ("d", "wood")])
    b = _res([("d", "metal"), ("c", "land"), ("b", "water"), ("a", "fire")])  # order does not matter
    assert agreement(a, b) == 0.75
    assert agreement(a, a) == 1.0


def test_agreement_needs_the_same_photos():
    with pytest.raises(ElementalError, match="1 only in the first, 0 only in the second"):
        agreement(_res([("a", "fire"), ("b", "fire")]), _res([("a", "fire")]))
    with pytest.raises(ElementalError, match="no predictions"):
        agreement({"accuracy": 1.0}, _res([("a", "fire")]))
    with pytest.raises(ElementalError, match="duplicate 'a'"):
        agreement(_res([("a", "fire"), ("a", "fire")]), _res([("a", "fire")]))
