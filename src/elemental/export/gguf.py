"""`elemental export`: a merged SmolVLM folder -> llama.cpp GGUF files plus the manifest that says how to ask.

The folder holds `{name}-{Q}.gguf` (text model, one per type), `mmproj-{name}-{T}.gguf` (vision encoder
+ connector) and `manifest.json`. The manifest is the contract for every llama.cpp client (our `gguf`
backend, the Android app): the exact text before and after the image with its token ids, which image
chunk to evaluate, the label token ids and how to score them, the geometry, a grammar for clients that
can only generate, and the sha256 of every file. Export checks that llama.cpp tokenizes the prompt and
the labels exactly as HF does, so a wrong tokenizer conversion fails here, not silently on the phone.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..classify.gguf import MANIFEST
from ..classify.llama_runtime import gguf_vocab, runtime_versions, tokenize
from ..errors import ElementalError
from ..fileio import atomic_dir, read_json, sha256_file, write_json_atomic
from ..images import PHOTO_MAX_SIDE
from ..model_io import check_smolvlm_dir, load_processor, vision_geometry
from ..task import END_OF_UTTERANCE, IMAGE_TOKEN, Task
from .convert import (
    MMPROJ_TYPES,
    TEXT_TYPES,
    convert_mmproj,
    convert_text,
    converter_source,
    tokenizer_pre_override,
)

DEFAULT_NAME = "SmolVLM2-500M-Element"
FORMAT = "elemental-gguf/1"


def export_gguf(
    model_dir: Path,
    out_dir: Path,
    task: Task,
    name: str = DEFAULT_NAME,
    quants: Sequence[str] = ("Q8_0",),
    mmproj_type: str = "F16",
    source_run: str | None = None,
) -> dict:
    """Convert `model_dir` into `out_dir` (replaced atomically) and return the manifest written there."""
    model_dir = Path(model_dir)
    quants = _check_request(model_dir, name, quants, mmproj_type)
    processor = load_processor(model_dir)  # the merged folder carries the one-tile geometry; don't override
    image = image_geometry(model_dir, processor)
    prefix, suffix = prompt_around_image(task, processor)
    label_ids = task.label_token_ids(processor.tokenizer)
    first_token = task.first_tokens_unique(processor.tokenizer)
    with atomic_dir(Path(out_dir)) as tmp:
        text = convert_text(model_dir, {q: tmp / f"{name}-{q}.gguf" for q in quants})
        with tempfile.TemporaryDirectory(prefix=".mmproj-src-", dir=tmp) as scratch:
            source = mmproj_source(model_dir, image["longest_edge"], Path(scratch))
            mmproj = convert_mmproj(source, tmp / f"mmproj-{name}-{mmproj_type}.gguf", mmproj_type)
        expected = {"prompt_prefix": prefix, "prompt_suffix": suffix,
                    **{f"label {lab!r}": f" {lab}" for lab in task.labels}}
        ids = _same_tokens_as_hf(text[quants[0]], processor.tokenizer, expected)
        files = {p.name: _file_entry(p, "text", q) for q, p in text.items()}
        files[mmproj.name] = _file_entry(mmproj, "mmproj", mmproj_type)
        manifest = {
            "format": FORMAT,
            "name": name,
            "labels": list(task.labels),
            "prompt": task.prompt("label"),
            "image_marker": IMAGE_TOKEN,
            "image_marker_offset": task.prompt("label").index(IMAGE_TOKEN),
            "prompt_prefix": prefix,
            "prompt_suffix": suffix,
            "prompt_prefix_token_ids": ids["prompt_prefix"],
            "prompt_suffix_token_ids": ids["prompt_suffix"],
            "tokenize": {"add_special": False, "parse_special": True},
            "image": image,
            "label_token_ids": label_ids,
            "first_token_scoring": first_token,
            "scoring": _scoring(first_token),
            "sampling": {"greedy": True, "temperature": 0.0, "top_k": 1,
                         "n_predict": max(len(t) for t in label_ids), "stop": [END_OF_UTTERANCE]},
            "grammar": label_grammar(task.labels),
            "files": files,
            # The manifest ships to phones: no absolute path of the build machine in it.
            "base_model": portable_path(base_model_of(model_dir)),
            "model_dir": portable_path(str(model_dir)),
            "source_run": portable_path(source_run) if source_run else None,
            "converter": {"source": converter_source(),
                          "tokenizer_pre_override": tokenizer_pre_override(model_dir)},
            "versions": runtime_versions(),
        }
        write_json_atomic(tmp / MANIFEST, manifest)
    return manifest


def _check_request(model_dir: Path, name: str, quants: Sequence[str], mmproj_type: str) -> list[str]:
    """Fail early, before any conversion, on a bad folder, name or type list."""
    if not model_dir.is_dir():
        raise ElementalError(f"model folder not found: {model_dir}")
    check_smolvlm_dir(model_dir)
    if not name or Path(name).name != name:
        raise ElementalError(f"export name {name!r} must be a plain file-name stem")
    quants = list(dict.fromkeys(quants))
    bad = [q for q in quants if q not in TEXT_TYPES]
    if not quants or bad:
        raise ElementalError(f"text GGUF types {bad or '(none)'} invalid; choose from {list(TEXT_TYPES)}")
    if mmproj_type not in MMPROJ_TYPES:
        raise ElementalError(f"mmproj type {mmproj_type!r} invalid; choose from {list(MMPROJ_TYPES)}")
    return quants


def image_geometry(model_dir: Path, processor) -> dict:
    """The one-image geometry the processor carries; anything llama.cpp's overview can't reproduce is refused.

    libmtmd resizes the overview to the mmproj's image size, so HF must feed exactly one image of that
    size: no splitting, longest edge == max image size, a multiple of patch x pixel shuffle up to the
    tower's tile (512: 64 tokens, 384: 36, 256: 16). Below the tile, `mmproj_source` gives the mmproj
    HF's position rows for that grid.
    """
    ip = processor.image_processor
    geometry = vision_geometry(model_dir)
    longest = (ip.size or {}).get("longest_edge")
    max_edge = (ip.max_image_size or {}).get("longest_edge")
    if ip.do_image_splitting or longest != max_edge or not isinstance(longest, int):
        raise ElementalError(
            f"{model_dir}: processor geometry (longest_edge={longest}, max_image_size={max_edge}, "
            f"do_image_splitting={ip.do_image_splitting}) is not one image per photo; save the processor "
            f"after model_io.apply_geometry(processor, EDGE) (train and merge do)")
    geometry.check(longest, f"{model_dir}: processor longest_edge")
    if processor.image_seq_len != geometry.tokens(longest):
        raise ElementalError(f"{model_dir}: processor image_seq_len {processor.image_seq_len} is not the "
                             f"{geometry.tokens(longest)} tokens of a {longest}-px image")
    tile = longest  # the mmproj's image size: libmtmd resizes the overview to it
    return {
        "longest_edge": longest,
        "tile_size": tile,
        "encoder_patches": (longest // geometry.patch_size) ** 2,
        "image_seq_len": processor.image_seq_len,
        "n_image_tokens": processor.image_seq_len,
        "image_mean": list(ip.image_mean),
        "image_std": list(ip.image_std),
        "do_image_splitting": False,
        "photo_max_side": PHOTO_MAX_SIDE,  # bring photos down to this first (box/Lanczos), as prepare did
        "evaluate_chunk": "overview",
        "overview_start_token": processor.global_image_token,
        "note": ("libmtmd tokenizes a photo as a 1x1 grid: a slice chunk and an overview chunk. Evaluate "
                 "only the overview (global) image chunk, between prompt_prefix and prompt_suffix; that is "
                 "HF's single-image layout."),
    }


POSITION_EMBEDDING = "model.vision_model.embeddings.position_embedding.weight"


def position_rows(table_side: int, grid: int) -> list[int]:
    """The rows of a `table_side`^2 position table that HF's SmolVLM vision embeddings use for a `grid`^2 patch grid.

    HF maps each patch's fractional coordinate onto the table by `torch.bucketize` (SmolVLMVisionEmbeddings);
    computed here with the same float32 torch operations, so the rows are exactly HF's.
    """
    import torch

    boundaries = torch.arange(1 / table_side, 1.0, 1 / table_side)
    step = 1.0 / torch.tensor([grid])
    coords = torch.clamp(torch.arange(grid, dtype=torch.float32) * step, max=1.0 - 1e-6)
    buckets = torch.bucketize(coords, boundaries, right=True)
    return (buckets[:, None] * table_side + buckets[None, :]).flatten().tolist()


def mmproj_source(model_dir: Path, longest_edge: int, scratch: Path) -> Path:
    """The folder to convert the mmproj from: `model_dir` itself at the tower's own tile size, else a copy
    whose vision tower says `longest_edge` and whose position table is the rows HF uses for that grid.

    llama.cpp adds an SmolVLM mmproj's position table to the patches as it is, one row per patch of its
    `image_size`; HF picks rows of the 32x32 table by bucketing. Writing HF's rows makes stock llama.cpp
    compute what HF computes at 384 or 256 px (tested), with no change to llama.cpp.
    """
    geometry = vision_geometry(model_dir)
    if longest_edge == geometry.image_size:
        return model_dir
    from safetensors.torch import load_file, save_file

    side = geometry.image_size // geometry.patch_size
    rows = position_rows(side, longest_edge // geometry.patch_size)
    tensors = {}  # the vision tower and connector only: the mmproj conversion reads nothing else
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update((k, t) for k, t in load_file(f).items() if ".vision_model." in k or ".connector." in k)
    if POSITION_EMBEDDING not in tensors:
        raise ElementalError(f"{model_dir}: no {POSITION_EMBEDDING} in its weights (not a SmolVLM?)")
    tensors[POSITION_EMBEDDING] = tensors[POSITION_EMBEDDING][rows].contiguous()
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy2(f, scratch / f.name)
    config = json.loads((model_dir / "config.json").read_text())
    config["vision_config"]["image_size"] = longest_edge
    (scratch / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, scratch / "model.safetensors", metadata={"format": "pt"})
    return scratch


def prompt_around_image(task: Task, processor) -> tuple[str, str]:
    """The text evaluated before and after the image embeddings, in HF's single-image layout."""
    before, after = task.prompt_parts()
    fake = processor.fake_image_token
    return before + fake + processor.global_image_token, fake + after


