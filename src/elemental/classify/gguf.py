"""The `gguf` backend: the exported GGUF files scored through llama.cpp (llama-cpp-python + libmtmd).

Same contract as the `hf` backend (DESIGN §4): one pass over the label prompt and the photo, then the
labels' log-probabilities are read; nothing is generated.

The token layout is HF's single-image layout, not libmtmd's (DESIGN §3). libmtmd has no no-split mode
for idefics3/SmolVLM: a 512-px photo becomes a 1x1 grid, i.e. a slice chunk *and* an overview chunk.
We let libmtmd preprocess the photo, but evaluate only its overview ("global") image chunk, between
our own text tokens that the export manifest spells out:

    prompt_prefix  = "<|im_start|>User: {instruction}<fake_token_around_image><global-img>"
    64 overview image embeddings
    prompt_suffix  = "<fake_token_around_image><end_of_utterance>\\nAssistant:"

The prefix is the same for every photo, so its KV cache is computed once; per photo everything after
it is dropped, and only the image and the few suffix tokens are evaluated.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import mtmd_cpp
from PIL import Image

from ..errors import ElementalError
from ..fileio import read_json, sha256_file
from ..images import model_input
from .base import Prediction, prediction_from_scores
from .llama_runtime import llama_said, load_text_model, quiet_llama, tokenize

MANIFEST = "manifest.json"
_SEQ = 0  # the one sequence this backend uses

# -- the backend -----------------------------------------------------------------------------------


def load_manifest(gguf_dir_or_manifest: Path) -> tuple[Path, dict]:
    """(folder, manifest) for an export folder or its manifest.json, with a one-line error if absent."""
    path = Path(gguf_dir_or_manifest)
    folder = path.parent if path.name == MANIFEST else path
    if not folder.is_dir():
        raise ElementalError(f"GGUF folder not found: {folder}")
    if not (folder / MANIFEST).is_file():
        raise ElementalError(f"{folder} has no {MANIFEST}: not a folder written by `elemental export`")
    return folder, read_json(folder / MANIFEST, "GGUF manifest")


def _pick_file(folder: Path, manifest: dict, role: str, quant: str | None = None) -> Path:
    """The exported file of `role` (and `quant`), checked to be there and the size the manifest says."""
    found = [(name, f) for name, f in manifest.get("files", {}).items()
             if f.get("role") == role and (quant is None or f.get("quant") == quant)]
    if not found:
        have = sorted(f.get("quant") for f in manifest.get("files", {}).values() if f.get("role") == role)
        raise ElementalError(f"{folder / MANIFEST} lists no {role} GGUF of type {quant}; it has {have}")
    name, info = found[0]
    path = folder / name
    if not path.is_file():
        raise ElementalError(f"GGUF file missing: {path} (listed in {folder / MANIFEST})")
    if path.stat().st_size != info.get("size_bytes"):
        raise ElementalError(
            f"{path} is {path.stat().st_size} bytes, the manifest says {info.get('size_bytes')}")
    return path


def _checked_sha256(path: Path, manifest: dict) -> str:
    """The file's sha256, which must be the manifest's: a file swapped in from another export is refused."""
    digest = sha256_file(path)
    if digest != manifest["files"][path.name].get("sha256"):
        raise ElementalError(f"{path}: sha256 {digest[:12]}… differs from {path.parent / MANIFEST} "
                             "(file changed or from another export; export again)")
    return digest


def check_libmtmd_shape(photo: tuple[int, int], model_input: tuple[int, int], longest_edge: int) -> None:
    """Refuse a photo too wide or tall for libmtmd, before libmtmd sees it, in one line.

    libmtmd's SmolVLM preprocessing brings the long side of `model_input` (the pre-shrunk photo) to
    `longest_edge` and truncates the short side to an int (llama.cpp tools/mtmd/mtmd-image.cpp:1068/1072);
    at 0 px its resize throws (:447) and mtmd_tokenize fails with a llama.cpp log line instead of a reason.
    The arithmetic is libmtmd's, in doubles, so exactly the photos it would fail on are refused;
    native/src/classifier.cpp refuses the same photos in the same words. HF's processor needs no such
    rule: it keeps a short side of at least 1 px.
    """
    width, height = model_input
    aspect = width / height
    short_side = int(longest_edge / aspect) if width >= height else int(longest_edge * aspect)
    if short_side < 1:
        raise ElementalError(
            f"{photo[0]}x{photo[1]} photo is too wide or tall for the model: brought to {longest_edge} px on its "
            "long side, its short side is under 1 px")


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    top = float(logits.max())
    return logits - (top + math.log(float(np.exp(logits - top).sum())))


class GGUFClassifier:
    """Score the labels of an exported GGUF folder through llama.cpp, with HF's single-image layout."""

    backend = "gguf"

    def __init__(self, gguf_dir_or_manifest: Path, quant: str | None = None, n_threads: int | None = None,
                 extra_bufts: bool | None = None):
        """Open an export folder with its `quant` text model (None: the first one exported).

        `extra_bufts` None: weight repacking where safe (AMX never; llama_runtime).
        """
        self.folder, self.manifest = load_manifest(gguf_dir_or_manifest)
        m = self.manifest
        self.labels = tuple(m["labels"])
        self.label_ids: list[list[int]] = [list(ids) for ids in m["label_token_ids"]]
        self.first_token = bool(m["first_token_scoring"])
        self.n_image_tokens = int(m["image"]["n_image_tokens"])
        self.text_path = _pick_file(self.folder, m, "text", quant)
        self.mmproj_path = _pick_file(self.folder, m, "mmproj")
        self.n_threads = n_threads or os.cpu_count() or 1
        # Checked before llama.cpp sees them (a phone app should do the same with the manifest's hashes).
        self._files = {str(p): _checked_sha256(p, m) for p in (self.text_path, self.mmproj_path)}
        quiet_llama()
        self._open(extra_bufts)
        self.prefix_ids = self._checked_tokens("prompt_prefix")
        self.suffix_ids = self._checked_tokens("prompt_suffix")
        self._overview_start = tokenize(self._vocab, m["image"]["overview_start_token"])
        self._decode(self.prefix_ids)  # the photo-independent KV cache, computed once
        self.n_prefix = len(self.prefix_ids)

    # -- setup -----------------------------------------------------------------------------------
    def _open(self, extra_bufts: bool | None) -> None:
        """Load the text model, a small context and the projector; freed when this object goes away."""
        loaded = load_text_model(self.text_path, extra_bufts)
        model = loaded.model
        self.weight_buffers, self.extra_bufts = loaded.weight_buffers, loaded.extra_bufts
        longest_label = max(len(ids) for ids in self.label_ids)
        m = self.manifest
        prompt_len = len(m["prompt_prefix_token_ids"]) + len(m["prompt_suffix_token_ids"])
        n_ctx = max(512, prompt_len + self.n_image_tokens + longest_label + 16)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_ctx  # a prompt or an image is always decoded in one batch
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        mparams = mtmd_cpp.mtmd_context_params_default()
        mparams.n_threads = self.n_threads
        mparams.print_timings = False
        mctx = mtmd_cpp.mtmd_init_from_file(str(self.mmproj_path).encode(), model, mparams) if ctx else None
        self._finalizer = weakref.finalize(self, _free, model, ctx, mctx)
        if not ctx or not mctx:
            what = self.text_path if not ctx else self.mmproj_path
            raise ElementalError(f"llama.cpp could not start a context for {what}{llama_said()}")
        self._ctx, self._mctx, self.n_batch = ctx, mctx, n_ctx
        self._n_embd = llama_cpp.llama_model_n_embd(model)
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)

    def _checked_tokens(self, key: str) -> list[int]:
        """Tokenize a manifest prompt part with this runtime; it must give the ids the export recorded."""
        ids = tokenize(self._vocab, self.manifest[key])
        if ids != list(self.manifest[f"{key}_token_ids"]):
            raise ElementalError(
                f"{self.text_path.name}: llama.cpp tokenizes {key} as {ids}, the manifest says "
                f"{self.manifest[f'{key}_token_ids']} (files from another export?)")
        return ids

    @property
    def longest_edge(self) -> int:
        """The image size the export was made for (the manifest's), as `HFClassifier.longest_edge`."""
        return int(self.manifest["image"]["longest_edge"])

    def close(self) -> None:
        """Free the llama.cpp model, context and projector now (else when garbage-collected)."""
        self._finalizer()

    def __enter__(self) -> GGUFClassifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def model_files(self) -> dict[str, str]:
        return dict(self._files)

    # -- evaluation ------------------------------------------------------------------------------
    def _decode(self, tokens: list[int]) -> None:
        """Append `tokens` to the sequence; logits are kept for the last one only."""
        arr = (llama_cpp.llama_token * len(tokens))(*tokens)  # referenced until llama_decode returns
        rc = llama_cpp.llama_decode(self._ctx, llama_cpp.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise ElementalError(f"llama.cpp failed to decode {len(tokens)} tokens (code {rc}){llama_said()}")

    def _last_logprobs(self) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return _log_softmax(np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).astype(np.float64))

    def _truncate(self, n_past: int) -> None:
        """Forget every position from `n_past` on, keeping the KV cache before it."""
        if not llama_cpp.llama_memory_seq_rm(self._mem, _SEQ, n_past, -1):
            raise ElementalError("llama.cpp could not roll back its KV cache")

    @contextmanager
    def _overview(self, image: Image.Image) -> Iterator[object]:
        """Preprocess `image` with libmtmd and yield its overview image chunk (freed on exit).

        The photo is first brought to at most PHOTO_MAX_SIDE, as for the HF backend and as `prepare`
        stored the training photos; that also spares libmtmd resizing a 12-MP photo. libmtmd copies
        the pixels itself, so they are handed over without another copy.
        """
        photo = model_input(image)
        check_libmtmd_shape(image.size, photo.size, self.longest_edge)
        rgb = photo if photo.mode == "RGB" else photo.convert("RGB")
        data = rgb.tobytes()
        pixels = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))  # `data` outlives the call
        bitmap = mtmd_cpp.mtmd_bitmap_init(rgb.width, rgb.height, pixels)
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        try:
            marker = mtmd_cpp.mtmd_default_marker()  # the text is the marker alone: we bring our own tokens
            text = mtmd_cpp.mtmd_input_text(marker, len(marker), False, True)
            bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = mtmd_cpp.mtmd_tokenize(self._mctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise ElementalError(
                    f"libmtmd could not preprocess a {rgb.size} image (code {rc}){llama_said()}")
            yield self._overview_chunk(chunks)
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            mtmd_cpp.mtmd_bitmap_free(bitmap)

    def _eval_overview(self, image: Image.Image, n_past: int) -> int:
        """Evaluate only the overview chunk of `image` at `n_past`; returns the position after it."""
        with self._overview(image) as chunk:
            new_n_past = llama_cpp.llama_pos(n_past)  # the helper adds to it for text chunks: start at n_past
            rc = mtmd_cpp.mtmd_helper_eval_chunk_single(
                self._mctx, self._ctx, chunk, n_past, _SEQ, self.n_batch, False, ctypes.byref(new_n_past))
            if rc != 0:
                raise ElementalError(f"libmtmd failed to evaluate the image (code {rc}){llama_said()}")
            return new_n_past.value

    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        """The overview's image embeddings (n_image_tokens × n_embd) that the text model receives.

        HF's counterpart is the connector output of `get_image_features`: comparing the two checks
        preprocessing (resize, normalisation), the vision tower and the connector in one go.
        """
        with self._overview(image) as chunk:
            n_tokens = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
            rc = mtmd_cpp.mtmd_encode_chunk(self._mctx, chunk)
            if rc != 0:
                raise ElementalError(f"libmtmd failed to encode the image (code {rc}){llama_said()}")
            ptr = mtmd_cpp.mtmd_get_output_embd(self._mctx)
            return np.ctypeslib.as_array(ptr, shape=(n_tokens * self._n_embd,)).reshape(n_tokens, -1).copy()

    def _overview_chunk(self, chunks) -> int:
        """The image chunk right after the overview's opening tokens (`<global-img>`), not the slice."""
        previous_text: list[int] = []
        for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            kind = mtmd_cpp.mtmd_input_chunk_get_type(chunk)
            if kind == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t(0)
                ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                previous_text = [ptr[j] for j in range(n.value)]
                continue
            opens_overview = previous_text[-len(self._overview_start):] == self._overview_start
            if kind == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE and opens_overview:
                n_tokens = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
                if n_tokens != self.n_image_tokens:
                    raise ElementalError(f"{self.mmproj_path.name}: overview image is {n_tokens} tokens, "
                                         f"the manifest says {self.n_image_tokens}")
                return chunk
            previous_text = []
        raise ElementalError(
            f"{self.mmproj_path.name}: libmtmd gave no overview image chunk (not a SmolVLM mmproj?)")

    def label_logprobs(self, image: Image.Image) -> list[float]:
        """Log-probability of each label as the answer to the label prompt for `image`."""
        self._truncate(self.n_prefix)
        self._eval_overview(image, self.n_prefix)
        self._decode(self.suffix_ids)
        logp = self._last_logprobs()
        if self.first_token:
            return [float(logp[ids[0]]) for ids in self.label_ids]
        return self._continuation_logprobs(logp)

    def _continuation_logprobs(self, first: np.ndarray) -> list[float]:
        """Sum of each label's token log-probs: evaluate its tokens one by one, then roll back."""
        n_prompt = llama_cpp.llama_memory_seq_pos_max(self._mem, _SEQ) + 1
        scores = []
        for ids in self.label_ids:
            total, logp = 0.0, first
            for i, tok in enumerate(ids):
                total += float(logp[tok])
                if i + 1 < len(ids):
                    self._decode([tok])
                    logp = self._last_logprobs()
            self._truncate(n_prompt)
            scores.append(total)
        return scores

    def classify(self, image: Image.Image) -> Prediction:
        t0 = time.perf_counter()
        scores = self.label_logprobs(image)
        return prediction_from_scores(self.labels, scores, (time.perf_counter() - t0) * 1000)


def _free(model, ctx, mctx) -> None:
    """Release what `_open` allocated, in reverse order (a finalizer: must not touch the classifier)."""
    if mctx:
        mtmd_cpp.mtmd_free(mctx)
    if ctx:
        llama_cpp.llama_free(ctx)
    if model:
        llama_cpp.llama_model_free(model)
