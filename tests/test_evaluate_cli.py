"""`elemental evaluate` through the real CLI: bad input (exit 2, one line naming the file), `--compare`,
and, on the tiny demo model (slow), `--baseline`, `--compare` of HF vs GGUF, `--min_accuracy` and `--split FILE`.

The bad-input cases need no model: the split and the baseline's base are checked before any model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_process import elemental, one_line_error
from PIL import Image

from elemental.classify.base import Prediction
from elemental.data.records import Record
from elemental.evaluate import evaluate_predictions, write_results


def _model(path: Path, labels: list[str] | None = None, **manifest: str) -> Path:
    """A folder that passes as an HF model until its weights are loaded (which these tests never reach)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "smolvlm"}')
    if labels:
        (path / "task.json").write_text(json.dumps({
            "labels": labels, "instruction": f"Which of {', '.join(labels)}?", "explain_instruction": "Why?"}))
    if manifest:
        (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def _dataset(path: Path, elements: list[str]) -> Path:
    (path / "images").mkdir(parents=True)
    records = []
    for i, element in enumerate(elements):
        Image.new("RGB", (32, 32), (40 * i, 90, 160)).save(path / "images" / f"{i}.png")
        records.append({"image_id": str(i), "image_path": f"images/{i}.png", "element": element, "reason": "r",
                        "confidence": 0.9})
    (path / "val.json").write_text(json.dumps(records))
    return path


def _results(folder: Path, name: str, predicted: list[str]) -> Path:
    """A results file for four photos (no images needed: the gallery shows a placeholder for each)."""
    labels = ["water", "land", "fire"]
    truth = ["water", "land", "fire", "water"]
    records = [Record(image_id=str(i), image_path=f"images/{i}.png", element=t, reason="r", confidence=1.0)
               for i, t in enumerate(truth)]
    preds = [Prediction(label=p, probabilities={lb: 0.8 if lb == p else 0.1 for lb in labels}, ms=5.0 + i)
             for i, p in enumerate(predicted)]
    out = folder / name
    write_results(evaluate_predictions(records, preds, labels, "hf", {}), out, folder)
    return out


# -- bad input --------------------------------------------------------------------------------------

def test_empty_val_split(tmp_path):
    _model(tmp_path / "m", ["water", "land"])
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "val.json").write_text("[]")
    res = elemental("evaluate", "--model_path", "m", "--dataset_dir", "ds", cwd=tmp_path)
    one_line_error(res, "ds/val.json", "no records")
    assert not (tmp_path / "validation_results.json").exists()


def test_split_label_the_model_does_not_know(tmp_path):
    # "fire" is one of the default task's labels, but not one of this model's (its task.json decides).
    _model(tmp_path / "m", ["water", "land"])
    _dataset(tmp_path / "ds", ["fire", "water"])
    res = elemental("evaluate", "--model_path", "m", "--dataset_dir", "ds", cwd=tmp_path)
    one_line_error(res, "val.json[0].element", "'fire'", "['water', 'land']")


def test_split_file_not_found(tmp_path):
    _model(tmp_path / "m", ["water", "land"])
    res = elemental("evaluate", "--model_path", "m", "--dataset_dir", "ds", "--split", "lists/hard.json",
                    cwd=tmp_path)
    one_line_error(res, "split file not found: lists/hard.json")


def test_gguf_folder_without_manifest(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "x-Q8_0.gguf").write_bytes(b"GGUF")
    _dataset(tmp_path / "ds", ["water"])
    res = elemental("evaluate", "--model_path", "g", "--dataset_dir", "ds", cwd=tmp_path)
    one_line_error(res, "g has no manifest.json")


