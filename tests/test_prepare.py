"""`prepare` on folder-per-class trees, and the safe image opening it relies on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from elemental.config import PrepareConfig, TaskConfig
from elemental.data.prepare import prepare_dataset
from elemental.data.records import load_split
from elemental.errors import ElementalError
from elemental.fileio import sha256_file
from elemental.images import open_image
from elemental.synthetic import write_synthetic_photos
from elemental.task import Task

TASK = Task.from_config(TaskConfig())
PER_CLASS = 6


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_photos(tmp_path_factory.mktemp("src") / "photos", TASK.labels, PER_CLASS, seed=0)


@pytest.fixture
def tree(photos: Path, tmp_path: Path) -> Path:
    """A private copy of the photo tree, for tests that add files to it."""
    return Path(shutil.copytree(photos, tmp_path / "photos"))


def _prepare(tree: Path, out: Path, sources: list[str] | None = None, **kw) -> dict:
    cfg = PrepareConfig(sources=sources or [f"folder:{tree}"], output_dir=out,
                        label_cache=out.parent / "labels.sqlite", **kw)
    return prepare_dataset(cfg, TASK, say=lambda _: None)


def _leftovers(parent: Path, out: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_writes_the_seed_layout(photos: Path, tmp_path: Path):
    out = tmp_path / "dataset"
    meta = _prepare(photos, out)
    assert sorted(p.name for p in out.iterdir()) == ["images", "metadata.json", "report.html", "teacher_labels.json",
                                                     "train.json", "val.json"]
    train, val = load_split(out, "train", TASK), load_split(out, "val", TASK)
    n = len(TASK.labels) * PER_CLASS
    assert len(train) + len(val) == n == len(list((out / "images").iterdir()))
    # round(6 * 0.1) = 1 photo of each class in val.
    assert meta["counts"]["val"] == {label: 1 for label in TASK.labels}
    assert meta["counts"]["train"] == {label: PER_CLASS - 1 for label in TASK.labels}
    assert (meta["n_train"], meta["n_val"]) == (len(train), len(val))
    assert meta["dropped"] == {} and meta["rejected"] == [] and meta["teacher"] is None
    assert meta["labels"] == list(TASK.labels) and meta["labeler"] == "folder-name"
    assert meta["sources"] == [f"folder:{photos}"] and meta["seed"] == 42 and meta["val_fraction"] == 0.1
    assert json.loads((out / "metadata.json").read_text()) == meta
    for r in train + val:
        with Image.open(out / r.image_path) as img:
            assert img.format == "JPEG" and img.size == (r.width, r.height)
        assert r.image_path == f"images/{r.image_id}.jpg" and len(r.image_id) == 12
        assert r.source == "local" and r.labeler == "folder-name" and r.confidence == 1.0
        assert r.source_id.startswith(f"{r.element}/{r.element}_")
        assert r.sha256 == sha256_file(photos / r.source_id)
        assert r.image_id == r.sha256[:12]
        assert r.reason == f"a photo from the '{r.element}' folder"
    assert _leftovers(tmp_path, out) == []


def test_same_photos_same_dataset(photos: Path, tmp_path: Path):
    a, b = _prepare(photos, tmp_path / "a"), _prepare(photos, tmp_path / "b")
    assert a["counts"] == b["counts"]
    for split in ("train.json", "val.json"):
        assert (tmp_path / "a" / split).read_text() == (tmp_path / "b" / split).read_text()


def test_long_side_bounded_and_photo_upright(tree: Path, tmp_path: Path):
    img = Image.new("RGB", (2000, 600), (200, 30, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the stored pixels are sideways
    img.save(tree / "fire" / "big.jpg", exif=exif)
    out = tmp_path / "ds"
    _prepare(tree, out)
    records = load_split(out, "train", TASK) + load_split(out, "val", TASK)
    big = next(r for r in records if r.source_id == "fire/big.jpg")
    assert (big.width, big.height) == (307, 1024)  # upright (portrait), long side 1024


def test_duplicates_dropped(tree: Path, tmp_path: Path):
    shutil.copy(tree / "water" / "water_0000.jpg", tree / "water" / "copy.jpg")  # byte-identical
    shutil.copy(tree / "water" / "water_0000.jpg", tree / "land" / "copy.jpg")  # even under another label
    # Same pixels, different file bytes: only the normalised JPEG shows they are one photo.
    with Image.open(tree / "land" / "land_0002.png") as png:
        png.save(tree / "land" / "resaved.png", compress_level=1)
        png.save(tree / "land" / "resaved.bmp")
    nested = tree / "fire" / "sub" / "deeper"
    nested.mkdir(parents=True)
    Image.new("RGB", (300, 200), (250, 90, 0)).save(nested / "new.webp")  # recursive, WebP
    meta = _prepare(tree, tmp_path / "ds")
    assert meta["dropped"]["duplicate"] + meta["dropped"].get("near_duplicate", 0) == 4
    # Folders are read in name order: land/copy.jpg comes first, so both water copies are the duplicates.
    assert {d["source_id"] for d in meta["duplicates"]} == {
        "water/water_0000.jpg", "water/copy.jpg", "land/resaved.png", "land/resaved.bmp"}
    twins = {d["source_id"]: d["duplicate_of"] for d in meta["duplicates"]}  # each names the photo it repeats
    assert twins["water/water_0000.jpg"] == twins["water/copy.jpg"] == {"source": "local", "source_id": "land/copy.jpg"}
    assert twins["land/resaved.png"]["source_id"] == twins["land/resaved.bmp"]["source_id"] == "land/land_0002.png"
    # One copy of each photo is kept (the first met); the new WebP deep inside fire/ is found.
    assert sum(meta["counts"]["total"].values()) == len(TASK.labels) * PER_CLASS + 1
    assert meta["counts"]["total"]["fire"] == PER_CLASS + 1


def test_num_images_caps_with_balance(photos: Path, tmp_path: Path):
    meta = _prepare(photos, tmp_path / "ds", num_images=12)
    total = meta["counts"]["total"]
    assert sum(total.values()) == 12 and max(total.values()) - min(total.values()) <= 1
    assert meta["dropped"]["over_num_images"] == len(TASK.labels) * PER_CLASS - 12
    assert len(list((tmp_path / "ds" / "images").iterdir())) == 12
    again = _prepare(photos, tmp_path / "ds2", num_images=12)
    assert (tmp_path / "ds" / "train.json").read_text() == (tmp_path / "ds2" / "train.json").read_text()
    assert again["counts"] == meta["counts"]


def test_ignores_non_images_and_hidden_files(tree: Path, tmp_path: Path):
    (tree / "README.txt").write_text("notes")
    (tree / ".DS_Store").write_bytes(b"\0")
    (tree / "wood" / "notes.txt").write_text("notes")
    (tree / "wood" / ".hidden.jpg").write_bytes(b"not a photo")
    meta = _prepare(tree, tmp_path / "ds")
    assert sum(meta["counts"]["total"].values()) == len(TASK.labels) * PER_CLASS


def _fails(tree: Path, out: Path, match: str, sources: list[str] | None = None) -> str:
    with pytest.raises(ElementalError, match=match) as e:
        _prepare(tree, out, sources)
    assert not out.exists()
    assert _leftovers(out.parent, out) == []
    assert "\n" not in str(e.value)
    return str(e.value)


def test_unknown_label_folder(tree: Path, tmp_path: Path):
    (tree / "air").mkdir()
    msg = _fails(tree, tmp_path / "ds", "is not one of the task's labels")
    assert str(tree / "air") in msg and "['water', 'land', 'fire', 'wood', 'metal']" in msg


def test_unreadable_image_is_rejected_and_the_run_goes_on(tree: Path, tmp_path: Path):
    bad = tree / "metal" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    meta = _prepare(tree, tmp_path / "ds")
    assert meta["counts"]["total"] == {label: PER_CLASS for label in TASK.labels}
    [rej] = meta["rejected"]
    assert rej["kind"] == "unreadable" and rej["source_id"] == "metal/broken.jpg" and str(bad) in rej["reason"]
    assert "broken.jpg" in (tmp_path / "ds" / "report.html").read_text()


def test_failed_prepare_keeps_the_previous_dataset(tree: Path, tmp_path: Path):
    out = tmp_path / "ds"
    _prepare(tree, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (tree / "lava").mkdir()
    with pytest.raises(ElementalError, match="lava"):
        _prepare(tree, out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert _leftovers(tmp_path, out) == []


def test_unknown_source(tree: Path, tmp_path: Path):
    _fails(tree, tmp_path / "ds", "unknown source 'flickr'", sources=[f"folder:{tree}", "flickr"])


def test_missing_source_folder(tmp_path: Path):
    _fails(tmp_path, tmp_path / "ds", "not found", sources=[f"folder:{tmp_path / 'nope'}"])


def test_refuses_to_replace_a_folder_that_is_not_a_dataset(photos: Path, tmp_path: Path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    with pytest.raises(ElementalError, match="not empty and holds no dataset"):
        _prepare(photos, out)
    assert (out / "thesis.tex").read_text() == "keep me"


def test_too_few_photos_for_a_val_split(tmp_path: Path):
    tree = write_synthetic_photos(tmp_path / "photos", ["water"], 1, seed=1)
    _fails(tree, tmp_path / "ds", "too few photos for a validation split")


# -- images ---------------------------------------------------------------------------------------


def test_open_image_flattens_transparency_onto_white(tmp_path: Path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.save(tmp_path / "clear.png")
    out = open_image(tmp_path / "clear.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)


def test_open_image_takes_the_first_frame(tmp_path: Path):
    frames = [Image.new("RGB", (6, 6), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    r, g, b = open_image(tmp_path / "anim.gif").getpixel((2, 2))
    assert r > 200 and b < 50


def test_open_image_errors_name_the_file(tmp_path: Path):
    with pytest.raises(ElementalError, match="image not found: .*missing.jpg"):
        open_image(tmp_path / "missing.jpg")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ElementalError, match=r"text\.png: not a readable image"):
        open_image(tmp_path / "text.png")
    Image.new("RGB", (2000, 1000)).save(tmp_path / "big.png")
    with pytest.raises(ElementalError, match=r"big\.png: 2000x1000 = 2 Mpx, over the limit of 1 Mpx \(max_pixels\)"):
        open_image(tmp_path / "big.png", max_pixels=1_000_000)


def test_hugging_face_export_loads_back(photos: Path, tmp_path: Path):
    import datasets

    from elemental.data.hf_export import export_hf_dataset

    out = tmp_path / "ds"
    meta = _prepare(photos, out)
    hf = export_hf_dataset(out, TASK)
    loaded = datasets.load_from_disk(str(hf))
    assert set(loaded) == {"train", "validation"}
    assert (len(loaded["train"]), len(loaded["validation"])) == (meta["n_train"], meta["n_val"])
    row = loaded["validation"][0]
    assert row["image"].size[0] > 0 and TASK.labels[row["element"]] in TASK.labels
    assert loaded["train"].features["element"].names == list(TASK.labels)


# -- per_class_target and num_images ----------------------------------------------------------------------

def _labelled_items(per_label: int) -> list:
    from elemental.data.prepare import _Item
    from elemental.data.sources import Photo

    return [_Item(Photo(b"", "local", f"{label}/{i}"), f"{label}{i:05d}", 1, 1, Path("."), element=label,
                  confidence=0.9) for label in TASK.labels for i in range(per_label)]


def test_per_class_target_is_not_capped_by_a_default_photo_count():
    """300 per class x 5 labels is 1,500 photos: the old default num_images of 1,000 kept 200 per class."""
    from elemental.data.prepare import _select, _Tally

    cfg = PrepareConfig(sources=["folder:x"], per_class_target=300)
    kept = _select(_labelled_items(320), cfg, TASK, _Tally(), set())
    assert len(kept) == 1500 and cfg.photo_cap(len(TASK.labels)) == 1500
    assert PrepareConfig(sources=["folder:x"]).photo_cap(5) == 1000  # no target: the seed's default


def test_per_class_target_and_num_images_that_contradict_are_one_clear_error(photos: Path, tmp_path: Path):
    from elemental.config import RunConfig

    with pytest.raises(ValueError, match="per_class_target 300 x 5 labels = 1500 photos, more than num_images 1000"):
        RunConfig.model_validate({"prepare": {"per_class_target": 300, "num_images": 1000}})
    with pytest.raises(ElementalError, match="raise num_images to 15 or leave it unset"):
        _prepare(photos, tmp_path / "ds", per_class_target=3, num_images=10)
    assert not (tmp_path / "ds").exists()
