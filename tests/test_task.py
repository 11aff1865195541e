import pytest

from elemental.config import TaskConfig
from elemental.errors import ElementalError
from elemental.task import Task


def test_label_prompt_is_the_chat_template_with_text_before_image(task, tiny_processor):
    messages = [{"role": "user", "content": [{"type": "text", "text": task.instruction}, {"type": "image"}]}]
    rendered = tiny_processor.apply_chat_template(messages, add_generation_prompt=True)
    assert task.prompt("label") == rendered
    assert task.prompt("label").index(task.instruction) < task.prompt("label").index("<image>")


def test_instruction_lists_the_labels(task):
    assert task.instruction == "Classify this image into one of these elements: water, land, fire, wood, metal."


def test_prompt_parts_split_at_the_image(task):
    before, after = task.prompt_parts()
    assert before + "<image>" + after == task.prompt()
    assert after == "<end_of_utterance>\nAssistant:"


def test_answers_are_label_then_end_of_utterance(task):
    assert task.label_answer("fire") == " fire<end_of_utterance>"
    assert task.reason_answer("  bright   flames\n") == " bright flames<end_of_utterance>"
    with pytest.raises(ElementalError, match="'lava' is not one of"):
        task.label_answer("lava")


def test_context_prompt_keeps_the_label_prompt_as_prefix(task):
    ctx = task.prompt("context", reason="orange flames")
    assert "Context: orange flames" in ctx
    assert ctx != task.prompt("label")
    with pytest.raises(ValueError):
        task.prompt("context")


def test_label_tokens_have_unique_first_tokens_in_tiny_tokenizer(task, tiny_processor):
    tok = tiny_processor.tokenizer
    ids = task.label_token_ids(tok)
    assert len(ids) == 5
    assert task.first_tokens_unique(tok)
    # The answer tokenises as the label's tokens followed by exactly one end-of-utterance token.
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")
    assert tok.encode(task.label_answer("water"), add_special_tokens=False) == ids[0] + [eou]


def test_custom_labels_render_in_the_instruction():
    t = Task.from_config(TaskConfig(labels=["cat", "dog"]))
    assert t.instruction.endswith("cat, dog.")
