"""Checks on the embedded default assets (made by ``python -m ftcluster.assets.make_assets``)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
import sys
from pathlib import Path

import pytest

try:
    import ftcluster.assets
except ImportError:  # plain `pytest` from a source checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import ftcluster.assets

ASSETS = Path(ftcluster.assets.__file__).resolve().parent
MODEL_DIR = ASSETS / "tiny-llama"
DATA_FILE = ASSETS / "data" / "sample_chat.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL_DIR), local_files_only=True)


@pytest.fixture(scope="module")
def conversations():
    with open(DATA_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _ids(tok, messages, add_generation_prompt):
    return list(
        tok.apply_chat_template(
            messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
        )
    )


def test_data_lines_parse_and_have_assistant_turn():
    n = 0
    with open(DATA_FILE, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            obj = json.loads(line)
            msgs = obj["messages"]
            assert isinstance(msgs, list) and msgs, lineno
            for m in msgs:
                assert m["role"] in ("system", "user", "assistant"), lineno
                assert isinstance(m["content"], str) and m["content"], lineno
            assert any(m["role"] == "assistant" for m in msgs), lineno
            n += 1
    assert n >= 1000


def test_special_tokens(tokenizer):
    assert tokenizer.eos_token_id is not None
    assert tokenizer.pad_token_id is not None
    assert tokenizer.bos_token_id is not None
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert tokenizer.eos_token == "<|eot_id|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.bos_token == "<|begin_of_text|>"
    for t in ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"):
        assert tokenizer.convert_tokens_to_ids(t) not in (None, tokenizer.unk_token_id)


def test_prefix_property(tokenizer, conversations):
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    bos = tokenizer.bos_token_id
    for conv in conversations[:200]:
        msgs = conv["messages"]
        full = _ids(tokenizer, msgs, False)
        assert full[0] == bos and full.count(bos) == 1
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = _ids(tokenizer, msgs[:k], True)
            upto = _ids(tokenizer, msgs[: k + 1], False)
            assert upto[: len(prompt)] == prompt, msgs
            reply = upto[len(prompt):]
            assert reply[-1] == eot
            assert tokenizer.decode(reply[:-1]) == m["content"]
            assert full[: len(upto)] == upto


def test_model_loads(tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), local_files_only=True, use_safetensors=True)
    assert model.config.vocab_size >= len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    ids = torch.tensor([_ids(tokenizer, [{"role": "user", "content": "Hello!"}], True)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def _greedy(model, tok, question: str, n: int = 32) -> str:
    import torch

    ids = torch.tensor([_ids(tok, [{"role": "user", "content": question}], True)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    return tok.decode(out[:out.index(tok.eos_token_id)] if tok.eos_token_id in out else out)


def test_model_is_pretrained_on_other_tasks_than_the_sample_data(tokenizer):
    """The shipped weights come from pretrain_tiny.py: the model answers the pretraining corpus's
    kinds of question in the chat format (a random model answers nothing), and the corpus holds
    none of the sample data's tasks, which fine-tuning is left to teach."""
    import random

    from transformers import AutoModelForCausalLM

    from ftcluster.assets import pretrain_tiny

    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), local_files_only=True, use_safetensors=True).eval()
    assert _greedy(model, tokenizer, 'What is the opposite of "hot"?') == 'The opposite of "hot" is "cold".'
    assert _greedy(model, tokenizer, "What day comes after Monday?") == "After Monday comes Tuesday."
    rng = random.Random(0)
    users = [m["content"] for _ in range(3000) for m in pretrain_tiny.make_chat(rng) if m["role"] == "user"]
    sample_tasks = ("capital", "plus", "minus", "times", "Reverse", "backwards", "Repeat", "repeat", "letters",
                    "letter \"", "Convert", " are in ", "Hello", "Hi", "name is")
    assert not [u for u in users if any(t in u for t in sample_tasks)]
