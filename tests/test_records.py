"""Dataset records: valid seed-style files load; every bad input names file, record index and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from elemental.config import TaskConfig
from elemental.data.records import Record, load_split, save_split
from elemental.errors import ElementalError
from elemental.task import Task

TASK = Task.from_config(TaskConfig())


def _record(i: int, element: str = "water", **extra) -> dict:
    return {
        "image_id": f"{i:05d}",
        "image_path": f"images/{i:05d}.jpg",
        "element": element,
        "reason": "blue waves",
        "confidence": 0.9,
        **extra,
    }


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    ds = tmp_path / "dataset"
    (ds / "images").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (0, 0, 200)).save(ds / "images" / f"{i:05d}.jpg")
    return ds


def _write(ds: Path, name: str, data) -> None:
    (ds / name).write_text(json.dumps(data))


def _error(ds: Path, split: str = "val", **kw) -> str:
    with pytest.raises(ElementalError) as e:
        load_split(ds, split, TASK, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_seed_style_split_loads_and_keeps_unknown_keys(dataset: Path):
    _write(dataset, "train.json", [_record(0), _record(1, "fire", seed_extra={"k": 1})])
    records = load_split(dataset, "train", TASK)
    assert [r.element for r in records] == ["water", "fire"]
    assert records[1].model_extra == {"seed_extra": {"k": 1}}
    out = dataset / "copy.json"
    save_split(out, records)
    written = json.loads(out.read_text())
    # Extra keys survive; unset optional keys are not written as nulls.
    assert written[1]["seed_extra"] == {"k": 1}
    assert "source" not in written[0] and "width" not in written[0]
    assert written == [_record(0), _record(1, "fire", seed_extra={"k": 1})]


def test_split_may_be_a_path_to_a_json_file(dataset: Path, tmp_path: Path):
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps([_record(2, "metal")]))
    assert [r.image_id for r in load_split(dataset, str(other), TASK)] == ["00002"]


def test_missing_split_file(dataset: Path):
    assert _error(dataset, "train") == f"{dataset}/ has no train.json"


def test_missing_dataset_dir(tmp_path: Path):
    assert "dataset directory not found" in _error(tmp_path / "nope", "train")


def test_not_a_list(dataset: Path):
    _write(dataset, "val.json", {"records": []})
    assert _error(dataset) == f"{dataset / 'val.json'}: expected a JSON list of records"


def test_empty_split_is_an_error(dataset: Path):
    _write(dataset, "val.json", [])
    assert f"{dataset / 'val.json'}: no records" in _error(dataset)


def test_invalid_json_names_file_and_line(dataset: Path):
    (dataset / "val.json").write_text('[\n{"image_id": }\n]')
    assert f"{dataset / 'val.json'}:2: invalid JSON" in _error(dataset)


def test_label_off_the_task(dataset: Path):
    _write(dataset, "val.json", [_record(0), _record(1), _record(2, "foo")])
    assert _error(dataset) == (
        f"{dataset / 'val.json'}[2].element: 'foo' is not one of the task's labels "
        "['water', 'land', 'fire', 'wood', 'metal']"
    )


def test_missing_image(dataset: Path):
    _write(dataset, "val.json", [_record(0), _record(7)])
    assert _error(dataset) == f"{dataset / 'val.json'}[1].image_path: image not found: images/00007.jpg"
    assert len(load_split(dataset, "val", TASK, check_images=False)) == 2


@pytest.mark.parametrize(
    "bad, field, words",
    [
        ({"confidence": 1.5}, "confidence", "less than or equal to 1"),
        ({"confidence": "high"}, "confidence", "valid number"),
        ({"width": 0}, "width", "greater than or equal to 1"),
        ({"source": "flickr"}, "source", "unsplash"),
    ],
)
def test_field_errors_name_index_and_field(dataset: Path, bad: dict, field: str, words: str):
    _write(dataset, "val.json", [_record(0), {**_record(1), **bad}])
    msg = _error(dataset)
    assert msg.startswith(f"{dataset / 'val.json'}[1].{field}: ")
    assert words in msg


def test_missing_required_field(dataset: Path):
    rec = _record(0)
    del rec["reason"]
    _write(dataset, "val.json", [rec])
    assert _error(dataset) == f"{dataset / 'val.json'}[0].reason: missing required field"


def test_record_must_be_an_object(dataset: Path):
    _write(dataset, "val.json", [_record(0), "images/1.jpg"])
    assert _error(dataset) == f"{dataset / 'val.json'}[1]: expected a JSON object, got str"


@pytest.mark.parametrize("path", ["../outside.jpg", "/etc/passwd", "images/../../x.jpg", ""])
def test_image_path_must_stay_inside_the_dataset(dataset: Path, path: str):
    _write(dataset, "val.json", [_record(0, image_path=path)])
    assert f"{dataset / 'val.json'}[0].image_path: must be a path inside the dataset dir" in _error(dataset)


def test_duplicate_image_id(dataset: Path):
    _write(dataset, "val.json", [_record(0), _record(1), _record(0)])
    assert _error(dataset) == f"{dataset / 'val.json'}[2].image_id: duplicate '00000' (also at [0])"


def test_record_model_defaults():
    r = Record(image_id="a", image_path="images/a.jpg", element="fire", reason="", confidence=1.0)
    assert r.source is None and r.to_json() == {
        "image_id": "a", "image_path": "images/a.jpg", "element": "fire", "reason": "", "confidence": 1.0,
    }
