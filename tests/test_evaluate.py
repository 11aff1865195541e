"""Evaluation: metrics checked against values worked out by hand and against scikit-learn, side files,
gallery, agreement, the side-by-side comparison, and the pipeline helpers behind `evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import top_k_accuracy_score

from elemental.classify.base import Prediction
from elemental.data.records import Record
from elemental.errors import ElementalError
from elemental.evaluate import (
    agreement,
    baseline_results_path,
    calibration,
    compare_results,
    disagreements,
    evaluate_predictions,
    format_comparison,
    load_results,
    top_k_accuracy,
    write_results,
)
from elemental.lineage import baseline_model, task_from_manifest
from elemental.pipeline import evaluate_model
from elemental.task import Task

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
    cm = results["confusion_matrix"]
    assert cm["labels"] == LABELS
    assert cm["counts"] == [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    # Row-normalised: each row by its support; metal (no photos) is a row of zeros, not NaN.
    assert np.array(cm["normalized"]) == pytest.approx(np.array(
        [[2 / 3, 1 / 3, 0, 0], [0, 1 / 2, 1 / 2, 0], [1 / 3, 0, 2 / 3, 0], [0, 0, 0, 0]]))
    assert [sum(row) for row in cm["normalized"]] == pytest.approx([1, 1, 1, 0])
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


# A second hand-made set for top-2 and calibration: no ties among the probabilities (so top-2 is
# unambiguous) and no top-1 probability on a bin edge (so every bin is plain to work out by hand).
#          water  land  fire  metal   truth    predicted  top-1  truth's rank
CALIB = [((0.72, 0.18, 0.06, 0.04), "water"),  # water   0.72   1  right
         ((0.15, 0.55, 0.25, 0.05), "water"),  # land    0.55   3
         ((0.30, 0.45, 0.15, 0.10), "land"),   # land    0.45   1  right
         ((0.52, 0.33, 0.10, 0.05), "land"),   # water   0.52   2
         ((0.04, 0.10, 0.78, 0.08), "fire"),   # fire    0.78   1  right
         ((0.62, 0.08, 0.28, 0.02), "fire"),   # water   0.62   2
         ((0.12, 0.41, 0.07, 0.40), "metal"),  # land    0.41   2
         ((0.33, 0.22, 0.26, 0.19), "metal")]  # water   0.33   4


def _calib_results() -> dict:
    records, preds = [], []
    for i, (probs, truth) in enumerate(CALIB):
        p = dict(zip(LABELS, probs))
        records.append(Record(image_id=str(i), image_path=f"images/{i}.jpg", element=truth, reason="r",
                              confidence=1.0))
        preds.append(Prediction(label=max(p, key=p.get), probabilities=p, ms=1.0))
    return evaluate_predictions(records, preds, LABELS, "gguf", {})


def test_top2_accuracy_matches_scikit_learn():
    res = _calib_results()
    assert res["accuracy"] == pytest.approx(3 / 8)
    assert res["top2_accuracy"] == pytest.approx(6 / 8)  # all but photos 1 (rank 3) and 7 (rank 4)
    # scikit-learn wants its label columns sorted.
    order = sorted(range(len(LABELS)), key=lambda i: LABELS[i])
    scores = np.array([[probs[i] for i in order] for probs, _ in CALIB])
    truth = [t for _, t in CALIB]
    for k in (1, 2, 3):
        expected = top_k_accuracy_score(truth, scores, k=k, labels=[LABELS[i] for i in order])
        assert top_k_accuracy(np.array([p for p, _ in CALIB]), np.array([LABELS.index(t) for t in truth]), k) \
            == pytest.approx(expected)


def test_top_k_ties_count_for_the_truth_and_two_labels_work():
    scores = np.array([[0.5, 0.5, 0.0], [0.2, 0.4, 0.4]])
    assert top_k_accuracy(scores, np.array([1, 0]), 1) == 0.5  # row 0: tied for first → a hit
    assert top_k_accuracy(scores, np.array([1, 0]), 2) == 0.5  # row 1: two labels strictly higher
    assert top_k_accuracy(np.array([[0.9, 0.1], [0.3, 0.7]]), np.array([1, 0]), 2) == 1.0


def test_ece_matches_a_hand_computation():
    res = _calib_results()
    # Bins (lo, hi]: 0.33 → bin 3 (wrong); 0.45 right, 0.41 wrong → bin 4; 0.55, 0.52 wrong → bin 5;
    # 0.62 wrong → bin 6; 0.72, 0.78 right → bin 7. |accuracy − mean confidence| per bin, weighted by size:
    hand = (1 * abs(0 - 0.33) + 2 * abs(0.5 - 0.43) + 2 * abs(0 - 0.535) + 1 * abs(0 - 0.62)
            + 2 * abs(1 - 0.75)) / 8
    assert res["ece"] == pytest.approx(hand) and hand == pytest.approx(0.3325)
    bins = res["ece_bins"]
    assert len(bins) == 10 and bins[0]["lower"] == 0.0 and bins[-1]["upper"] == 1.0
    assert [b["count"] for b in bins] == [0, 0, 0, 1, 2, 2, 1, 2, 0, 0]
    assert bins[4]["accuracy"] == 0.5 and bins[4]["confidence"] == pytest.approx(0.43)
    assert bins[0]["accuracy"] is None and bins[0]["confidence"] is None
    json.dumps(res)


def test_ece_bin_edges():
    # A top-1 probability of exactly 1.0 belongs to the last bin; perfectly calibrated answers give 0.
    ece, bins = calibration(np.array([1.0, 1.0, 0.25, 0.25, 0.25, 0.25]),
                            np.array([True, True, True, False, False, False]))
    assert ece == pytest.approx(0.0)
    assert bins[9]["count"] == 2 and bins[2]["count"] == 4


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
    # Every class is named in the per-class table, metal (no photos, no errors) included.
    for label in LABELS:
        assert f'<tr class="class"><td>{label}</td>' in page
    assert page.count('<div class="card">') == len(errors)


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


# -- side by side --------------------------------------------------------------------------------------

def test_compare_results_and_table(results: dict):
    other = _calib_results()
    rows = {r["metric"]: r for r in compare_results(results, other)}
    assert rows["accuracy"]["a"] == pytest.approx(5 / 8) and rows["accuracy"]["b"] == pytest.approx(3 / 8)
    assert rows["accuracy"]["diff"] == pytest.approx(-2 / 8)
    assert rows["latency p50 (ms)"]["a"] == 45.0 and rows["latency p50 (ms)"]["b"] == 1.0
    assert [m for m in rows if m.startswith("F1 ")] == [f"F1 {label}" for label in LABELS]
    assert "latency p50 (ms)" not in {r["metric"] for r in compare_results(results, other, latency=False)}
    # An old results file without top-2/ECE still compares; those rows are empty.
    old = {k: v for k, v in results.items() if k not in ("top2_accuracy", "ece")}
    rows = {r["metric"]: r for r in compare_results(old, other)}
    assert rows["top-2 accuracy"]["a"] is None and rows["top-2 accuracy"]["diff"] is None
    table = format_comparison(compare_results(old, other), ("baseline", "fine-tuned", "lift")).splitlines()
    assert table[0].split() == ["baseline", "fine-tuned", "lift"]
    assert table[1].split() == ["accuracy", "0.625", "0.375", "-0.250"]
    assert table[3].split() == ["top-2", "accuracy", "n/a", "0.750", "n/a"]
    assert table[5].split() == ["latency", "p50", "(ms)", "45.0", "1.0", "-44.0"]
    json.dumps(compare_results(results, other))


def test_load_results_names_the_file(results: dict, tmp_path: Path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(results))
    assert load_results(good)["accuracy"] == results["accuracy"]
    with pytest.raises(ElementalError, match="results file not found: .*missing.json"):
        load_results(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    for text, needle in (("{", r"bad.json:1: invalid JSON"), ("[]", r"bad.json: not a results file"),
                         ('{"accuracy": 1}', r"bad.json: not a results file \(no 'macro_f1'\)"),
                         (json.dumps({**results, "accuracy": "high"}), r"bad.json: accuracy: expected a number"),
                         (json.dumps({**results, "per_class": {"water": {}}}), r"bad.json: per_class.water.f1")):
        bad.write_text(text)
        with pytest.raises(ElementalError, match=needle):
            load_results(bad)


def test_disagreements_list_the_photos():
    a = {"predictions": [{"image_path": "b", "element": "fire", "predicted": "fire"},
                         {"image_path": "a", "element": "land", "predicted": "water"}]}
    b = _res([("a", "land"), ("b", "fire")])
    assert disagreements(a, b) == [{"image_path": "a", "element": "land", "a": "water", "b": "land"}]
    assert disagreements(a, a) == []


def test_agreement_names_the_files():
    with pytest.raises(ElementalError, match="1 only in the a.json, 0 only in the b.json"):
        agreement(_res([("a", "fire"), ("b", "fire")]), _res([("a", "fire")]), ("a.json", "b.json"))


def test_baseline_results_path():
    assert baseline_results_path(Path("r/validation_results.json")) == Path("r/validation_results_baseline.json")
    assert baseline_results_path(Path("q4.json")) == Path("q4_baseline.json")


# -- pipeline helpers: evaluate_model on a split FILE, the GGUF task, the baseline's base model ------

class _WidthClassifier:
    """Answers for the `dataset` fixture's photos, told apart by their widths (64 + 10·i px)."""

    backend = "fake"
    labels = tuple(LABELS)

    def classify(self, image: Image.Image) -> Prediction:
        return _predictions()[(image.size[0] - 64) // 10]

    def model_files(self) -> dict[str, str]:
        return {}


def test_evaluate_model_on_a_split_file(dataset: Path, tmp_path: Path):
    # --split FILE: a JSON list anywhere, its image paths relative to the dataset dir.
    subset = tmp_path / "lists" / "hard.json"
    subset.parent.mkdir()
    subset.write_text(json.dumps([r.to_json() for r in _records()[1:5]]))
    said: list[str] = []
    task = Task(tuple(LABELS), "Classify.", "Explain.")
    res = evaluate_model(_WidthClassifier(), dataset, str(subset), task, tmp_path / "out" / "r.json", True,
                         say=said.append)
    assert res["n"] == 4 and [p["image_path"] for p in res["predictions"]] == PATHS[1:5]
    assert res["accuracy"] == pytest.approx(2 / 4)  # 1 and 3 right, 2 and 4 wrong
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["confusion_matrix_r.png", "errors_r.html", "r.json"]
    assert "top-2" in said[0] and "ECE" in said[0]
    with pytest.raises(ElementalError, match="split file not found: .*nope.json"):
        evaluate_model(_WidthClassifier(), dataset, str(tmp_path / "nope.json"), task, tmp_path / "x.json", False)


def test_task_from_manifest_round_trips():
    task = Task(("cat", "dog"), "Is this a cat or a dog?", "Why?")
    fallback = Task(("a", "b"), "x", "Explain it.")
    got = task_from_manifest({"labels": ["cat", "dog"], "prompt": task.prompt("label")}, Path("m.json"), fallback)
    assert got.labels == task.labels and got.prompt("label") == task.prompt("label")
    assert got.explain_instruction == "Explain it."
    with pytest.raises(ElementalError, match="m.json: prompt"):
        task_from_manifest({"labels": ["cat", "dog"], "prompt": "Classify <image>"}, Path("m.json"), fallback)
    with pytest.raises(ElementalError, match="m.json: labels"):
        task_from_manifest({"prompt": task.prompt("label")}, Path("m.json"), fallback)


def _model_dir(path: Path, **files: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "smolvlm"}')
    for name, data in files.items():
        (path / f"{name}.json").write_text(json.dumps(data))
    return path


def test_baseline_model_is_found_where_each_kind_of_model_records_it(tmp_path: Path):
    base = str(_model_dir(tmp_path / "base"))
    merged = _model_dir(tmp_path / "final", manifest={"stage": "merge", "base_model": base})
    assert baseline_model(merged) == base
    trained = _model_dir(tmp_path / "trained", task={"labels": LABELS, "base_model": base})
    assert baseline_model(trained) == base
    # merge's manifest first, train's task.json second
    both = _model_dir(tmp_path / "both", manifest={"base_model": base}, task={"base_model": "elsewhere"})
    assert baseline_model(both) == base
    # base + adapter: the base without the adapter
    assert baseline_model(Path(base), lora_path=tmp_path / "adapter") == base
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "x-Q8_0.gguf").write_bytes(b"GGUF")
    (gguf / "manifest.json").write_text(json.dumps({"base_model": base}))
    assert baseline_model(gguf) == base
    assert baseline_model(gguf / "manifest.json") == base
    other = str(_model_dir(tmp_path / "other"))
    assert baseline_model(merged, override=other) == other


def test_baseline_model_errors_name_the_record(tmp_path: Path):
    lost = _model_dir(tmp_path / "final", manifest={"base_model": "runs/gone/base_model"})
    with pytest.raises(ElementalError, match=r"base model 'runs/gone/base_model' \(from .*final/manifest.json\) "
                                             r"is not a folder here .*: pass --base_model$"):
        baseline_model(lost)
    with pytest.raises(ElementalError, match="no base_model recorded in .*bare/manifest.json or task.json"):
        baseline_model(_model_dir(tmp_path / "bare"))
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ElementalError, match="notamodel is not a model folder"):
        baseline_model(lost, override=str(tmp_path / "notamodel"))
