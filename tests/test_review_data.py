"""The review's data layer: the decision log, the reviewed split files the next `train` reads, the queue order,
the teacher measured against the person, and `prepare` re-runs keeping the reviews."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from elemental.config import PrepareConfig, TaskConfig
from elemental.data.prepare import prepare_dataset
from elemental.data.records import load_split
from elemental.errors import ElementalError
from elemental.review import dataset, log, measure
from elemental.review.queue import LOW_CONFIDENCE, build_queue
from elemental.synthetic import write_synthetic_photos
from elemental.task import Task

TASK = Task.from_config(TaskConfig())


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_photos(tmp_path_factory.mktemp("src") / "photos", TASK.labels, 6, seed=0)


def _prepare(photos: Path, out: Path) -> dict:
    cfg = PrepareConfig(sources=[f"folder:{photos}"], output_dir=out, label_cache=out.parent / "labels.sqlite")
    return prepare_dataset(cfg, TASK, say=lambda _: None)


@pytest.fixture
def ds(photos: Path, tmp_path: Path) -> Path:
    _prepare(photos, tmp_path / "dataset")
    return tmp_path / "dataset"


def _decide(ds: Path, photo: dataset.Photo, action: str, new: str | None = None) -> None:
    """What the server does for one decision: append under the lock, then derive the split files."""
    with log.locked(ds):
        log.append(ds, log.Decision(photo.digest, photo.record.image_id, action, photo.record.element, new, log.now()))
        dataset.apply(ds, TASK)


def _other(label: str) -> str:
    return next(x for x in TASK.labels if x != label)


def test_prepare_writes_the_teachers_split_beside_the_seed_files(ds: Path):
    teacher = json.loads((ds / dataset.TEACHER_FILE).read_text())
    assert teacher["train"] == json.loads((ds / "train.json").read_text())
    assert teacher["val"] == json.loads((ds / "val.json").read_text())
    assert dataset.is_current(ds)  # no log, nothing to apply


def test_relabel_drop_accept_and_undo_reach_the_split_files(ds: Path):
    photos = dataset.photos(ds, TASK)
    train = [p for p in photos if p.split == "train"]
    val = [p for p in photos if p.split == "val"]
    relabelled, dropped, accepted, undone = train[0], train[1], val[0], val[1]
    new = _other(relabelled.record.element)
    _decide(ds, relabelled, "relabel", new)
    _decide(ds, dropped, "drop")
    _decide(ds, accepted, "accept", accepted.record.element)
    _decide(ds, undone, "relabel", _other(undone.record.element))
    _decide(ds, undone, "undo")

    tr = {r.image_id: r for r in load_split(ds, "train", TASK)}
    va = {r.image_id: r for r in load_split(ds, "val", TASK)}
    assert tr[relabelled.record.image_id].element == new
    extra = tr[relabelled.record.image_id].model_extra
    assert extra["teacher_element"] == relabelled.record.element and extra["review"] == "relabel"
    assert dropped.record.image_id not in tr and dropped.record.image_id not in va
    assert (ds / dropped.record.image_path).is_file()  # an undo can bring it back
    assert va[accepted.record.image_id].model_extra["review"] == "accept"
    assert va[undone.record.image_id].element == undone.record.element  # back to the teacher's, unmarked
    assert "review" not in (va[undone.record.image_id].model_extra or {})
    assert len(tr) + len(va) == len(photos) - 1  # the split is the teacher's: nothing moved between them
    assert set(tr) <= {p.record.image_id for p in train}

    meta = json.loads((ds / "metadata.json").read_text())
    assert meta["reviews"]["reviewed"] == 3 and meta["reviews"]["changed"] == 1
    assert meta["reviews"]["dropped"] == 1 and meta["reviews"]["accepted"] == 1
    assert meta["reviews"]["by_split"]["val"]["reviewed"] == 1
    assert meta["n_train"] == len(tr) and meta["n_val"] == len(va)
    assert sum(meta["counts"]["total"].values()) == len(tr) + len(va)
    assert meta["counts"]["train"][new] == sum(r.element == new for r in tr.values())
    # The teacher's labels are untouched.
    teacher = json.loads((ds / dataset.TEACHER_FILE).read_text())
    assert {r["image_id"]: r["element"] for r in teacher["train"]}[relabelled.record.image_id] == \
        relabelled.record.element

    lines = [json.loads(x) for x in log.log_path(ds).read_text().splitlines()]
    assert [x["action"] for x in lines] == ["relabel", "drop", "accept", "relabel", "undo"]
    assert lines[0]["digest"] == relabelled.digest and lines[0]["old"] == relabelled.record.element
    assert lines[0]["new"] == new and lines[1]["new"] is None


def test_undo_pops_one_decision_and_the_latest_standing_one_wins():
    def d(action: str, new: str | None, digest: str = "a") -> log.Decision:
        return log.Decision(digest, "id", action, "water", new, log.now())

    assert log.states([d("relabel", "fire"), d("accept", "water")])["a"].action == "accept"
    assert log.states([d("relabel", "fire"), d("drop", None), d("undo", None)])["a"].new == "fire"
    assert log.states([d("drop", None), d("undo", None), d("undo", None)]) == {}
    assert set(log.states([d("drop", None), d("accept", "water", "b")])) == {"a", "b"}


def test_a_killed_server_loses_nothing_and_the_next_train_reads_the_decision(ds: Path):
    """The log line is written and fsynced before the split files: killed in between, `sync` catches up."""
    photo = dataset.photos(ds, TASK)[0]
    new = _other(photo.record.element)
    with log.locked(ds):  # appended, never applied: the server died here
        log.append(ds, log.Decision(photo.digest, photo.record.image_id, "relabel", photo.record.element, new,
                                    log.now()))
    assert not dataset.is_current(ds)
    assert dataset.sync(ds, TASK)["changed"] == 1
    assert {r.image_id: r.element for r in load_split(ds, "train", TASK)}[photo.record.image_id] == new
    assert dataset.sync(ds, TASK) is None  # current now: nothing rewritten


def test_a_torn_write_is_skipped_and_the_next_decision_starts_its_own_line(ds: Path):
    photos = dataset.photos(ds, TASK)
    _decide(ds, photos[0], "drop")
    with open(log.log_path(ds), "ab") as f:
        f.write(b'{"digest": "abc", "ima')  # a write a crash cut short
    assert len(log.read(ds)) == 1
    _decide(ds, photos[1], "drop")  # the server started again: its line is not glued to the fragment
    assert [d.digest for d in log.read(ds)] == [photos[0].digest, photos[1].digest]
    assert dataset.is_current(ds)


def test_a_bad_field_in_the_log_is_named_by_line(ds: Path):
    _decide(ds, dataset.photos(ds, TASK)[0], "drop")
    with open(log.log_path(ds), "a") as f:
        f.write('{"digest": "x", "image_id": "y", "action": "rename", "time": "t"}\n')
        f.write('{"digest": "x", "image_id": "y", "action": "relabel", "time": "t"}\n')
    with pytest.raises(ElementalError, match=r"reviews.jsonl:2\.action: 'rename' is not one of"):
        log.read(ds)
    log.log_path(ds).write_text(log.log_path(ds).read_text().replace('"rename"', '"drop"'))
    with pytest.raises(ElementalError, match=r"reviews.jsonl:3\.new: a relabel needs the label"):
        log.read(ds)


def test_a_label_off_the_task_in_the_log_is_refused(ds: Path):
    photo = dataset.photos(ds, TASK)[0]
    with log.locked(ds):
        log.append(ds, log.Decision(photo.digest, photo.record.image_id, "relabel", photo.record.element, "plasma",
                                    log.now()))
    with pytest.raises(ElementalError, match="'plasma', not one of the task's labels"):
        dataset.sync(ds, TASK)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_pending_reviews_in_a_read_only_dataset_stop_training_with_a_clear_message(ds: Path):
    photo = dataset.photos(ds, TASK)[0]
    with log.locked(ds):
        log.append(ds, log.Decision(photo.digest, photo.record.image_id, "drop", photo.record.element, None,
                                    log.now()))
    ds.chmod(0o555)
    try:
        with pytest.raises(ElementalError, match="not yet applied .* read-only"):
            dataset.sync(ds, TASK)
    finally:
        ds.chmod(0o755)


def test_read_only_check_names_the_folder_even_as_root(ds: Path, monkeypatch: pytest.MonkeyPatch):
    """As root, chmod does not stop writes; the check goes through os.access, which a test can answer."""
    photo = dataset.photos(ds, TASK)[0]
    with log.locked(ds):
        log.append(ds, log.Decision(photo.digest, photo.record.image_id, "drop", photo.record.element, None,
                                    log.now()))
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != ds)
    with pytest.raises(ElementalError, match=f"{ds} holds reviews not yet applied"):
        dataset.sync(ds, TASK)


def test_an_older_dataset_without_teacher_labels_is_reviewed_too(ds: Path):
    (ds / dataset.TEACHER_FILE).unlink()
    before = json.loads((ds / "train.json").read_text())
    photo = dataset.photos(ds, TASK)[0]
    _decide(ds, photo, "drop")
    assert json.loads((ds / dataset.TEACHER_FILE).read_text())["train"] == before  # kept before the first change
    (ds / dataset.TEACHER_FILE).unlink()  # lost after reviews were applied: the split files are no teacher's
    with pytest.raises(ElementalError, match="teacher_labels.json is missing but the split files hold reviewed"):
        dataset.photos(ds, TASK)


def test_prepare_again_keeps_the_reviews(photos: Path, ds: Path):
    """A re-run rebuilds the folder from the teacher's labels (the cache): the log is carried over and applied."""
    all_photos = dataset.photos(ds, TASK)
    relabelled, dropped = all_photos[0], all_photos[-1]
    new = _other(relabelled.record.element)
    _decide(ds, relabelled, "relabel", new)
    _decide(ds, dropped, "drop")
    log_before = log.log_path(ds).read_bytes()

    meta = _prepare(photos, ds)
    assert log.log_path(ds).read_bytes() == log_before
    assert meta["reviews"]["changed"] == 1 and meta["reviews"]["dropped"] == 1
    records = {r.image_id: r for s in ("train", "val") for r in load_split(ds, s, TASK)}
    assert records[relabelled.record.image_id].element == new
    assert dropped.record.image_id not in records
    teacher = json.loads((ds / dataset.TEACHER_FILE).read_text())
    assert {r["image_id"]: r["element"] for s in ("train", "val") for r in teacher[s]}[relabelled.record.image_id] \
        == relabelled.record.element
    assert dataset.is_current(ds)