def test_baseline_whose_base_is_a_hub_id_offline(tmp_path):
    _model(tmp_path / "m", ["water", "land"], base_model="nobody-here/no-such-model-0")
    _dataset(tmp_path / "ds", ["water", "land"])
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    res = elemental("evaluate", "--model_path", "m", "--dataset_dir", "ds", "--baseline", cwd=tmp_path, env=env)
    one_line_error(res, "'nobody-here/no-such-model-0'", "m/manifest.json", "nor loadable from the Hugging Face",
                    "--base_model")
    assert not (tmp_path / "validation_results.json").exists(), "failed before evaluating the fine-tune"


def test_base_model_without_baseline(tmp_path):
    res = elemental("evaluate", "--model_path", "m", "--base_model", "b", cwd=tmp_path)
    one_line_error(res, "--base_model is only used with --baseline")


def test_compare_with_a_missing_or_malformed_file(tmp_path):
    _results(tmp_path, "good.json", ["water", "land", "fire", "land"])
    (tmp_path / "a.json").write_text(json.dumps({"accuracy": 0.5}))
    (tmp_path / "broken.json").write_text('{"accuracy": ')
    one_line_error(elemental("evaluate", "--compare", "good.json", "gone.json", cwd=tmp_path),
                    "results file not found: gone.json")
    one_line_error(elemental("evaluate", "--compare", "good.json", "a.json", cwd=tmp_path),
                    "a.json: not a results file (no 'macro_f1')")
    one_line_error(elemental("evaluate", "--compare", "broken.json", "good.json", cwd=tmp_path),
                    "broken.json:1: invalid JSON")
    one_line_error(elemental("evaluate", "--compare", "good.json", "good.json", "--model_path", "m",
                              cwd=tmp_path), "--compare", "--model_path")


# -- compare on hand-made results (no model) ------------------------------------------------------

