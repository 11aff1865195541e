"""End to end through the real CLI: `elemental demo` on the tiny model, then the stages on its outputs.

The demo must *learn*: val accuracy well above chance (0.2 for five labels) for the HF model and for
the GGUF files through llama.cpp, and the two must agree on nearly every photo.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_process import elemental, export_evaluate_config, one_line_error

pytestmark = pytest.mark.slow


def test_demo_learns_and_ships_what_it_learned(demo_dir):
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert summary["hf_accuracy"] >= 0.9
    assert summary["gguf_accuracy"] >= 0.9
    assert summary["agreement"] >= 0.99  # the Q8_0 files that ship answer as the merged HF model does
    assert abs(summary["hf_accuracy"] - summary["gguf_accuracy"]) <= 0.01
    assert summary["merge_max_abs_logit_diff"] < 1e-3
    for key in ("base_model", "dataset", "run", "lora_adapter", "final", "gguf"):
        assert (demo_dir.parent / summary["paths"][key]).exists(), key  # relative to where demo ran


def test_training_validated_by_label_scoring_and_kept_the_best(demo_dir):
    metrics = json.loads((demo_dir / "run/metrics.json").read_text())
    history = metrics["eval_history"]
    assert len(history) >= 2 and history[-1]["step"] == metrics["steps"]
    assert metrics["val_accuracy"] == metrics["best_val_accuracy"] == max(h["eval_accuracy"] for h in history)
    assert metrics["best_val_accuracy"] >= 0.9
    assert metrics["last_logged_loss"] < metrics["first_logged_loss"] / 10  # the loss falls
    assert set(metrics["final_val_per_class"]) == {"water", "land", "fire", "wood", "metal"}
    # The frozen vision tower ran once per photo; every later epoch and evaluation read its output back.
    cache = metrics["tower_cache"]
    assert cache["used"] and cache["built"] == metrics["n_train_records"] + metrics["n_val"] and cache["hits"] > 0


def test_demo_layout_is_the_seeds(demo_dir):
    for rel in ("base_model/config.json", "dataset/train.json", "dataset/val.json", "dataset/metadata.json",
                "run/lora_adapter/adapter_config.json", "run/final/model.safetensors", "run/metrics.json",
                "run/logs", "gguf/manifest.json", "gguf/SmolVLM2-Tiny-Element-Q8_0.gguf",
                "gguf/mmproj-SmolVLM2-Tiny-Element-F16.gguf"):
        assert (demo_dir / rel).exists(), rel
    results = json.loads((demo_dir / "run/validation_results.json").read_text())
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix", "predictions", "backend", "latency_ms"):
        assert key in results
    assert results["backend"] == "hf"
    assert json.loads((demo_dir / "run/validation_results_gguf.json").read_text())["backend"] == "gguf"


def test_training_prompt_is_the_shipped_prompt(demo_dir):
    from elemental.config import TaskConfig
    from elemental.task import Task

    manifest = json.loads((demo_dir / "gguf/manifest.json").read_text())
    assert manifest["prompt"] == Task.from_config(TaskConfig()).prompt("label")


def test_classify_hf_and_gguf_agree_on_a_photo(demo_dir):
    val = json.loads((demo_dir / "dataset/val.json").read_text())
    photo = str(demo_dir / "dataset" / val[0]["image_path"])
    out = {}
    for model in ("run/final", "gguf"):
        res = elemental("classify", "--model_path", str(demo_dir / model), "--top_k", "2", photo, cwd=demo_dir)
        assert res.returncode == 0, res.stderr[-2000:]
        line = json.loads(res.stdout.strip().splitlines()[-1])
        assert abs(sum(line["probabilities"].values()) - 1) < 1e-4 and len(line["top_k"]) == 2
        out[model] = line["label"]
    assert out["run/final"] == out["gguf"] == val[0]["element"]


def test_bf16_training_on_this_cpu_keeps_the_demo_accuracy(demo_dir, tmp_path):
    """`train --bf16` on this machine's CPU: bf16 autocast where it has native bf16, else fp32 and the reason.

    Either way the demo must learn as well as the fp32 demo run did (within one of its 30 val photos).
    """
    from elemental.hardware import this_cpu
    from elemental.pipeline import demo_config

    cfg = demo_config(demo_dir)
    lines = ["[train]"] + [f"{k} = {json.dumps(str(v) if k.endswith('_dir') else v)}"
                           for k, v in cfg.train.model_dump().items() if v is not None and not isinstance(v, list)]
    (tmp_path / "bf16.toml").write_text("\n".join(lines) + f'\n[model]\nbase_model = "{cfg.model.base_model}"\n')
    res = elemental("train", "--config", "bf16.toml", "--output_dir", "run", "--bf16", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    fp32 = json.loads((demo_dir / "run/metrics.json").read_text())
    cpu = this_cpu()
    assert metrics["precision"] == ("bf16" if cpu.native_bf16 else "fp32"), (cpu.kind(), metrics["precision_reason"])
    if not cpu.native_bf16:
        assert "no native bf16" in res.stderr
    assert metrics["val_accuracy"] >= 0.9
    assert abs(metrics["val_accuracy"] - fp32["val_accuracy"]) <= 1 / fp32["n_val"] + 1e-9
    assert metrics["merge_max_abs_logit_diff"] < 1e-3


def test_evaluate_cli_on_gguf_writes_results(demo_dir, tmp_path):
    res = elemental("evaluate", "--model_path", str(demo_dir / "gguf"), "--dataset_dir", str(demo_dir / "dataset"),
                    "--output_path", str(tmp_path / "r.json"), "--plot_cm", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["backend"] == "gguf" and r["accuracy"] >= 0.9
    png = tmp_path / r["files"]["confusion_matrix"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / r["files"]["errors"]).read_text().lower().startswith("<!doctype html>")


def test_run_config_runs_only_its_stages(demo_dir, tmp_path):
    cfg = export_evaluate_config(tmp_path / "c.toml", demo_dir, tmp_path, "X", ["Q8_0", "Q4_K_M"])
    res = elemental("run", str(cfg), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "gguf" / "X-Q8_0.gguf").is_file() and (tmp_path / "gguf" / "X-Q4_K_M.gguf").is_file()
    assert json.loads((tmp_path / "res_gguf.json").read_text())["accuracy"] >= 0.9
    assert not (tmp_path / "res.json").exists(), "the hf backend was not asked for"

    # Q4_K_M: smaller and looser; its agreement with the merged HF model is reported, and must stay high.
    from elemental.evaluate import agreement

    res = elemental("evaluate", "--model_path", "gguf", "--quant", "Q4_K_M", "--dataset_dir",
                    str(demo_dir / "dataset"), "--output_path", "q4.json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    hf = json.loads((demo_dir / "run" / "validation_results.json").read_text())
    q4 = json.loads((tmp_path / "q4.json").read_text())
    print(f"Q4_K_M: accuracy {q4['accuracy']:.3f}, agreement with HF {agreement(hf, q4):.3f} on {q4['n']} photos")
    assert agreement(hf, q4) >= 0.9


def test_mmproj_carries_the_fine_tuned_connector(demo_dir):
    """LoRA trains the connector; the merged model holds the change and the shipped mmproj must hold it too
    (an mmproj converted from the base model would classify with the untrained connector)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import load_file

    key = "model.connector.modality_projection.proj.weight"
    base = load_file(demo_dir / "base_model" / "model.safetensors")[key]
    final = load_file(demo_dir / "run" / "final" / "model.safetensors")[key]
    mmproj = GGUFReader(demo_dir / "gguf" / "mmproj-SmolVLM2-Tiny-Element-F16.gguf")
    tensor = next(t for t in mmproj.tensors if t.name == "mm.model.fc.weight")
    shipped = dequantize(tensor.data, tensor.tensor_type).reshape(final.shape)
    trained = np.abs(final - base).max()
    print(f"connector: max |trained - base| {trained:.3g}, max |mmproj - trained| {np.abs(shipped - final).max():.3g}")
    assert trained > 0.01  # training moved the connector
    assert np.abs(shipped - final).max() < trained / 10  # ...and the mmproj carries it (F16 rounding only)


