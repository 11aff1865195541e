"""Smaller exact image geometries (issue 14): 384 px (36 image tokens) and 256 px (16) beside 512 (64).

HF feeds one smaller image to the same vision tower, whose embeddings map the smaller patch grid onto
its 32x32 position table by bucketing; export writes an mmproj whose image size is the smaller one and
whose position table holds exactly HF's rows, so stock llama.cpp computes what HF computes. Held here
to the same checks as 512 px in test_gguf: tokens, embeddings within 1% of HF's largest magnitude, label
log-probabilities.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from elemental.classify.gguf import GGUFClassifier
from elemental.classify.hf import HFClassifier
from elemental.errors import ElementalError
from elemental.export.gguf import export_gguf, position_rows
from elemental.model_io import VisionGeometry, apply_geometry, load_processor
from elemental.synthetic import synthetic_photo

EMBED_TOL = 0.01
F16_TOL = 0.025
PHOTO_SIZES = [(800, 450), (300, 640), (512, 512), (96, 120), (1000, 260)]


def test_tokens_per_geometry_and_what_is_refused(tiny_processor):
    g = VisionGeometry()
    assert [g.tokens(e) for e in (512, 448, 384, 320, 256, 192, 128, 64)] == [64, 49, 36, 25, 16, 9, 4, 1]
    processor = apply_geometry(load_processor_copy(tiny_processor), 384)
    assert processor.image_seq_len == 36 and processor.image_processor.size == {"longest_edge": 384}
    for bad in (300, 640, 0, 32):
        with pytest.raises(ElementalError, match=f"image_longest_edge {bad}: must be a multiple of 64"):
            g.check(bad)


def load_processor_copy(processor):
    import copy

    return copy.deepcopy(processor)


@pytest.mark.parametrize("grid", [32, 24, 16, 8])
def test_position_rows_are_the_ones_hf_uses(tiny_model_dir, grid):
    """The rows export writes into a smaller mmproj are exactly those HF's vision embeddings pick."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    emb = model.model.vision_model.embeddings
    side = emb.num_patches_per_side
    captured = {}

    def keep_ids(module, args, out) -> None:  # a hook that returns nothing leaves the output alone
        captured["ids"] = args[0]

    hook = emb.position_embedding.register_forward_hook(keep_ids)
    try:
        pixels = torch.zeros(1, 3, grid * emb.patch_size, grid * emb.patch_size)
        emb(pixels, torch.ones(1, grid, grid, dtype=torch.bool))
    finally:
        hook.remove()
    assert captured["ids"][0].tolist() == position_rows(side, grid)
    if grid == side:
        assert position_rows(side, grid) == list(range(side * side))


@pytest.fixture(scope="module")
def photos(task) -> list:
    return [synthetic_photo(task.labels[i % len(task.labels)], np.random.default_rng(i), size=size)
            for i, size in enumerate(PHOTO_SIZES)]


@pytest.fixture(scope="module", params=[384, 256])
def exported(request, tiny_model_dir, tmp_path_factory, task):
    """(edge, model folder saved at that geometry, its F16 export)."""
    edge = request.param
    root = tmp_path_factory.mktemp(f"g{edge}")
    model = Path(shutil.copytree(tiny_model_dir, root / "model"))
    load_processor(model, longest_edge=edge).save_pretrained(model)
    export_gguf(model, root / "gguf", task, quants=("F16",), mmproj_type="F16")
    return edge, model, root / "gguf"


@pytest.mark.slow
def test_smaller_geometry_export_matches_hf(exported, task, photos):
    edge, model, gguf = exported
    tokens = (edge // 16) ** 2 // 16
    manifest = json.loads((gguf / "manifest.json").read_text())
    assert manifest["image"]["longest_edge"] == manifest["image"]["tile_size"] == edge
    assert manifest["image"]["n_image_tokens"] == tokens
    hf = HFClassifier.from_path(model, task, device="cpu")  # the geometry saved with the model
    assert hf.longest_edge == edge
    processor = hf.processor
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    errors = []
    with GGUFClassifier(gguf, quant="F16") as gg:
        for img in photos:
            enc = processor(text=[task.prompt()], images=[[img]], return_tensors="pt")
            ids = enc["input_ids"][0].tolist()
            assert ids.count(image_id) == tokens
            first = ids.index(image_id)
            assert gg.prefix_ids == ids[:first]
            with torch.no_grad():
                ref = hf.model.get_image_features(pixel_values=enc["pixel_values"],
                                                  pixel_attention_mask=enc["pixel_attention_mask"])
            ref = ref.pooler_output[0].float().numpy()
            ours = gg.image_embeddings(img)
            assert ours.shape == ref.shape == (tokens, ref.shape[1])
            errors.append(float(np.abs(ours - ref).max() / np.abs(ref).max()))
        a = np.array([hf.label_logprobs(img) for img in photos])
        b = np.array([gg.label_logprobs(img) for img in photos])
    print(f"{edge} px: {tokens} tokens; image embeddings max relative |Δ| {np.round(errors, 5).tolist()}, "
          f"label log-probs max |Δ| {np.abs(a - b).max():.2e}")
    assert max(errors) < EMBED_TOL
    assert np.abs(a - b).max() < F16_TOL and (a.argmax(1) == b.argmax(1)).all()


@pytest.mark.slow
def test_the_mmproj_table_holds_hfs_rows_not_the_first_ones(exported, tiny_model_dir):
    """The shipped table is HF's bucketed rows; the naive alternative (the table's first rows) differs."""
    import gguf as gguf_py
    from safetensors.torch import load_file

    edge, _, gguf_dir = exported
    reader = gguf_py.GGUFReader(str(next(gguf_dir.glob("mmproj-*.gguf"))))
    table = next(t for t in reader.tensors if t.name == "v.position_embd.weight")
    shipped = np.asarray(table.data, dtype=np.float32).reshape(-1, table.shape[0])
    full = load_file(tiny_model_dir / "model.safetensors")[
        "model.vision_model.embeddings.position_embedding.weight"].numpy()
    rows = position_rows(32, edge // 16)
    assert shipped.shape == (len(rows), full.shape[1])
    assert np.abs(shipped - full[rows]).max() < 1e-6  # F32 in the mmproj: exactly HF's rows
    assert np.abs(shipped - full[: len(rows)]).max() > 0.1  # the first rows would be another table
