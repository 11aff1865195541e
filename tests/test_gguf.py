"""GGUF export and the llama.cpp backend against the HF model they came from (DESIGN §3, §4, §5).

One tiny random SmolVLM is built and saved with the one-tile geometry, as `merge` leaves it; it is
exported a few ways and asked about synthetic photos of different sizes through both backends.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from elemental.classify.gguf import GGUFClassifier
from elemental.classify.hf import HFClassifier
from elemental.classify.llama_runtime import AMX_BUFFER, build_has_amx
from elemental.config import REAL_BASE_MODEL, TaskConfig
from elemental.errors import ElementalError
from elemental.export import convert
from elemental.export.gguf import export_gguf, label_grammar
from elemental.fileio import sha256_file
from elemental.hardware import AMX_FLAGS, this_cpu
from elemental.model_io import load_model, load_processor
from elemental.synthetic import TINY_MARKER, build_tiny_model, synthetic_photo
from elemental.task import Task

pytestmark = pytest.mark.slow

# Measured on the tiny model over 30 synthetic photos (2-core x86 CPU, llama-cpp-python 0.3.36): max
# |Δ label log-prob| between HF fp32 and llama.cpp was 6.5e-3 at F16 text + F16 mmproj (2-4e-3 even at
# F32: ggml's own GELU/resize numerics) and 0.11 at Q8_0 text + Q8_0 mmproj. The bounds leave ~3-4x margin.
F16_TOL = 0.025
Q8_TOL = 0.3
# The random tiny model has near-ties (HF top-2 gaps down to 0.02 on those 30 photos); Q8_0 may flip a
# near-tie, so its answer must equal HF's wherever HF's margin is wider than twice Q8_0's worst error.
Q8_DECIDED_GAP = 0.2
# HF fp32 vs llama.cpp F16 mmproj image embeddings, relative to their largest magnitude.
EMBED_TOL = 0.01
# Sizes and aspect ratios: landscape, portrait, square, tiny, wide panorama, exactly one tile.
PHOTO_SIZES = [(800, 450), (300, 640), (512, 512), (96, 120), (1000, 260), None]


@pytest.fixture(scope="module")
def task() -> Task:
    return Task.from_config(TaskConfig())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, task) -> Path:
    """The tiny model with its processor saved at the 512-px one-tile geometry, like `merge`'s output."""
    d = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", task)
    load_processor(d, longest_edge=512).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def f16_dir(tmp_path_factory, model_dir, task) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "f16"
    export_gguf(model_dir, out, task, quants=("F16",), mmproj_type="F16", source_run="runs/test")
    return out


@pytest.fixture(scope="module")
def q8_dir(tmp_path_factory, model_dir, task) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "q8"
    export_gguf(model_dir, out, task, mmproj_type="Q8_0")  # the seed's files: Q8_0 text, Q8_0 mmproj
    return out


@pytest.fixture(scope="module")
def hf(model_dir, task) -> HFClassifier:
    torch.manual_seed(0)
    return HFClassifier.from_path(model_dir, task, device="cpu")


@pytest.fixture(scope="module")
def photos(task) -> list:
    return [synthetic_photo(task.labels[i % len(task.labels)], np.random.default_rng(i), size=size)
            for i, size in enumerate(PHOTO_SIZES)]


def _compare(hf: HFClassifier, gg: GGUFClassifier, photos: list) -> tuple[np.ndarray, np.ndarray]:
    """Label log-probs of every photo through both backends: (HF, GGUF), one row per photo."""
    return (np.array([hf.label_logprobs(img) for img in photos]),
            np.array([gg.label_logprobs(img) for img in photos]))