# -- bad input: one line naming the thing, exit code 2, nothing half-written ------------------------

def test_prepare_with_unknown_label_folder(tmp_path):
    (tmp_path / "photos" / "lava").mkdir(parents=True)
    res = elemental("prepare", "--source", "folder:photos", "--output_dir", "ds", cwd=tmp_path)
    one_line_error(res, "lava")
    assert not (tmp_path / "ds").exists()


def test_prepare_with_missing_folder(tmp_path):
    one_line_error(elemental("prepare", "--source", "folder:nope", "--output_dir", "ds", cwd=tmp_path), "nope")


def test_train_on_dataset_without_train_json(tmp_path, tiny_model_dir):
    (tmp_path / "ds").mkdir()
    res = elemental("train", "--dataset_dir", "ds", "--base_model", str(tiny_model_dir), "--output_dir", "run",
                    cwd=tmp_path)
    one_line_error(res, "train.json")
    assert not (tmp_path / "run" / "lora_adapter").exists()


def test_model_dir_that_is_not_a_smolvlm(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "bert"}')
    res = elemental("export", "--model_path", "m", "--output_dir", "g", cwd=tmp_path)
    one_line_error(res, "not a SmolVLM")
    assert not (tmp_path / "g").exists()


def test_gguf_folder_without_manifest(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "x.gguf").write_bytes(b"GGUF")
    (tmp_path / "p.png").write_bytes(b"")
    res = elemental("classify", "--model_path", "g", "p.png", cwd=tmp_path)
    one_line_error(res, "manifest")