def test_a_review_re_runs_training_not_prepare(ds: Path):
    """`elemental run` hashes the teacher's split as prepare's output and the split files as train's input."""
    from elemental.config import RunConfig
    from elemental.runstate import Hasher, stage_inputs, stage_outputs

    cfg = RunConfig.model_validate({"prepare": {"sources": ["folder:x"], "output_dir": str(ds)},
                                    "train": {"dataset_dir": str(ds), "output_dir": str(ds.parent / "run")}})
    before = stage_outputs("prepare", cfg, Hasher()), stage_inputs("train", cfg, Hasher())["dataset"]
    _decide(ds, dataset.photos(ds, TASK)[0], "drop")
    after = stage_outputs("prepare", cfg, Hasher()), stage_inputs("train", cfg, Hasher())["dataset"]
    assert after[0] == before[0] and after[1] != before[1]


def _results(rows: list[tuple[str, str, dict[str, float]]]) -> dict:
    """A results file's predictions as evaluate writes them: (image_path, predicted, probabilities)."""
    return {"accuracy": 0.0, "macro_f1": 0.0, "per_class": {}, "predictions": [
        {"image_path": path, "element": "", "predicted": pred, "probabilities": probs, "ms": 1.0}
        for path, pred, probs in rows]}


def _probs(top: str, p: float) -> dict[str, float]:
    rest = (1 - p) / (len(TASK.labels) - 1)
    return {label: p if label == top else rest for label in TASK.labels}


