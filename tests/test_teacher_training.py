"""`qd train-teacher` machinery on a tiny budget: the tokenizer, the resume check, the unlikelihood polish.

Resume bit for bit, the NaN guard and the best checkpoint are tested for every recipe in test_train_loop.py.
"""

import json

import pytest
import torch

from qdlib.corpus import train_tokenizer
from qdlib.errors import ConfigError
from qdlib.teacher import TeacherTrainConfig, train_teacher


def tiny_cfg(**kw):
    base = dict(steps=4, batch_size=2, max_seq_length=32, hidden=64, vocab_size=400, eval_every=2, checkpoint_every=1,
                sources=("stdlib",), max_files=12, compile=False, mixed_precision="no", warmup_steps=1, ul_steps=0)
    base.update(kw)
    return TeacherTrainConfig(**base)


def test_resume_with_other_settings_is_refused(tmp_path):
    train_teacher(tiny_cfg(steps=1), tmp_path, log=lambda *_: None)
    with pytest.raises(ConfigError, match="other settings"):  # a QdError: one line from `qd`
        train_teacher(tiny_cfg(steps=2, learning_rate=1e-4), tmp_path, log=lambda *_: None)


def test_tokenizer_round_trip_and_special_tokens(tmp_path):
    from transformers import AutoTokenizer

    tok = train_tokenizer(["def f(x):\n    return x\n" * 50, "import os\nprint(os.sep)\n" * 50], vocab_size=300)
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    text = "def g(y):\n\treturn 'é' + y  # ünïcode\n"
    assert tok2.decode(tok2(text)["input_ids"]) == text
    assert tok2.convert_tokens_to_ids("<|endoftext|>") == 0 and tok2.pad_token_id == 1


def test_repeated_token_mask_marks_every_token_of_a_repeated_4gram():
    from qdlib.teacher import repeated_token_mask

    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9]])
    assert repeated_token_mask(ids).int().tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 0], [0] * 9]


@pytest.mark.slow
def test_unlikelihood_polish_lowers_repeated_tokens_probability(tmp_path):
    """The polish phase runs after the main steps, logs its loss, and pushes down repeats it is trained on."""
    from transformers import Qwen3ForCausalLM

    from qdlib.teacher import _unlikelihood_loss, teacher_config

    cfg = tiny_cfg(steps=2, ul_steps=2, ul_batch=2, ul_prompt_tokens=8, ul_new_tokens=16)
    train_teacher(cfg, tmp_path, log=lambda *_: None)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert "ul_loss" not in log[1] and {"ul_loss", "greedy_rep"} <= set(log[2]) and log[3]["lr"] == cfg.ul_learning_rate
    # the loss itself: a model that loops gets a positive penalty whose gradient lowers p(repeat)
    torch.manual_seed(0)
    m = Qwen3ForCausalLM(teacher_config(64, 32, layers=2)).train()
    prompts = torch.tensor([[3, 4, 5, 6, 3, 4, 5, 6]])
    ul, rep = _unlikelihood_loss(m, prompts, 24, use_bf16=False)
    assert 0 <= rep <= 1 and (ul.item() > 0) == (rep > 0)


@pytest.mark.parametrize("kw, match", [
    ({"steps": 0}, r"teacher.steps=0 is out of range; allowed: an integer >= 1"),
    ({"sources": ("torch", "stdlib")}, r"must start with 'stdlib'"),
    ({"sources": ("stdlib", "numpy")}, r"teacher.sources=.* names 'numpy', which are not allowed"),
    ({"learning_rate": 0, "mixed_precision": "yes"}, r"2 problems: teacher.learning_rate=0 .*; teacher.mixed_precision='yes'"),
])
def test_a_bad_teacher_setting_is_named_with_what_is_allowed(kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(**kw).validate()