def test_unreadable_image_in_classify(tmp_path, demo_dir):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    res = elemental("classify", "--model_path", str(demo_dir / "gguf"), "broken.jpg", cwd=tmp_path)
    one_line_error(res, "broken.jpg")


def test_train_refuses_a_bad_record_before_loading_the_model(tmp_path, tiny_model_dir, task):
    from elemental.config import PrepareConfig
    from elemental.data.prepare import prepare_dataset
    from elemental.synthetic import write_synthetic_photos

    photos = write_synthetic_photos(tmp_path / "photos", task.labels, per_class=3, seed=2)
    prepare_dataset(PrepareConfig(sources=[f"folder:{photos}"], output_dir=tmp_path / "ds",
                                  label_cache=tmp_path / "c.sqlite"), task, say=lambda _: None)
    val = json.loads((tmp_path / "ds" / "val.json").read_text())
    val[1]["element"] = "lava"
    (tmp_path / "ds" / "val.json").write_text(json.dumps(val))
    args = ("train", "--dataset_dir", "ds", "--base_model", str(tiny_model_dir), "--output_dir", "run")
    one_line_error(elemental(*args, cwd=tmp_path), "val.json[1].element", "lava")
    val[1]["element"], val[2]["image_path"] = "water", "images/missing.jpg"
    (tmp_path / "ds" / "val.json").write_text(json.dumps(val))
    one_line_error(elemental(*args, cwd=tmp_path), "val.json[2].image_path", "missing.jpg")
    assert not (tmp_path / "run" / "lora_adapter").exists()


@pytest.mark.parametrize("edge", [384, 256])
def test_smaller_geometries_train_export_and_agree_end_to_end(demo_dir, trained_at, tmp_path, edge):
    """The demo at 384 px (36 image tokens) and 256 px (16): it still learns, and what ships agrees with HF."""
    from elemental.evaluate import agreement

    out = trained_at(edge)
    manifest = json.loads((out / "gguf/manifest.json").read_text())
    assert manifest["image"]["longest_edge"] == edge and manifest["image"]["n_image_tokens"] == (edge // 64) ** 2
    hf = json.loads((out / "run/validation_results.json").read_text())
    gg = json.loads((out / "run/validation_results_gguf.json").read_text())
    print(f"{edge} px: HF accuracy {hf['accuracy']:.3f}, GGUF {gg['accuracy']:.3f}, agreement {agreement(hf, gg):.3f}, "
          f"GGUF p50 {gg['latency_ms']['p50']:.1f} ms")
    assert hf["accuracy"] >= 0.9 and gg["accuracy"] >= 0.9
    assert agreement(hf, gg) >= 0.99

    # The phone's library reads the geometry from the manifest and the mmproj alone: same answers as classify.
    from test_native import CLI, SAME_PIXELS, lines, max_dp, run

    val = json.loads((demo_dir / "dataset/val.json").read_text())[:10]
    photos = [str(demo_dir / "dataset" / r["image_path"]) for r in val]
    ours = lines(run(CLI, out / "gguf", *photos))
    theirs = lines(elemental("classify", "--model_path", str(out / "gguf"), *photos, cwd=tmp_path))
    assert [ours[k]["label"] for k in ours] == [theirs[k]["label"] for k in ours] and len(ours) == 10
    assert max_dp(ours, theirs) <= SAME_PIXELS  # the same JPEG decode on both sides


def test_train_takes_the_image_size_as_a_flag_and_refuses_one_the_tower_cannot_take(demo_dir, tmp_path):
    res = elemental("train", "--dataset_dir", str(demo_dir / "dataset"), "--base_model", str(demo_dir / "base_model"),
                    "--output_dir", str(tmp_path / "run"), "--image_longest_edge", "400", "--report_to", "none",
                    cwd=tmp_path)
    one_line_error(res, "400", "multiple of 64")
    assert not (tmp_path / "run" / "metrics.json").exists()
