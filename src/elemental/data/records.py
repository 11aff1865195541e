"""Dataset records (DESIGN §5): one JSON object per photo, in lists in `train.json` / `val.json`.

The layout and the required keys are the seed's (`image_id`, `image_path`, `element`, `reason`,
`confidence`), so a dataset made by the seed's scripts loads unchanged; keys this code does not know
are kept and written back. Loading checks everything a training run would otherwise trip over hours
later (labels off the task's list, missing images) and names the file, record index and field.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ElementalError
from ..fileio import read_json, write_json_atomic
from ..task import Task

Source = Literal["unsplash", "openverse", "local", "url"]


# Length caps on text fields. A reason is one sentence (the teacher is asked for one, and its answers are
# cut at 300 characters); a record whose reason is longer than MAX_REASON_CHARS is refused, naming
# file[index].reason: a 5 MiB "reason" once turned into a multi-terabyte allocation inside training.
MAX_REASON_CHARS = 2000
MAX_ID_CHARS = 256
MAX_PATH_CHARS = 1024


class Record(BaseModel):
    """One labelled photo. `image_path` is relative to the dataset dir; `element` is the label.

    Types are strict: `"confidence": true` or `"0.9"` is refused, not read as 1.0 or 0.9, and NaN is
    not a confidence.
    """

    model_config = ConfigDict(extra="allow", strict=True)

    image_id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    image_path: str = Field(max_length=MAX_PATH_CHARS)
    element: str = Field(max_length=MAX_ID_CHARS)
    reason: str = Field(max_length=MAX_REASON_CHARS)
    confidence: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    source: Source | None = None
    source_id: str | None = Field(default=None, max_length=MAX_PATH_CHARS * 2)
    attribution: dict[str, Any] | None = None
    sha256: str | None = Field(default=None, max_length=64)  # of the original photo file: its identity
    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)
    labeler: str | None = Field(default=None, max_length=MAX_ID_CHARS)  # teacher + prompt version, or folder-name

    def to_json(self) -> dict[str, Any]:
        """The record as written to disk: unset optional keys left out, as in the seed's files."""
        return self.model_dump(mode="json", exclude_none=True)


def split_path(dataset_dir: Path, split: str) -> Path:
    """`train`/`val` (or any bare name) means `dataset_dir/{name}.json`; anything else is a file path."""
    if "/" in split or "\\" in split or split.endswith(".json"):
        return Path(split)
    return Path(dataset_dir) / f"{split}.json"


def load_split(dataset_dir: Path, split: str, task: Task, check_images: bool = True) -> list[Record]:
    """Read and validate one split; every problem is an ElementalError naming file[index].field."""
    dataset_dir = Path(dataset_dir)
    path = split_path(dataset_dir, split)
    if not path.is_file():
        if path.parent == dataset_dir and not dataset_dir.is_dir():
            raise ElementalError(f"dataset directory not found: {dataset_dir}")
        if path.parent == dataset_dir:
            raise ElementalError(f"{dataset_dir}/ has no {path.name}")
        raise ElementalError(f"split file not found: {path}")
    data = read_json(path, "split file")
    if not isinstance(data, list):
        raise ElementalError(f"{path}: expected a JSON list of records")
    if not data:
        raise ElementalError(f"{path}: no records (an empty split cannot be trained or evaluated on)")
    return parse_records(data, dataset_dir, str(path), task, check_images)


def parse_records(data: list[Any], dataset_dir: Path, where_list: str, task: Task,
                  check_images: bool = True) -> list[Record]:
    """Validate a list of record objects (a split file's, or one split of teacher_labels.json); errors name
    `where_list[index].field`."""
    records: list[Record] = []
    first_index: dict[str, int] = {}
    for i, item in enumerate(data):
        where = f"{where_list}[{i}]"
        record = _parse_record(item, where)
        if record.element not in task.labels:
            raise ElementalError(
                f"{where}.element: {record.element!r} is not one of the task's labels {list(task.labels)}"
            )
        _check_image_path(record.image_path, dataset_dir, where, check_images)
        if record.image_id in first_index:
            raise ElementalError(
                f"{where}.image_id: duplicate {record.image_id!r} (also at [{first_index[record.image_id]}])"
            )
        first_index[record.image_id] = i
        records.append(record)
    return records


def _parse_record(item: Any, where: str) -> Record:
    if not isinstance(item, dict):
        raise ElementalError(f"{where}: expected a JSON object, got {type(item).__name__}")
    try:
        return Record.model_validate(item)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        got = first.get("input")
        msg = {"missing": "missing required field", "finite_number": "must be a finite number (not NaN or infinity)",
               "string_too_long": f"{len(str(got))} characters, over the limit of "
                                  f"{(first.get('ctx') or {}).get('max_length')}"}.get(first["type"], first["msg"])
        if first["type"].endswith("_type"):  # strict types: say what was given instead
            msg += f", got {type(got).__name__} {str(got)[:40]!r}" if not isinstance(got, bool) else f", got {got}"
        more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise ElementalError(f"{where}.{field}: {msg}{more}") from None


def _check_image_path(image_path: str, dataset_dir: Path, where: str, check_exists: bool) -> None:
    """The path must stay inside the dataset dir (so a dataset can be moved whole) and, if asked, exist."""
    rel = PurePosixPath(image_path.replace("\\", "/"))
    if not image_path or rel.is_absolute() or ".." in rel.parts or Path(image_path).is_absolute():
        raise ElementalError(f"{where}.image_path: must be a path inside the dataset dir, got {image_path!r}")
    if check_exists and not (dataset_dir / rel).is_file():
        raise ElementalError(f"{where}.image_path: image not found: {image_path}")


def save_split(path: Path, records: list[Record]) -> None:
    """Write a split atomically as a JSON list (the seed's format)."""
    write_json_atomic(path, [r.to_json() for r in records])
