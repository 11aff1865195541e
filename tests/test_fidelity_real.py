"""What the phone answers equals what was evaluated, on a model whose probabilities move (issue 24).

The tiny demo model's probabilities saturate near 0 and 1 and hide small differences; the realistic SmolVLM2-256M
shape around the real SmolLM2-135M (`realistic_run`: trained briefly, exported at 384 px) does not. On it, the
desktop stand-in for the phone (`build/native/elemental-native-classify`: the library the app links, with its own
libjpeg-turbo decode set up as Pillow's) must give `elemental classify`'s label and probabilities (the promise:
|Δp| ≤ 5e-3; held here to 1e-6, the same pixels) on JPEGs of every kind a phone hands over: the demo's val photos,
camera-size 12 MP and 50 MP (decoded at a reduced DCT scale on both sides), progressive, 4:2:0 and 4:4:4 chroma,
EXIF-rotated, greyscale. HF against the GGUF files on the same run is measured beside it, so the README's fidelity
table has every step of the path.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from test_native import CLI, SAME_PIXELS, lines, max_dp, python_classify, run
from test_native_decode import photo

pytestmark = pytest.mark.slow

# name -> (width, height, save options, EXIF orientation or None, greyscale?)
KINDS: dict[str, tuple[int, int, dict, int | None, bool]] = {
    "camera 12 MP, 4:2:0": (4000, 3000, {"subsampling": 2}, None, False),
    "camera 50 MP, 4:2:0": (8160, 6120, {"subsampling": 2}, None, False),
    "progressive": (1600, 1200, {"progressive": True}, None, False),
    "4:4:4": (1600, 1200, {"subsampling": 0}, None, False),
    "EXIF-rotated (6), 12 MP": (4000, 3000, {"subsampling": 2}, 6, False),
    "greyscale": (1600, 1200, {}, None, True),
}


def write_kinds(folder: Path) -> dict[str, Path]:
    """One JPEG of each kind (camera-like gradients, quality 90)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (name, (w, h, options, orientation, grey)) in enumerate(KINDS.items()):
        img = photo(w, h, seed=i)
        if grey:
            img = img.convert("L")
        if orientation is not None:
            exif = Image.Exif()
            exif[0x0112] = orientation
            options = {**options, "exif": exif.tobytes()}
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90, **options)
        out[name] = folder / f"kind{i}.jpg"
        out[name].write_bytes(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict[str, Path]:
    return write_kinds(tmp_path_factory.mktemp("kinds"))


def test_native_answers_as_classify_on_every_kind_of_jpeg(realistic_run, val_photos, kinds, tmp_path):
    gguf = realistic_run / "gguf"
    photos = [*val_photos, *kinds.values()]
    ours, theirs = lines(run(CLI, gguf, *photos, timeout=1800)), python_classify(gguf, photos, tmp_path)
    assert len(ours) == len(photos) == len(theirs)
    assert {k: o["label"] for k, o in ours.items()} == {k: t["label"] for k, t in theirs.items()}
    # The model's probabilities move: a gap would show here, where the tiny model's 0s and 1s hide it.
    tops = sorted(max(o["probabilities"].values()) for o in theirs.values())
    assert tops[len(tops) // 2] < 0.99, tops
    val = {p.name for p in val_photos}
    per_kind = {"demo val JPEGs": max_dp({k: ours[k] for k in val}, {k: theirs[k] for k in val}),
                **{name: max_dp({p.name: ours[p.name]}, {p.name: theirs[p.name]}) for name, p in kinds.items()}}
    print(f"realistic 256M at 384 px, native x86 vs elemental classify: same labels on {len(photos)} JPEGs; "
          f"median top probability {tops[len(tops) // 2]:.3f}; max |Δp| " +
          ", ".join(f"{name} {d:.1e}" for name, d in per_kind.items()))
    # The promise is 5e-3 end to end; with one decode on both sides the pixels, and so the answers, are the same.
    assert max(per_kind.values()) <= SAME_PIXELS


def test_hf_and_the_gguf_files_on_the_realistic_model(realistic_run):
    """The step before: the merged HF model against the GGUF files on the run's val photos (measured for the README;
    held to the labels and a bound that guards it from growing)."""
    hf, gg = ({Path(p["image_path"]).name: {"label": p["predicted"], "probabilities": p["probabilities"]}
               for p in json.loads((realistic_run / "run" / name).read_text())["predictions"]}
              for name in ("validation_results.json", "validation_results_gguf.json"))
    agree = sum(hf[k]["label"] == gg[k]["label"] for k in hf) / len(hf)
    delta = max_dp(hf, gg)
    print(f"realistic 256M at 384 px, HF (fp32) vs GGUF (Q8_0 text, F16 mmproj) on {len(hf)} val photos: "
          f"label agreement {agree:.3f}, max |Δp| {delta:.1e}")
    assert agree >= 0.9 and delta <= 0.1  # measured 1.000 and 3.5e-2 (Q8_0's 8-bit activations; see the README)