def test_queue_puts_disagreements_first_by_cleanlab_score_then_low_confidence(ds: Path, tmp_path: Path):
    photos = dataset.photos(ds, TASK)
    val = [p for p in photos if p.split == "val"]
    a, b, c = val[0], val[1], val[2]
    run = tmp_path / "run"
    run.mkdir()
    (run / "validation_results.json").write_text(json.dumps(_results([
        (a.record.image_path, _other(a.record.element), _probs(_other(a.record.element), 0.6)),
        (b.record.image_path, _other(b.record.element), _probs(_other(b.record.element), 0.95)),
        (c.record.image_path, c.record.element, _probs(c.record.element, 0.9)),
    ])))
    low = photos[5]
    low.record = low.record.model_copy(update={"confidence": LOW_CONFIDENCE - 0.1})
    q = build_queue(photos, list(TASK.labels), run)
    order = [i.photo.digest for i in q.items]
    assert order[:3] == [b.digest, a.digest, low.digest]  # the surer the student disagrees, the earlier
    first = q.items[0]
    assert first.tier == 0 and first.student_label == _other(b.record.element)
    assert first.score == pytest.approx(0.05 / 4) and first.predictions_from == "validation_results.json"
    assert q.items[2].tier == 1
    assert any("no held-out predictions" in n for n in q.notes)  # train photos: teacher confidence only
    assert all(i.student is None for i in q.items if i.photo.split == "train")


