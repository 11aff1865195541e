"""Training logic without a training run: examples per reason mode, loss masking, LoRA targets."""

import re

import numpy as np
import torch

from elemental.data.records import Record
from elemental.synthetic import synthetic_photo
from elemental.train.collate import IGNORE_INDEX, Collator, encode_example
from elemental.train.examples import build_examples
from elemental.train.targets import lora_target_regex


def _records(n=20):
    labels = ["water", "land", "fire", "wood", "metal"]
    return [
        Record(image_id=f"{i}", image_path=f"images/{i}.jpg", element=labels[i % 5], reason=f"reason {i}",
               confidence=0.9)
        for i in range(n)
    ]


def test_multitask_adds_rationale_examples_with_the_explain_prompt(task):
    ex = build_examples(_records(), task, "multitask", rationale_ratio=1.0)
    labels = [e for e in ex if e.kind == "label"]
    explains = [e for e in ex if e.kind == "explain"]
    assert len(labels) == len(explains) == 20
    assert all(e.prompt == task.prompt("label") for e in labels)
    assert all(e.prompt == task.prompt("explain") and e.answer.startswith(" reason") for e in explains)


def test_none_mode_is_label_examples_only_with_the_inference_prompt(task):
    ex = build_examples(_records(), task, "none")
    assert [e.kind for e in ex] == ["label"] * 20
    assert {e.prompt for e in ex} == {task.prompt("label")}
    assert ex[3].answer == " wood<end_of_utterance>"


def test_context_mode_drops_context_at_the_given_rate(task):
    ex = build_examples(_records(200), task, "context", context_dropout=0.25, seed=1)
    share_bare = sum(e.kind == "label" for e in ex) / len(ex)
    assert 0.15 < share_bare < 0.35
    ctx = [e for e in ex if e.kind == "context"]
    assert all("Context: reason" in e.prompt and e.answer.endswith("<end_of_utterance>") for e in ctx)


def test_examples_are_deterministic_for_a_seed(task):
    a = build_examples(_records(), task, "multitask", rationale_ratio=0.5, seed=7)
    b = build_examples(_records(), task, "multitask", rationale_ratio=0.5, seed=7)
    assert a == b


def test_loss_mask_is_exactly_the_answer_tokens(task, tiny_processor):
    img = synthetic_photo("fire", np.random.default_rng(0))
    item = encode_example(tiny_processor, task.prompt("label"), img, task.label_answer("fire"))
    tok = tiny_processor.tokenizer
    supervised = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")
    assert supervised == tok.encode(" fire", add_special_tokens=False) + [eou]
    # The supervised tokens are the last ones; everything before (prompt + 64 image tokens) is masked.
    n = len(supervised)
    assert (item["labels"][:-n] == IGNORE_INDEX).all()
    assert (item["input_ids"][-n:] == item["labels"][-n:]).all()
    assert int((item["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum()) == 64


def test_collator_pads_right_and_masks_padding(task, tiny_processor, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i, label in enumerate(["water", "wood"]):
        synthetic_photo(label, rng).save(tmp_path / f"images/{i}.jpg")
    recs = [
        Record(image_id="0", image_path="images/0.jpg", element="water", reason="a long reason " * 5, confidence=1),
        Record(image_id="1", image_path="images/1.jpg", element="wood", reason="x", confidence=1),
    ]
    ex = build_examples(recs, task, "multitask", rationale_ratio=1.0)
    batch = Collator(tiny_processor, tmp_path)(ex[:3])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape[:2] == (3, 1)
    pad = batch["attention_mask"] == 0
    assert pad.any(), "examples of different lengths must be padded"
    assert (batch["labels"][pad] == IGNORE_INDEX).all()
    assert (batch["input_ids"][pad] == tiny_processor.tokenizer.pad_token_id).all()
    # Padding is on the right: every row is ones then zeros.
    for row in batch["attention_mask"]:
        k = int(row.sum())
        assert torch.equal(row, torch.cat([torch.ones(k), torch.zeros(len(row) - k)]).long())


def test_lora_targets_hit_text_and_connector_never_vision(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    hit = [n for n in names if re.fullmatch(lora_target_regex(), n)]
    assert hit and not any("vision" in n for n in hit)
    assert any("connector" in n for n in hit)
    assert {n.rsplit(".", 1)[1] for n in hit if "text_model" in n} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert any("vision" in n and n.endswith("q_proj") for n in names), "vision tower shares the names"


# -- --bf16: what this device does with it ----------------------------------------------------------

def test_bf16_on_a_cpu_follows_its_native_bf16():
    from elemental.hardware import parse_cpuinfo, this_cpu
    from elemental.train.recipe import training_precision

    cpu = torch.device("cpu")
    xeon = parse_cpuinfo("flags : avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n", "x86_64", 2)
    older = parse_cpuinfo("flags : avx2 fma f16c avx512f\n", "x86_64", 2)
    arm = parse_cpuinfo("Features : fp asimd asimddp bf16 i8mm\n", "aarch64", 8)
    assert training_precision(True, cpu, xeon) == (True, "bf16 autocast on the CPU (native bf16: amx_bf16, "
                                                         "avx512_bf16)")
    assert training_precision(True, cpu, arm)[0] is True
    bf16, why = training_precision(True, cpu, older)
    assert not bf16 and "no native bf16" in why and "5x slower" in why
    assert training_precision(False, cpu, xeon)[0] is False  # never without --bf16
    assert training_precision(True, cpu)[0] is this_cpu().native_bf16  # this machine, read from the kernel


def test_resume_takes_the_newest_checkpoint_every_rank_finished(tmp_path):
    from elemental.train.recipe import _last_checkpoint

    def ckpt(step, *files):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        for f in files:
            (d / f).write_bytes(b"x")

    ckpt(10, "trainer_state.json", "rng_state_0.pth", "rng_state_1.pth")
    ckpt(20, "trainer_state.json", "rng_state_0.pth")  # killed before rank 1 saved its RNG state
    ckpt(30, "rng_state_0.pth", "rng_state_1.pth")  # killed before rank 0 saved the trainer state
    (tmp_path / "best_adapter").mkdir()
    assert _last_checkpoint(tmp_path, world=2) == str(tmp_path / "checkpoint-10")
    assert _last_checkpoint(tmp_path, world=1) is None  # a 1-process run saves rng_state.pth
    ckpt(5, "trainer_state.json", "rng_state.pth")
    assert _last_checkpoint(tmp_path, world=1) == str(tmp_path / "checkpoint-5")
    assert _last_checkpoint(tmp_path / "none", world=2) is None


def test_process_role_refuses_a_trainer_that_does_not_see_the_process_group():
    from types import SimpleNamespace

    import pytest

    from elemental.errors import ElementalError
    from elemental.train.recipe import process_role

    assert process_role(SimpleNamespace(process_index=0, world_size=1)) == (0, 1)
    with pytest.raises(ElementalError, match="expects 2 processes"):
        process_role(SimpleNamespace(process_index=1, world_size=2))  # no process group in this test process


def test_process_role_refuses_a_trainer_that_disagrees_with_torch_distributed():
    from types import SimpleNamespace

    import pytest
    import torch.distributed as dist

    from elemental.errors import ElementalError
    from elemental.train.recipe import process_role

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ElementalError, match="torch.distributed says process 0 of 1 but the Trainer says 1 of 2"):
            process_role(SimpleNamespace(process_index=1, world_size=2))
        assert process_role(SimpleNamespace(process_index=0, world_size=1)) == (0, 1)
    finally:
        dist.destroy_process_group()