def _same_tokens_as_hf(text_gguf: Path, hf_tokenizer, texts: dict[str, str]) -> dict[str, list[int]]:
    """llama.cpp's token ids of each text; they must equal HF's, else the GGUF would be asked differently."""
    out = {}
    with gguf_vocab(text_gguf) as vocab:
        for what, text in texts.items():
            ours = tokenize(vocab, text)
            hf = list(hf_tokenizer.encode(text, add_special_tokens=False))
            if ours != hf:
                raise ElementalError(
                    f"{text_gguf.name}: llama.cpp tokenizes the {what} as {ours}, HF as {hf}")
            out[what] = ours
    return out


def _file_entry(path: Path, role: str, quant: str) -> dict:
    return {"sha256": sha256_file(path), "size_bytes": path.stat().st_size, "role": role, "quant": quant}


def _scoring(first_token: bool) -> dict:
    if first_token:
        method = "log_softmax of the logits after prompt_suffix, at each label's first token id"
    else:
        method = "sum of the log-probs of each label's token ids, evaluated after prompt_suffix"
    return {"method": method, "probabilities": "softmax of the label scores over the labels"}


def label_grammar(labels: Sequence[str]) -> str:
    """A GBNF grammar that admits exactly one label, as the model writes it (leading space)."""
    def literal(label: str) -> str:
        return '"' + f" {label}".replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "root ::= " + " | ".join(literal(lab) for lab in labels)


def portable_path(name: str) -> str:
    """A hub id or a relative path as given; an absolute path relative to the working folder when it is
    inside it, else only its last part (an absolute path says nothing on another machine, and tells
    whoever gets the files the builder's user and folder names)."""
    p = Path(name)
    if not p.is_absolute():
        return name
    try:
        return p.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return p.name


def base_model_of(model_dir: Path) -> str:
    """What the model was fine-tuned from: the merge manifest's base model, else HF's `_name_or_path`."""
    merge_manifest = model_dir / "manifest.json"
    if merge_manifest.is_file():
        recorded = read_json(merge_manifest, "model manifest").get("base_model")
        if recorded:
            return str(recorded)
    config = json.loads((model_dir / "config.json").read_text())
    return str(config.get("_name_or_path") or model_dir)
