"""The run config: one pydantic model for the whole pipeline, loaded from TOML, overridden by CLI flags.

Every stage reads its section; `elemental run CONFIG.toml` runs them all. Unknown keys are errors
(a typo in a config must not silently fall back to a default), and every error names the key and
the file it came from.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ElementalError
from .fileio import read_text_utf8

REAL_BASE_MODEL = "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"
DEFAULT_NUM_IMAGES = 1000
MAX_LABEL_CHARS = 40
DEFAULT_LABELS = ["water", "land", "fire", "wood", "metal"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(_Section):
    """The closed label set and the wording of the prompts (rendered by `elemental.task.Task`)."""

    labels: list[str] = Field(default_factory=lambda: list(DEFAULT_LABELS), min_length=2, max_length=50)
    instruction: str = "Classify this image into one of these elements: {labels}."
    explain_instruction: str = "Explain in one short sentence which element this image shows and why."

    @field_validator("labels")
    @classmethod
    def _labels_are_plain_words(cls, v: list[str]) -> list[str]:
        for label in v:
            if not label or label != label.strip() or any(c.isspace() for c in label):
                raise ValueError(f"label {label!r} must be a non-empty word without spaces")
            if len(label) > MAX_LABEL_CHARS:
                raise ValueError(f"label {label[:20]!r}... is longer than {MAX_LABEL_CHARS} characters")
        seen: dict[str, str] = {}  # casefolded -> as written
        for label in v:
            twin = seen.get(label.casefold())
            if twin == label:
                raise ValueError(f"label {label!r} is listed twice")
            if twin is not None:
                raise ValueError(f"labels {twin!r} and {label!r} differ only in case: one class or two?")
            seen[label.casefold()] = label
        return v


class ModelConfig(_Section):
    """Which base model to fine-tune and the image geometry used everywhere (DESIGN §3)."""

    base_model: str = REAL_BASE_MODEL
    # One 512-px image = 64 image tokens and one vision-encoder pass (HF default: 2048 + tiles).
    image_longest_edge: int = Field(512, ge=32)


class ModelPrice(_Section):
    """What one teacher model costs, in USD per 1M tokens, and what one photo is expected to take.

    The photo figures are for what prepare sends (a 512-px JPEG at detail "low", the system prompt and the
    schema) and are used until the label cache has measured answers of this model to average instead.
    """

    input_per_1m: float = Field(ge=0)
    output_per_1m: float = Field(ge=0)
    batch_discount: float = Field(0.5, gt=0, le=1)  # the Batch API bills this share of the price
    photo_tokens_in: int = Field(ge=1)
    photo_tokens_out: int = Field(40, ge=1)


# OpenAI's published standard-tier prices, as read on PRICES_AS_OF (check https://openai.com/api/pricing before
# trusting a figure; override or add models under [prepare.prices."NAME"]). Image tokens at detail "low":
# gpt-4o and gpt-4.1 bill 85 per image, gpt-4o-mini 2,833; the 4.1 mini/nano models bill 32-px patches
# (a 512x384 photo: 192 patches x 1.62 / x 2.46). About 150 tokens of prompt and schema come on top.
PRICES_AS_OF = "2025-06-01"
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "gpt-4o-mini": {"input_per_1m": 0.15, "output_per_1m": 0.60, "photo_tokens_in": 2983},
    "gpt-4o": {"input_per_1m": 2.50, "output_per_1m": 10.00, "photo_tokens_in": 235},
    "gpt-4.1": {"input_per_1m": 2.00, "output_per_1m": 8.00, "photo_tokens_in": 235},
    "gpt-4.1-mini": {"input_per_1m": 0.40, "output_per_1m": 1.60, "photo_tokens_in": 461},
    "gpt-4.1-nano": {"input_per_1m": 0.10, "output_per_1m": 0.40, "photo_tokens_in": 622},
}


class PrepareConfig(_Section):
    """Photo sources, the teacher that labels them, and how the dataset is filtered and split (DESIGN §5-§6)."""

    sources: list[str] = Field(default_factory=list)  # folder:PATH, urls:FILE, json:FILE, unsplash, openverse
    queries: list[str] = Field(default_factory=lambda: [
        "ocean", "river", "mountain landscape", "desert", "campfire", "candle flame", "forest", "wooden table",
        "steel", "metal tools",
    ])
    output_dir: Path = Path("dataset")
    # Cap on photos kept; unset: per_class_target x labels when a target is given, else DEFAULT_NUM_IMAGES.
    num_images: int | None = Field(None, ge=1)
    per_class_target: int | None = Field(None, ge=1)  # keep collecting until each class has this many
    min_confidence: float = Field(0.7, ge=0.0, le=1.0)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    seed: int = 42
    near_duplicate_distance: int = Field(4, ge=0, le=64)  # perceptual-hash bits; 0 keeps near duplicates
    # The teacher: any OpenAI-compatible endpoint. The API key is never part of the config (env only).
    labeler_model: str = "gpt-4o-mini"
    labeler_base_url: str | None = None  # default: env OPENAI_BASE_URL, else OpenAI
    num_workers: int = Field(4, ge=1, le=64)
    max_reasks: int = Field(2, ge=0, le=10)
    labeler_temperature: float = Field(0.0, ge=0.0, le=2.0)
    labeler_max_tokens: int = Field(300, ge=16)  # an answer is ~40 tokens; a rambling local model stops here
    labeler_seed: int | None = 0  # sent when the endpoint takes one (dropped when it refuses it)
    max_consecutive_failures: int = Field(10, ge=1)  # failed requests in a row that stop the run
    retry_rejected: bool = False  # ask again about photos whose cached answer is a rejection
    detail: Literal["low", "high", "auto"] = "low"
    label_cache: Path | None = None  # default: ~/.cache/elemental/labels.sqlite, shared by every dataset
    batch: bool = False  # OpenAI Batch API (half price, hours) for large sets
    batch_max_photos: int = Field(250, ge=1, le=50_000)  # photos per batch; a wave is several batches in flight
    batch_poll_interval: float = Field(30.0, gt=0)  # seconds between polls of the open batches
    batch_max_wait: float | None = Field(None, gt=0)  # seconds to wait for open batches; unset: no limit
    batch_fallback: Literal["none", "sync"] = "none"  # photos a failed/expired batch left: sync at full price?
    # USD per model, merged over DEFAULT_PRICES (a model named here replaces its default entry).
    prices: dict[str, ModelPrice] = Field(default_factory=dict, validate_default=True)
    relabel_only: bool = False  # re-filter from cached answers; never call the teacher
    hf_dataset: bool = False  # also write dataset/hf (datasets.load_from_disk), needs `datasets`
    unsplash_api_url: str | None = None  # default: env UNSPLASH_API_URL, else the public API
    openverse_api_url: str | None = None
    allow_private_urls: bool = False  # downloads and redirects to loopback/private/link-local addresses
    # Photos with more pixels to decode are skipped with the reason (JPEGs are decoded at reduced scale first).
    max_pixels: int = Field(100_000_000, ge=1_000_000)

    @field_validator("prices", mode="before")
    @classmethod
    def _over_the_defaults(cls, v: Any) -> Any:
        return {**DEFAULT_PRICES, **v} if isinstance(v, dict) else v

    def photo_cap(self, n_labels: int) -> int:
        """How many photos the dataset may keep (see num_images)."""
        if self.num_images is not None:
            return self.num_images
        return self.per_class_target * n_labels if self.per_class_target else DEFAULT_NUM_IMAGES

    def check_targets(self, n_labels: int) -> None:
        """per_class_target and num_images must not contradict each other (the cap would silently win)."""
        if self.per_class_target and self.num_images is not None and self.per_class_target * n_labels > self.num_images:
            need = self.per_class_target * n_labels
            raise ValueError(f"per_class_target {self.per_class_target} x {n_labels} labels = {need} photos, more "
                             f"than num_images {self.num_images}: raise num_images to {need} or leave it unset")


class TrainConfig(_Section):
    dataset_dir: Path = Path("dataset")
    output_dir: Path = Path("models/smolvlm-element-classifier")
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    num_epochs: float = Field(3.0, gt=0)
    max_steps: int = -1
    learning_rate: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    # None: the text model's attention + MLP projections and the connector (train.targets explains the names).
    lora_targets: list[str] | None = None
    full_finetune: bool = False  # train the connector + text model fully instead of LoRA (vision tower frozen)
    load_in_8bit: bool = False  # QLoRA-style base quantization with bitsandbytes (CUDA only)
    load_in_4bit: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = True
    augment: bool = False  # random resized crop, flip, brightness/contrast/saturation (never hue: colour is the signal)
    # The frozen vision tower's output per photo, computed once and read back (train.tower_cache); exact, so on
    # unless the tower trains or --augment changes the pixels. Folder default: .feature-cache beside OUTPUT.
    feature_cache: bool = True
    feature_cache_dir: Path | None = None
    merge_final: bool = True  # write OUTPUT/final (adapter merged into the base, as `elemental merge` does)
    reason_mode: Literal["multitask", "context", "none"] = "multitask"
    rationale_ratio: float = Field(0.5, ge=0, le=1)
    context_dropout: float = Field(0.5, ge=0, le=1)
    report_to: Literal["wandb", "tensorboard", "trackio", "none"] = "wandb"
    wandb_project: str = "smolvlm-element-classification"
    logging_steps: int = Field(10, ge=1)
    eval_steps: int = Field(50, ge=0)  # label-scoring validation every N steps (0: only at the end)
    early_stopping_patience: int | None = Field(None, ge=1)  # evaluations without improvement
    keep_best: bool = True  # lora_adapter/ is the adapter with the best val accuracy
    resume: bool = False  # continue from the last checkpoint in output_dir/checkpoints
    seed: int = 42

    @model_validator(mode="after")
    def _one_way_to_train(self) -> TrainConfig:
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("load_in_8bit and load_in_4bit exclude each other")
        if self.full_finetune and (self.load_in_8bit or self.load_in_4bit):
            raise ValueError("full_finetune trains full-precision weights: drop load_in_8bit/load_in_4bit")
        if self.full_finetune and self.lora_targets is not None:
            raise ValueError("lora_targets has no meaning with full_finetune")
        return self


class ExportConfig(_Section):
    model_path: Path | None = None  # default: <train.output_dir>/final
    output_dir: Path = Path("models/gguf")
    name: str = "SmolVLM2-500M-Element"
    quant: list[Literal["Q8_0", "Q4_0", "Q4_K_M", "F16"]] = Field(default_factory=lambda: ["Q8_0"])
    # The file the phone loads, so an explicit choice: F16 (default) is faster on CPU than Q8_0
    # (benchmarks/gguf_speed.py, on CPUs with and without AVX512) and half F32's size; F32 encoded
    # faster on the one desktop CPU measured, an AVX512/AMX Xeon (benchmarks/llama_cpu.py), at twice the size.
    mmproj_type: Literal["Q8_0", "F16", "F32"] = "F16"


class EvaluateConfig(_Section):
    backends: list[Literal["hf", "gguf"]] = Field(default_factory=lambda: ["hf", "gguf"])
    split: str = "val"
    output_path: Path | None = None  # default: <train.output_dir>/validation_results[_gguf].json
    plot_cm: bool = True
    threads: int | None = None
    min_accuracy: float | None = Field(None, ge=0, le=1)  # `elemental run` exits 1 when a backend scores below


class RunConfig(_Section):
    """Everything one run of the pipeline needs. `stages` lists what `elemental run` executes."""

    stages: list[Literal["prepare", "train", "merge", "export", "evaluate"]] = Field(
        default_factory=lambda: ["prepare", "train", "merge", "export", "evaluate"]
    )
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _stages_in_order(self) -> RunConfig:
        order = ["prepare", "train", "merge", "export", "evaluate"]
        if [s for s in order if s in self.stages] != self.stages:
            raise ValueError(f"stages must keep the pipeline order {order}")
        self.prepare.check_targets(len(self.task.labels))
        return self

    def merged_model_dir(self) -> Path:
        return self.export.model_path or self.train.output_dir / "final"

    def results_path(self, backend: str) -> Path:
        """Where `evaluate` writes a backend's results: validation_results.json for hf, _<backend> beside it."""
        base = self.evaluate.output_path or Path(self.train.output_dir) / "validation_results.json"
        return base if backend == "hf" else base.with_name(f"{base.stem}_{backend}{base.suffix}")


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {msg}{more}"


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a RunConfig from TOML (or defaults when `path` is None) and apply dotted-key overrides.

    `overrides` maps "section.key" to a value; None values are ignored so CLI flags the user did
    not give leave the file's values alone.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ElementalError(f"config file not found: {path}")
        try:
            data = tomllib.loads(read_text_utf8(path))
        except tomllib.TOMLDecodeError as e:
            raise ElementalError(f"{path}: invalid TOML ({e})") from None
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ElementalError(_format_validation_error(e, source)) from None
    return apply_overrides(cfg, overrides or {})


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Return a copy of `cfg` with "section.key" overrides applied and validated."""
    data = cfg.model_dump()
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, key = dotted.split(".", 1)
        data[section][key] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ElementalError(_format_validation_error(e, "command-line flags")) from None