def test_teacher_vs_person(ds: Path):
    photos = dataset.photos(ds, TASK)
    val = [p for p in photos if p.split == "val"]
    train = [p for p in photos if p.split == "train"]
    kept, changed, dropped = val[0], val[1], train[0]
    new = _other(changed.record.element)
    _decide(ds, kept, "accept", kept.record.element)
    _decide(ds, changed, "relabel", new)
    _decide(ds, dropped, "drop")
    # The student is right about the changed photo (says the person's label) and wrong about the kept one.
    rows = [(p.record.image_path, p.record.element, _probs(p.record.element, 0.9)) for p in val[2:]]
    rows += [(kept.record.image_path, new, _probs(new, 0.9)), (changed.record.image_path, new, _probs(new, 0.9))]
    block = measure.teacher_vs_person(ds, TASK, "val", _results(rows))
    assert block["teacher"]["reviewed"] == 3 and block["teacher"]["agreement"] == pytest.approx(1 / 3)
    assert block["teacher"]["per_class"][kept.record.element]["agreed"] >= 1
    s = block["student"]
    assert s["reviewed"] == 2 and s["accuracy_vs_person"] == pytest.approx(0.5)
    assert s["teacher_accuracy_vs_person"] == pytest.approx(0.5)
    assert s["accuracy_vs_teacher"] == pytest.approx((len(val) - 2) / len(val))
    assert any("lower bound" in line for line in measure.summary_lines(block))


def test_nothing_reviewed_adds_nothing_to_evaluate(ds: Path):
    assert measure.teacher_vs_person(ds, TASK, "val", _results([])) is None