def _top2_gap(logprobs: np.ndarray) -> np.ndarray:
    top2 = np.sort(logprobs, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


# -- the export folder -------------------------------------------------------------------------------


def test_export_writes_files_and_manifest(f16_dir, task):
    manifest = json.loads((f16_dir / "manifest.json").read_text())
    names = {"SmolVLM2-500M-Element-F16.gguf", "mmproj-SmolVLM2-500M-Element-F16.gguf"}
    assert set(manifest["files"]) == names
    assert {p.name for p in f16_dir.iterdir()} == names | {"manifest.json"}  # no intermediate left
    for name, info in manifest["files"].items():
        assert info["sha256"] == sha256_file(f16_dir / name)
        assert info["size_bytes"] == (f16_dir / name).stat().st_size
    assert manifest["labels"] == list(task.labels)
    assert manifest["prompt"] == task.prompt()
    assert manifest["prompt"][manifest["image_marker_offset"]:].startswith(manifest["image_marker"])
    assert manifest["grammar"] == label_grammar(task.labels) == (
        'root ::= " water" | " land" | " fire" | " wood" | " metal"')
    assert manifest["image"]["n_image_tokens"] == 64 and manifest["image"]["longest_edge"] == 512
    assert manifest["first_token_scoring"] is True
    assert manifest["source_run"] == "runs/test"
    assert manifest["converter"]["tokenizer_pre_override"] == "smollm"
    assert manifest["versions"]["llama_cpp_python"] == "0.3.36"


def test_seed_file_names_with_a_q8_mmproj(q8_dir):
    files = json.loads((q8_dir / "manifest.json").read_text())["files"]
    assert {name: (f["role"], f["quant"]) for name, f in files.items()} == {
        "SmolVLM2-500M-Element-Q8_0.gguf": ("text", "Q8_0"),
        "mmproj-SmolVLM2-500M-Element-Q8_0.gguf": ("mmproj", "Q8_0"),
    }


# -- prompt and image layout: what llama.cpp evaluates is HF's single-image sequence -------------------


def test_prompt_and_image_positions_match_hf(f16_dir, model_dir, task, photos):
    processor = load_processor(model_dir)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    with GGUFClassifier(f16_dir, quant="F16") as gg:
        for img in photos:
            enc = processor(text=[task.prompt()], images=[[img]], return_tensors="pt")
            ids = enc["input_ids"][0].tolist()
            first, last = ids.index(image_id), len(ids) - 1 - ids[::-1].index(image_id)
            assert gg.prefix_ids == ids[:first]
            assert gg.suffix_ids == ids[last + 1:]
            gg._truncate(gg.n_prefix)
            n_image = gg._eval_overview(img, gg.n_prefix) - gg.n_prefix
            assert n_image == ids.count(image_id) == last + 1 - first == 64


def _hf_image_embeddings(hf: HFClassifier, img) -> np.ndarray:
    enc = hf.processor(text=[hf.prompt], images=[[img]], return_tensors="pt")
    with torch.no_grad():
        out = hf.model.get_image_features(pixel_values=enc["pixel_values"],
                                          pixel_attention_mask=enc["pixel_attention_mask"])
    return out.pooler_output[0].float().numpy()


def _letterboxed(img):
    """The photo fitted into a square with padding: the plausible preprocessing that HF does *not* do."""
    from PIL import Image, ImageOps

    return ImageOps.pad(img, (512, 512), method=Image.Resampling.BICUBIC, color=(0, 0, 0))


def test_preprocessing_parity_for_every_size(f16_dir, hf, photos):
    """For each size and aspect ratio, libmtmd's overview is HF's one image: the same number of image tokens
    and, within float tolerance, the same embeddings (resize, normalisation, vision tower and connector all
    agree; both stretch the photo to one 512x512 tile). Letterboxing the photo instead, a preprocessing
    mistake an app could make, lands far outside that tolerance, so the check can tell."""
    with GGUFClassifier(f16_dir, quant="F16") as gg:
        errors, letterboxed = [], []
        for img in photos:
            ref, ours = _hf_image_embeddings(hf, img), gg.image_embeddings(img)
            assert ours.shape == ref.shape == (64, ref.shape[1])
            scale = np.abs(ref).max()
            errors.append(np.abs(ours - ref).max() / scale)
            if img.width != img.height:
                padded = _hf_image_embeddings(hf, _letterboxed(img))
                letterboxed.append(np.abs(padded - ref).max() / scale)
    print(f"image embeddings, max relative |Δ| HF vs llama.cpp per photo: {np.round(errors, 5).tolist()}; "
          f"HF letterboxed vs HF: {np.round(letterboxed, 3).tolist()}")
    assert max(errors) < EMBED_TOL
    assert min(letterboxed) > 5 * EMBED_TOL


def test_large_photos_are_brought_to_the_training_size_first(f16_dir, hf, task):
    """A camera-size photo is first bounded to 1024 px by both backends, as `prepare` stored the training
    photos: classifying it is classifying that smaller photo, exactly."""
    from elemental.images import PHOTO_MAX_SIDE, bounded

    big = synthetic_photo("fire", np.random.default_rng(7), size=(3000, 2000))
    small = bounded(big, PHOTO_MAX_SIDE)
    assert max(small.size) == PHOTO_MAX_SIDE
    assert hf.label_logprobs(big) == hf.label_logprobs(small)
    with GGUFClassifier(f16_dir, quant="F16") as gg:
        assert gg.label_logprobs(big) == gg.label_logprobs(small)


# -- label probabilities -------------------------------------------------------------------------------


def test_f16_label_logprobs_match_hf(f16_dir, hf, photos):
    with GGUFClassifier(f16_dir, quant="F16") as gg:
        a, b = _compare(hf, gg, photos)
        pred = gg.classify(photos[0])
    delta = np.abs(a - b).max()
    print(f"F16: max |Δ label logprob| HF vs GGUF = {delta:.2e} over {len(photos)} photos")
    assert delta < F16_TOL
    assert (a.argmax(1) == b.argmax(1)).all()
    assert pred.label in pred.probabilities and abs(sum(pred.probabilities.values()) - 1) < 1e-9
    assert pred.ms > 0


def test_q8_same_answers_as_hf(q8_dir, hf, photos):
    with GGUFClassifier(q8_dir) as gg:
        a, b = _compare(hf, gg, photos)
        assert set(gg.model_files()) == {str(gg.text_path), str(gg.mmproj_path)}
    delta = np.abs(a - b).max()
    decided = _top2_gap(a) > Q8_DECIDED_GAP
    print(f"Q8_0: max |Δ label logprob| HF vs GGUF = {delta:.2e} over {len(photos)} photos; "
          f"HF top-2 gaps {np.round(_top2_gap(a), 3).tolist()}")
    assert delta < Q8_TOL
    assert decided.sum() >= 4
    assert (a.argmax(1) == b.argmax(1))[decided].all()


def test_continuation_scoring_matches_hf(tmp_path, model_dir, photos):
    """Labels that share a first token (" water" / " waterfall") are scored over all their tokens; each
    label is rolled back before the next, so a wrong rollback would show as a mismatch with HF."""
    task = Task.from_config(TaskConfig(labels=["water", "waterfall", "land"]))
    manifest = export_gguf(model_dir, tmp_path / "gguf", task, quants=("F16", "Q4_K_M"), mmproj_type="F16")
    assert manifest["first_token_scoring"] is False
    assert max(len(ids) for ids in manifest["label_token_ids"]) > 1
    hf = HFClassifier(load_model(model_dir, device=torch.device("cpu")), load_processor(model_dir), task)
    assert hf.first_token is False
    with GGUFClassifier(tmp_path / "gguf", quant="F16") as gg:
        a, b = _compare(hf, gg, photos[:3])
    with GGUFClassifier(tmp_path / "gguf", quant="Q4_K_M") as q4:
        assert q4.classify(photos[0]).label in task.labels
    delta = np.abs(a - b).max()
    print(f"F16 continuation: max |Δ label logprob| = {delta:.2e}")
    assert delta < F16_TOL * 2  # a sum over up to 5 tokens' log-probs
    assert (a.argmax(1) == b.argmax(1)).all()


# -- the CPU: llama.cpp's AMX path segfaults (llama.cpp#20824) ----------------------------------------


def test_no_weight_lives_in_an_amx_buffer(q8_dir, photos):
    """Whatever llama.cpp build is installed, on whatever CPU this runs: no weight in an AMX buffer."""
    with GGUFClassifier(q8_dir) as gg:
        buffers, extra = gg.weight_buffers, gg.extra_bufts
        assert gg.classify(photos[0]).label in gg.labels
    cpu = this_cpu()
    print(f"{cpu.kind()}; llama.cpp AMX kernels: {build_has_amx()}; weights in {buffers}; extra buffer types {extra}")
    assert buffers, "llama.cpp reported no weight buffers: the AMX check would be blind"
    assert AMX_BUFFER not in buffers
    # Repacking is switched off only where it is dangerous: it is the fast path on phones.
    assert extra is not (build_has_amx() and (cpu.amx or not cpu.flags))


def test_forced_extra_buffer_types_still_keep_weights_out_of_amx(q8_dir, photos):
    with GGUFClassifier(q8_dir, extra_bufts=True) as gg:
        assert gg.weight_buffers and AMX_BUFFER not in gg.weight_buffers
        assert gg.classify(photos[0]).label in gg.labels


@pytest.mark.parametrize("extra_bufts", [None, True])
def test_gguf_classifies_on_this_machines_real_cpu(q8_dir, photos, tmp_path, extra_bufts):
    """A fresh process on this CPU, as a user runs it: a crash inside ggml (SIGSEGV, SIGILL) fails this test
    with the CPU's flags instead of taking pytest down."""
    photos[1].save(tmp_path / "photo.png")
    code = ("import json, sys; from PIL import Image; from elemental.classify.gguf import GGUFClassifier; "
            f"c = GGUFClassifier(sys.argv[1], extra_bufts={extra_bufts}); "
            "print(json.dumps({'label': c.classify(Image.open(sys.argv[2])).label, 'buffers': c.weight_buffers}))")
    res = subprocess.run([sys.executable, "-c", code, str(q8_dir), str(tmp_path / "photo.png")],
                         capture_output=True, text=True, timeout=300)
    cpu = this_cpu()
    said = f"{cpu.model}, {cpu.kind()}, AMX flags {sorted(cpu.flags & AMX_FLAGS)}, llama.cpp AMX {build_has_amx()}"
    assert res.returncode == 0, f"{said}: exit {res.returncode}\n{res.stderr[-2000:]}"
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert AMX_BUFFER not in out["buffers"] and out["label"] in ("water", "land", "fire", "wood", "metal")


# -- errors -------------------------------------------------------------------------------------------


def test_folder_without_manifest_is_refused(tmp_path, f16_dir):
    shutil.copytree(f16_dir, tmp_path / "g")
    (tmp_path / "g" / "manifest.json").unlink()
    with pytest.raises(ElementalError, match="no manifest.json"):
        GGUFClassifier(tmp_path / "g")
    with pytest.raises(ElementalError, match="not found"):
        GGUFClassifier(tmp_path / "missing")


def test_file_changed_after_export_is_refused(tmp_path, f16_dir):
    """Same name and size, different bytes (a file from another export, or a corrupt copy): the sha256 says so."""
    shutil.copytree(f16_dir, tmp_path / "g")
    mmproj = tmp_path / "g" / "mmproj-SmolVLM2-500M-Element-F16.gguf"
    data = bytearray(mmproj.read_bytes())
    data[-1] ^= 0xFF
    mmproj.write_bytes(bytes(data))
    with pytest.raises(ElementalError, match="sha256 .* differs from .*manifest.json"):
        GGUFClassifier(tmp_path / "g", quant="F16")


def test_missing_or_unexported_file_is_refused(tmp_path, f16_dir):
    shutil.copytree(f16_dir, tmp_path / "g")
    with pytest.raises(ElementalError, match="Q8_0"):
        GGUFClassifier(tmp_path / "g", quant="Q8_0")
    (tmp_path / "g" / "mmproj-SmolVLM2-500M-Element-F16.gguf").unlink()
    with pytest.raises(ElementalError, match="GGUF file missing"):
        GGUFClassifier(tmp_path / "g", quant="F16")


def test_export_refuses_bad_input(tmp_path, model_dir, task):
    with pytest.raises(ElementalError, match="not found"):
        export_gguf(tmp_path / "nope", tmp_path / "out", task)
    (tmp_path / "notvlm").mkdir()
    (tmp_path / "notvlm" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ElementalError, match="not a SmolVLM"):
        export_gguf(tmp_path / "notvlm", tmp_path / "out", task)
    with pytest.raises(ElementalError, match="Q3"):
        export_gguf(model_dir, tmp_path / "out", task, quants=("Q3",))
    tiled = tmp_path / "tiled"
    shutil.copytree(model_dir, tiled)
    cfg = json.loads((tiled / "processor_config.json").read_text())
    cfg["image_processor"]["do_image_splitting"] = True
    (tiled / "processor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ElementalError, match="not one image per photo"):
        export_gguf(tiled, tmp_path / "out", task)
    (tiled / "processor_config.json").unlink()
    with pytest.raises(ElementalError, match="has no processor"):
        export_gguf(tiled, tmp_path / "out", task)
    assert not (tmp_path / "out").exists()


def test_converter_failure_names_the_cause(tmp_path, model_dir, task):
    """Without the tiny marker the converter runs untouched, and rejects the locally trained tokenizer."""
    unmarked = tmp_path / "unmarked"
    shutil.copytree(model_dir, unmarked)
    (unmarked / TINY_MARKER).unlink()
    with pytest.raises(ElementalError, match="converter failed.*pre-tokenizer was not recognized"):
        export_gguf(unmarked, tmp_path / "out", task, quants=("F16",))
    assert not (tmp_path / "out").exists()


# -- the converter launcher (no conversion needed) -------------------------------------------------------


def test_tokenizer_pre_is_forced_only_for_marked_models(tmp_path, model_dir):
    plain = tmp_path / "plain"
    plain.mkdir()
    merged_real = tmp_path / "merged_real"
    merged_real.mkdir()
    (merged_real / "manifest.json").write_text(json.dumps({"stage": "merge", "base_model": REAL_BASE_MODEL}))
    assert convert.tokenizer_pre_override(model_dir) == "smollm"
    assert convert.tokenizer_pre_override(plain) is None
    assert convert.tokenizer_pre_override(merged_real) is None
    marked_cmd = convert.converter_command(model_dir, tmp_path / "o.gguf", "f16", mmproj=False)
    plain_cmd = convert.converter_command(plain, tmp_path / "o.gguf", "q8_0", mmproj=True)
    assert marked_cmd[marked_cmd.index("--tokenizer-pre") + 1] == "smollm"
    assert "--tokenizer-pre" not in plain_cmd and "--mmproj" in plain_cmd


def test_forced_tokenizer_pre_only_replaces_the_failure():
    class Known:
        def get_vocab_base_pre(self, tokenizer):
            return "llama-bpe"

    class Unknown:
        def get_vocab_base_pre(self, tokenizer):
            raise NotImplementedError("BPE pre-tokenizer was not recognized")

    for cls in (Known, Unknown):
        convert._force_tokenizer_pre(cls, "smollm")
    assert Known().get_vocab_base_pre(None) == "llama-bpe"
    assert Unknown().get_vocab_base_pre(None) == "smollm"


def test_quantized_types_go_through_a_removed_f16_intermediate(tmp_path, monkeypatch):
    calls = []

    def fake_converter(model_dir, outfile, gguf_type, mmproj=False):
        calls.append(("convert", Path(outfile).name, gguf_type))
        Path(outfile).write_bytes(b"gguf")
        return Path(outfile)

    def fake_quantize(src, dst, gguf_type, n_threads=None):
        calls.append(("quantize", Path(src).name, gguf_type))
        Path(dst).write_bytes(b"gguf")
        return Path(dst)

    monkeypatch.setattr(convert, "run_converter", fake_converter)
    monkeypatch.setattr(convert, "quantize", fake_quantize)
    convert.convert_text(tmp_path, {"Q4_K_M": tmp_path / "m-Q4_K_M.gguf"})
    assert calls == [("convert", "text-F16.gguf", "F16"), ("quantize", "text-F16.gguf", "Q4_K_M")]
    assert [p.name for p in tmp_path.iterdir()] == ["m-Q4_K_M.gguf"]


def test_missing_converter_says_run_make_install(tmp_path, monkeypatch):
    monkeypatch.setenv(convert.LLAMA_CPP_DIR_ENV, str(tmp_path))
    with pytest.raises(ElementalError, match="make install"):
        convert.llama_cpp_dir()