def test_compare_prints_both_columns_and_agreement(tmp_path):
    _results(tmp_path, "q8.json", ["water", "land", "fire", "land"])
    _results(tmp_path, "q4.json", ["water", "land", "water", "land"])
    res = elemental("evaluate", "--compare", "q8.json", "q4.json", "--output_path", "cmp/q8_vs_q4.json",
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("A: q8.json") and lines[1].startswith("B: q4.json")
    assert lines[2].split() == ["A", "B", "B", "-", "A"]
    assert lines[3].split() == ["accuracy", "0.750", "0.500", "-0.250"]
    assert any(ln.split()[:2] == ["F1", "fire"] for ln in lines)
    assert "label agreement: 0.750 on 4 photos" in res.stdout
    assert "  differ: images/2.png: truth fire, A fire, B water" in lines
    saved = json.loads((tmp_path / "cmp" / "q8_vs_q4.json").read_text())
    assert saved["agreement"] == 0.75 and saved["n"] == 4 and saved["a"] == "q8.json"
    assert saved["disagreements"] == [{"image_path": "images/2.png", "element": "fire", "a": "fire", "b": "water"}]
    assert {r["metric"] for r in saved["rows"]} >= {"accuracy", "macro-F1", "top-2 accuracy", "latency p95 (ms)"}


# -- on the tiny demo model ---------------------------------------------------------------------------

@pytest.mark.slow
def test_baseline_on_the_merged_model(demo_dir, tmp_path):
    # Run where the demo ran: the recorded base model path ("out/base_model") is relative to it.
    out = tmp_path / "res" / "validation_results.json"
    res = elemental("evaluate", "--model_path", "out/run/final", "--dataset_dir", "out/dataset", "--baseline",
                    "--plot_cm", "--output_path", str(out), "--min_accuracy", "0.0", cwd=demo_dir.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    fine, base = json.loads(out.read_text()), json.loads((out.parent / "validation_results_baseline.json").read_text())
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "confusion_matrix.png", "confusion_matrix_baseline.png", "errors.html", "errors_baseline.html",
        "validation_results.json", "validation_results_baseline.json"]
    assert base["backend"] == "hf" and base["n"] == fine["n"]
    assert all("base_model" in f for f in base["model_files"]) and all("final" in f for f in fine["model_files"])
    assert fine["accuracy"] >= 0.9 and fine["accuracy"] > base["accuracy"]  # an untrained tiny base is near chance
    table = res.stdout[res.stdout.index("zero-shot base out/base_model vs fine-tuned out/run/final (hf)"):]
    table = table.splitlines()[1:11]
    assert table[0].split() == ["baseline", "fine-tuned", "lift"]
    assert [ln[:ln.index("  ")] for ln in table[1:]] == [
        "accuracy", "macro-F1", "top-2 accuracy", "ECE (lower is better)", *(f"F1 {c}" for c in fine["per_class"])]
    acc = table[1].split()
    assert float(acc[1]) == pytest.approx(base["accuracy"], abs=1e-3)
    assert float(acc[2]) == pytest.approx(fine["accuracy"], abs=1e-3) and acc[3].startswith("+")
    assert f"accuracy {fine['accuracy']:.3f} >= --min_accuracy 0" in res.stdout

    # From elsewhere the relative record does not resolve: one line naming the record and the way out.
    res = elemental("evaluate", "--model_path", str(demo_dir / "run/final"), "--dataset_dir",
                    str(demo_dir / "dataset"), "--baseline", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    one_line_error(res, "base model 'out/base_model'", "run/final/manifest.json", "not a folder here",
                    "nor loadable from the Hugging Face hub", "--base_model")


@pytest.mark.slow
def test_baseline_of_base_plus_adapter_and_gguf_min_accuracy(demo_dir, tmp_path):
    # Base + --lora_path: the baseline is the base itself, without the adapter.
    res = elemental("evaluate", "--model_path", str(demo_dir / "base_model"), "--lora_path",
                    str(demo_dir / "run/lora_adapter"), "--dataset_dir", str(demo_dir / "dataset"), "--baseline",
                    "--output_path", "lora.json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lora, base = json.loads((tmp_path / "lora.json").read_text()), json.loads(
        (tmp_path / "lora_baseline.json").read_text())
    assert any("lora_adapter" in f for f in lora["model_files"])
    assert not any("lora_adapter" in f for f in base["model_files"])
    assert lora["accuracy"] >= 0.9 > base["accuracy"]

    # GGUF on a --split FILE, its base from the manifest (relative to where the demo ran, so run there);
    # below --min_accuracy → exit 1, with the results written.
    val = json.loads((demo_dir / "dataset/val.json").read_text())
    (tmp_path / "few.json").write_text(json.dumps(val[:6]))
    res = elemental("evaluate", "--model_path", "out/gguf", "--dataset_dir", "out/dataset", "--split",
                    str(tmp_path / "few.json"), "--baseline", "--output_path", str(tmp_path / "g.json"),
                    "--min_accuracy", "1.01", cwd=demo_dir.parent)
    assert res.returncode == 1, (res.stdout, res.stderr[-3000:])
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["backend"] == "gguf" and g["n"] == 6
    assert json.loads((tmp_path / "g_baseline.json").read_text())["backend"] == "hf"
    assert res.stderr.strip().splitlines()[-1] == f"accuracy {g['accuracy']:.3f} < --min_accuracy 1.01"

    res = elemental("evaluate", "--model_path", str(demo_dir / "gguf"), "--dataset_dir", str(demo_dir / "dataset"),
                    "--split", str(tmp_path / "few.json"), "--output_path", "g.json", "--min_accuracy", "0.0",
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow
def test_compare_hf_and_gguf_results_of_the_demo(demo_dir, tmp_path):
    hf, gg = demo_dir / "run/validation_results.json", demo_dir / "run/validation_results_gguf.json"
    res = elemental("evaluate", "--compare", str(hf), str(gg), "--output_path", "cmp.json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["agreement"] >= 0.99
    assert f"label agreement: {saved['agreement']:.3f} on {saved['n']} photos" in res.stdout
    assert "latency p50 (ms)" in res.stdout and "top-2 accuracy" in res.stdout