@pytest.mark.slow
def test_heldout_predictions_rank_injected_label_errors_first(demo_dir: Path, tmp_path: Path):
    """Ten teacher labels flipped in a copy of the demo: `elemental heldout` (2 folds) gives every train photo
    probabilities from a model that never saw it, and the queue puts the flipped photos at its head."""
    from cli_process import elemental

    from elemental.pipeline import demo_config

    ds = Path(shutil.copytree(demo_dir / "dataset", tmp_path / "dataset"))
    teacher = json.loads((ds / "train.json").read_text())
    flipped = set()
    for r in teacher[::27][:10]:
        r["element"] = _other(r["element"])
        flipped.add(r["image_id"])
    (ds / "train.json").write_text(json.dumps(teacher))
    (ds / dataset.TEACHER_FILE).write_text(json.dumps({"train": teacher,
                                                       "val": json.loads((ds / "val.json").read_text())}))
    cfg = demo_config(demo_dir)
    toml = tmp_path / "ho.toml"
    toml.write_text(f'[model]\nbase_model = "{cfg.model.base_model}"\n[train]\ndataset_dir = "{ds}"\n'
                    f'output_dir = "{tmp_path / "run"}"\nbatch_size = 8\nnum_epochs = 3\nlearning_rate = 2e-3\n'
                    'gradient_checkpointing = false\nreport_to = "none"\n')
    res = elemental("heldout", "-c", str(toml), "--folds", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "train photos predicted by models that held them out" in res.stdout

    results = json.loads((tmp_path / "run/heldout_results.json").read_text())
    paths = [p["image_path"] for p in results["predictions"]]
    assert sorted(paths) == sorted(r["image_path"] for r in teacher)  # every train photo, once
    folds = json.loads((tmp_path / "run/heldout/folds.json").read_text())
    for k in (0, 1):  # each fold's model trained on the other fold only
        fold_train = {r["image_id"] for r in json.loads((tmp_path / f"run/heldout/fold{k}/dataset/train.json")
                                                         .read_text())}
        assert fold_train and all(folds[i] != k for i in fold_train)
    q = build_queue(dataset.photos(ds, TASK), list(TASK.labels), tmp_path / "run")
    head = [i.photo.record.image_id for i in q.items[:15]]
    print(f"heldout (2 folds): of {len(flipped)} flipped labels, {len(flipped & set(head))} in the queue's first 15, "
          f"{len(flipped & set(head[:10]))} in its first 10")
    assert len(flipped & set(head)) >= 8, (head, flipped)


@pytest.mark.slow
def test_evaluate_reports_the_teacher_against_the_person(demo_dir: Path, tmp_path: Path):
    """The real CLI on the demo's GGUF files and a reviewed copy of its dataset: the results file and the printed
    lines hold the teacher's agreement with the person and the student against both."""
    from cli_process import elemental

    ds = Path(shutil.copytree(demo_dir / "dataset", tmp_path / "dataset"))
    photos = dataset.photos(ds, TASK)
    val = [p for p in photos if p.split == "val"]
    train = [p for p in photos if p.split == "train"]
    changed, kept, dropped = val[0], val[1], val[2]
    person = _other(changed.record.element)
    _decide(ds, changed, "relabel", person)
    _decide(ds, kept, "accept", kept.record.element)
    _decide(ds, dropped, "drop")
    with log.locked(ds):  # the last decision saved by a server killed before it rewrote the split files
        log.append(ds, log.Decision(train[0].digest, train[0].record.image_id, "relabel", train[0].record.element,
                                    _other(train[0].record.element), log.now()))
    out = tmp_path / "res.json"
    res = elemental("evaluate", "--model_path", str(demo_dir / "gguf"), "--dataset_dir", str(ds),
                    "--output_path", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["n"] == len(val) - 1  # the dropped photo is out of the split
    block = results["review"]
    assert block["teacher"]["reviewed"] == 4 and block["teacher"]["agreement"] == pytest.approx(0.25)
    predicted = {p["image_path"]: p["predicted"] for p in results["predictions"]}
    s = block["student"]
    assert s["reviewed"] == 2 and s["dropped"] == 1 and s["teacher_accuracy_vs_person"] == pytest.approx(0.5)
    right = (predicted[changed.record.image_path] == person) + (predicted[kept.record.image_path] ==
                                                                 kept.record.element)
    assert s["accuracy_vs_person"] == pytest.approx(right / 2)
    teacher_of = {p.record.image_path: p.record.element for p in val}
    assert s["accuracy_vs_teacher"] == pytest.approx(
        sum(predicted[k] == teacher_of[k] for k in predicted) / len(predicted))
    assert "teacher vs person: kept 0.250 of 4 reviewed photos" in res.stdout
    assert f"vs person {s['accuracy_vs_person']:.3f} on 2 reviewed" in res.stdout
    # The killed server's decision was applied before evaluate read the split.
    assert json.loads((ds / "metadata.json").read_text())["reviews"]["changed"] == 2
