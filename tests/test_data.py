"""ftcluster.data: loading, label masking per format, bad-input errors, and the resumable
distributed batch order. Real `datasets` and a real (tiny, byte-level) tokenizer built here, so the
expected token ids can be written down; the shipped tokenizer is exercised too when present."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import numpy as np
import pytest
import torch

from ftcluster.compose import ASSETS_DIR
from ftcluster.config import DataConfig
from ftcluster.data import DataError, DistributedBatches, build_dataset, check_enough_samples
from ftcluster.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

CHAT_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"]


@pytest.fixture(autouse=True, scope="module")
def _private_datasets_cache(tmp_path_factory):
    # Keep the Arrow caches of these tests out of the user's ~/.cache.
    old = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_datasets_cache")
    datasets.disable_progress_bars()
    yield
    datasets.config.HF_DATASETS_CACHE = old


def _byte_tokenizer(*, chat_template: str | None = CHAT_TEMPLATE):
    """Byte-level BPE with no merges: one token per byte, so expected ids are easy to write.
    Adds <|begin_of_text|> in front (like Llama) when add_special_tokens=True."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 256)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|pad|>")
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def tok():
    return _byte_tokenizer()


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def first_batch(data, *, pad_id: int, max_seq_len: int = 512, mb: int = 1):
    return DistributedBatches(data, micro_batch_size=mb, rank=0, world_size=1, seed=0, shuffle=False,
                              pad_id=pad_id, max_seq_len=max_seq_len).next_microbatch()


def targets(batch, b: int = 0) -> list[int]:
    labels = batch.labels[b]
    return labels[labels != -100].tolist()


def assert_shifted(batch):
    """Every label is the next input token (or -100), and the last position is never a target."""
    ids, labels = batch.input_ids, batch.labels
    sup = labels[:, :-1] != -100
    assert torch.equal(labels[:, :-1][sup], ids[:, 1:][sup])
    assert (labels[:, -1] == -100).all()


# --- label masking per format --------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def test_messages_supervise_assistant_replies_only(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    data = build_dataset(DataConfig(path=path, format="messages"), tokenizer=tok, seed=0)
    ids, mask = data[0]
    full = tok.apply_chat_template(CONVERSATION, tokenize=False, chat_template=CHAT_TEMPLATE)
    assert ids.tolist() == enc(tok, full)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    expected = enc(tok, "Paris.") + [eot] + enc(tok, "Rome.") + [eot]
    assert ids[mask].tolist() == expected
    # The supervised spans sit right after each assistant header: the header itself is not supervised.
    header = enc(tok, "<|start_header_id|>assistant<|end_header_id|>\n\n")
    first = enc(tok, full[:full.index("Paris.")])
    assert first[-len(header):] == header and not mask[:len(first)].any()
    assert mask[len(first):len(first) + len(enc(tok, "Paris.")) + 1].all()

    batch = first_batch(data, pad_id=tok.pad_token_id)
    assert targets(batch) == expected
    assert_shifted(batch)
    # labels[t] predicts token t+1: the first target sits one position before "Paris.".
    assert batch.labels[0, len(first) - 1].item() == expected[0]
    assert batch.labels[0, len(first) - 2].item() == -100


def test_messages_chat_template_from_config(tmp_path):
    plain = _byte_tokenizer(chat_template=None)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(DataError, match="data.chat_template"):
        build_dataset(DataConfig(path=path), tokenizer=plain, seed=0)
    data = build_dataset(DataConfig(path=path, chat_template=CHAT_TEMPLATE), tokenizer=plain, seed=0)
    assert plain.decode(data[0][0][data[0][1]].tolist()) == "Paris.<|eot_id|>Rome.<|eot_id|>"


def test_template_without_prefix_property_is_rejected(tmp_path, tok):
    # Renders the number of messages first, so a shorter conversation is not a prefix of the full one.
    bad = "{{ messages|length }}" + CHAT_TEMPLATE
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}])
    with pytest.raises(DataError, match=r"chat\.jsonl:1: .*prefix property"):
        build_dataset(DataConfig(path=path, chat_template=bad), tokenizer=tok, seed=0)


def test_prompt_completion(tmp_path, tok):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    data = build_dataset(DataConfig(path=path, format="prompt_completion"), tokenizer=tok, seed=0)
    ids, mask = data[0]
    prompt = [tok.bos_token_id] + enc(tok, "2+2=")
    assert ids.tolist() == prompt + enc(tok, "4") + [tok.eos_token_id]
    assert mask.tolist() == [False] * len(prompt) + [True, True]
    batch = first_batch(data, pad_id=tok.pad_token_id)
    assert targets(batch) == enc(tok, "4") + [tok.eos_token_id]
    assert batch.labels[0, len(prompt) - 1].item() == enc(tok, "4")[0]
    assert_shifted(batch)


def test_alpaca_with_and_without_input(tmp_path, tok):
    rows = [{"instruction": "Add.", "input": "2 2", "output": "4"}, {"instruction": "Say hi.", "input": "", "output": "hi"}]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    data = build_dataset(DataConfig(path=path, format="alpaca"), tokenizer=tok, seed=0)
    for i, prompt_text in enumerate([ALPACA_PROMPT.format(instruction="Add.", input="2 2"),
                                     ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")]):
        ids, mask = data[i]
        prompt = [tok.bos_token_id] + enc(tok, prompt_text)
        reply = enc(tok, rows[i]["output"]) + [tok.eos_token_id]
        assert ids.tolist() == prompt + reply
        assert mask.tolist() == [False] * len(prompt) + [True] * len(reply)
    assert "### Input:" in ALPACA_PROMPT and "### Input:" not in ALPACA_PROMPT_NO_INPUT


def test_text_supervises_every_token(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    data = build_dataset(DataConfig(path=path, format="text"), tokenizer=tok, seed=0)
    ids, mask = data[0]
    assert ids.tolist() == [tok.bos_token_id] + enc(tok, "hello") + [tok.eos_token_id] and mask.all()
    batch = first_batch(data, pad_id=tok.pad_token_id)
    n = len(ids)
    assert batch.labels[0, :n - 1].tolist() == ids[1:].tolist()
    assert (batch.labels[0, n - 1:] == -100).all()
    assert data.stats.supervised_tokens == n - 1 and data.stats.tokens == n


def test_synthetic_is_lazy_seeded_and_needs_vocab():
    cfg = DataConfig(format="synthetic", synthetic_samples=1000, max_seq_len=16)
    with pytest.raises(DataError, match="vocab_size"):
        build_dataset(cfg, tokenizer=None, seed=0)
    a = build_dataset(cfg, tokenizer=None, seed=3, vocab_size=50)
    b = build_dataset(cfg, tokenizer=None, seed=3, vocab_size=50)
    c = build_dataset(cfg, tokenizer=None, seed=4, vocab_size=50)
    assert len(a) == 1000 and a.stats.kept == 1000
    ids, mask = a[999]
    assert ids.shape == (16,) and mask.all() and 0 <= ids.min() and ids.max() < 50
    assert np.array_equal(a[7][0], b[7][0]) and not np.array_equal(a[7][0], c[7][0])
    assert not np.array_equal(a[7][0], a[8][0])


# --- policies and counts -------------------------------------------------------------------------

def test_overlength_policies(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "short"}, {"text": "x" * 40}, {"text": "y" * 50}])
    trunc = build_dataset(DataConfig(path=path, format="text", max_seq_len=20), tokenizer=tok, seed=0)
    assert len(trunc) == 3 and trunc.stats.truncated == 2
    assert trunc[1][0].tolist() == ([tok.bos_token_id] + enc(tok, "x" * 40))[:20]

    drop = build_dataset(DataConfig(path=path, format="text", max_seq_len=20, overlength="drop"), tokenizer=tok, seed=0)
    assert len(drop) == 1 and drop.stats.dropped_overlength == 2 and drop.stats.rows_read == 3
    assert drop.stats.tokens == len(drop[0][0])

    with pytest.raises(DataError, match=r"t\.jsonl:2: 42 tokens, more than data.max_seq_len=20"):
        build_dataset(DataConfig(path=path, format="text", max_seq_len=20, overlength="error"), tokenizer=tok, seed=0)


def test_samples_without_supervision_are_dropped_and_counted(tmp_path, tok):
    rows = [
        {"messages": CONVERSATION},
        {"messages": CONVERSATION[:2]},  # no assistant turn
        # the assistant reply lies beyond max_seq_len, so truncation leaves nothing supervised
        {"messages": [{"role": "user", "content": "z" * 80}, {"role": "assistant", "content": "ok"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    data = build_dataset(DataConfig(path=path, max_seq_len=64), tokenizer=tok, seed=0)
    assert data.stats.dropped_no_supervision == 2 and data.stats.kept == 1
    assert data.where(0).endswith("chat.jsonl:1")


# --- bad input -----------------------------------------------------------------------------------

def test_malformed_jsonl_names_file_and_line(tmp_path, tok):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:4: malformed JSON"):
        build_dataset(DataConfig(path=str(p), format="text"), tokenizer=tok, seed=0)


def test_missing_or_mistyped_field_names_field_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(DataError, match=r"pc\.jsonl:2: missing field 'completion'"):
        build_dataset(DataConfig(path=path, format="prompt_completion"), tokenizer=tok, seed=0)
    path = write_jsonl(tmp_path / "pc2.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": 3}])
    with pytest.raises(DataError, match=r"pc2\.jsonl:2: field 'completion' must be a string; got int"):
        build_dataset(DataConfig(path=path, format="prompt_completion"), tokenizer=tok, seed=0)
    path = write_jsonl(tmp_path / "pc3.jsonl", [{"question": "a", "completion": "b"}])
    with pytest.raises(DataError, match=r"pc3\.jsonl:1: missing field 'prompt' \(data.prompt_field\)"):
        build_dataset(DataConfig(path=path, format="prompt_completion"), tokenizer=tok, seed=0)


def test_malformed_messages(tmp_path, tok):
    good = {"messages": CONVERSATION}
    for bad, pattern in [
        ({"messages": "hello"}, r"field 'messages' must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\].role must be one of"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\].content must be a string"),
    ]:
        path = write_jsonl(tmp_path / "m.jsonl", [good, good, bad])
        with pytest.raises(DataError, match=r"m\.jsonl:3: " + pattern):
            build_dataset(DataConfig(path=path), tokenizer=tok, seed=0)


def test_empty_and_missing_inputs(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no rows"):
        build_dataset(DataConfig(path=str(tmp_path / "empty.jsonl"), format="text"), tokenizer=tok, seed=0)
    with pytest.raises(DataError, match=r"data.path: no such file or directory: .*nope\.jsonl"):
        build_dataset(DataConfig(path=str(tmp_path / "nope.jsonl"), format="text"), tokenizer=tok, seed=0)
    with pytest.raises(DataError, match="data.path: pattern .* matches no file"):
        build_dataset(DataConfig(path=str(tmp_path / "*.parquet"), format="text"), tokenizer=tok, seed=0)


def test_fewer_samples_than_a_global_batch(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(5)])
    data = build_dataset(DataConfig(path=path, format="text"), tokenizer=tok, seed=0)
    check_enough_samples(data, micro_batch_size=1, grad_accum=1, world_size=5)
    with pytest.raises(DataError, match=r"5 usable samples, fewer than one global batch of 8 \(train.micro_batch_size=2 "
                                        r"x train.grad_accum=2 x world size 2\)"):
        check_enough_samples(data, micro_batch_size=2, grad_accum=2, world_size=2)


# --- loaders -------------------------------------------------------------------------------------

def test_parquet_saved_dataset_folder_glob_and_list(tmp_path, tok):
    rows = [{"text": f"row {i}"} for i in range(6)]
    expected = [[tok.bos_token_id] + enc(tok, r["text"]) + [tok.eos_token_id] for r in rows]
    ds = datasets.Dataset.from_list(rows)

    def ids_of(path, split="train"):
        data = build_dataset(DataConfig(path=path, format="text", split=split), tokenizer=tok, seed=0)
        return [data[i][0].tolist() for i in range(len(data))]

    ds.to_parquet(str(tmp_path / "a.parquet"))
    assert ids_of(str(tmp_path / "a.parquet")) == expected

    ds.save_to_disk(str(tmp_path / "saved"))
    assert ids_of(str(tmp_path / "saved")) == expected
    assert sorted(os.listdir(tmp_path / "saved")) == sorted(["data-00000-of-00001.arrow", "dataset_info.json", "state.json"])

    datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])}).save_to_disk(str(tmp_path / "dict"))
    assert ids_of(str(tmp_path / "dict"), split="test") == expected[:2]
    with pytest.raises(DataError, match="data.split: 'dev'"):
        ids_of(str(tmp_path / "dict"), split="dev")

    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "part0.jsonl", rows[:3])
    write_jsonl(folder / "part1.jsonl", rows[3:])
    assert ids_of(str(folder)) == expected
    assert ids_of(str(folder / "part*.jsonl")) == expected
    assert ids_of(f"{folder / 'part1.jsonl'},{folder / 'part0.jsonl'}") == expected[3:] + expected[:3]
    assert ids_of(str(folder / "part*.jsonl"), split="train[:2]") == expected[:2]

    # Rows of later files are located in their own file.
    write_jsonl(folder / "part1.jsonl", [rows[3], {"text": None}])
    with pytest.raises(DataError, match=r"part1\.jsonl:2: missing field 'text'"):
        ids_of(str(folder))
    write_jsonl(folder / "part1.jsonl", [{"txt": "oops"}])
    with pytest.raises(DataError, match=r"part1\.jsonl:1: fields txt differ from the fields text of .*part0\.jsonl:1"):
        ids_of(str(folder))


def test_num_proc_gives_the_same_result(tmp_path, tok):
    rows = [{"messages": CONVERSATION[: 3 + (i % 3)]} for i in range(40)]
    # Two files with the same rows, so the second build cannot be served from the first one's cache.
    one = build_dataset(DataConfig(path=write_jsonl(tmp_path / "a.jsonl", rows)), tokenizer=tok, seed=0)
    two = build_dataset(DataConfig(path=write_jsonl(tmp_path / "b.jsonl", rows), num_proc=2), tokenizer=tok, seed=0)
    assert one.stats == two.stats
    assert all(np.array_equal(one[i][0], two[i][0]) and np.array_equal(one[i][1], two[i][1]) for i in range(len(one)))
    # A bad row in the second worker's shard still names its line.
    rows[33] = {"messages": [{"role": "robot", "content": "x"}]}
    with pytest.raises(DataError, match=r"c\.jsonl:34: messages\[0\].role"):
        build_dataset(DataConfig(path=write_jsonl(tmp_path / "c.jsonl", rows), num_proc=2), tokenizer=tok, seed=0)


def test_shipped_tokenizer_and_sample_data():  # the assets ship in the repo: never skipped
    from transformers import AutoTokenizer

    shipped = AutoTokenizer.from_pretrained(str(ASSETS_DIR / "tiny-llama"))
    path = ASSETS_DIR / "data" / "sample_chat.jsonl"
    data = build_dataset(DataConfig(path=str(path), max_seq_len=512), tokenizer=shipped, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert data.stats.kept == data.stats.rows_read == len(rows)
    batches = DistributedBatches(data, micro_batch_size=8, rank=0, world_size=1, seed=0, shuffle=False,
                                 pad_id=shipped.pad_token_id, max_seq_len=512)
    batch = batches.next_microbatch()
    assert_shifted(batch)
    for b in range(8):
        replies = "".join(m["content"] + "<|eot_id|>" for m in rows[b]["messages"] if m["role"] == "assistant")
        assert shipped.decode(targets(batch, b)) == replies


# --- DistributedBatches --------------------------------------------------------------------------

class FakeData:
    """Sample i starts with token 1000+i (so batches can be traced back) and has 2..12 tokens."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        length = 2 + (i * 5) % 11
        ids = np.array([1000 + i] + [i % 50 + 1] * (length - 1), dtype=np.int64)
        mask = np.arange(length) % 2 == 1
        return ids, mask


def ids_of(batch) -> list[int]:
    return [int(v) - 1000 for v in batch.input_ids[:, 0]]


def make(data, *, rank=0, world_size=1, mb=2, seed=0, shuffle=True, max_seq_len=64):
    return DistributedBatches(data, micro_batch_size=mb, rank=rank, world_size=world_size, seed=seed,
                              shuffle=shuffle, pad_id=0, max_seq_len=max_seq_len)


def test_ranks_split_the_global_order_without_overlap():
    data = FakeData(24)
    ranks = [make(data, rank=r, world_size=2, mb=3) for r in range(2)]
    seen = {0: [], 1: []}
    for _ in range(4):  # 4 steps x 2 ranks x 3 = 24 = one epoch
        for r, it in enumerate(ranks):
            seen[r].append(ids_of(it.next_microbatch()))
    assert sorted(sum(seen[0] + seen[1], [])) == list(range(24))
    interleaved = sum((seen[0][s] + seen[1][s] for s in range(4)), [])
    assert interleaved == ranks[0].global_indices(0, 24)
    assert ranks[0].consumed == ranks[1].consumed == 24


def test_state_dict_round_trip_resumes_identically():
    data = FakeData(10)
    a = make(data, mb=3)
    for _ in range(5):
        a.next_microbatch()
    state = a.state_dict()
    assert state["consumed"] == 15 and state["epoch"] == 1
    expected = [a.next_microbatch() for _ in range(6)]
    b = make(data, mb=3)
    b.load_state_dict(state)
    for want in expected:
        got = b.next_microbatch()
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)
    with pytest.raises(DataError, match="num_samples"):
        make(FakeData(11)).load_state_dict(state)


def test_resume_on_another_world_size_continues_the_global_sequence():
    data = FakeData(13)
    reference = make(data, mb=1).global_indices(0, 60)
    two = [make(data, rank=r, world_size=2, mb=2) for r in range(2)]
    taken = []
    for _ in range(5):
        taken += sum((ids_of(it.next_microbatch()) for it in two), [])
    assert taken == reference[:20]
    one = make(data, world_size=1, mb=3)
    one.load_state_dict(two[0].state_dict())
    after = sum((ids_of(one.next_microbatch()) for _ in range(6)), [])
    assert after == reference[20:38]


def test_epochs_reshuffle_deterministically():
    data = FakeData(16)
    it = make(data, seed=1)
    e0, e1 = it.global_indices(0, 16), it.global_indices(16, 32)
    assert sorted(e0) == sorted(e1) == list(range(16)) and e0 != e1
    assert make(data, seed=1).global_indices(0, 32) == e0 + e1
    assert make(data, seed=2).global_indices(0, 16) != e0
    assert make(data, shuffle=False).global_indices(0, 32) == list(range(16)) * 2
    # A micro-batch straddling the epoch boundary takes the end of one epoch and the start of the next.
    it = make(data, seed=1, mb=5)
    got = sum((ids_of(it.next_microbatch()) for _ in range(4)), [])
    assert got == (e0 + e1)[:20]


def test_padding_and_shifted_labels():
    data = FakeData(8)  # lengths 2, 7, 12, 6, 11, 5, 10, 4
    batch = make(data, shuffle=False, mb=2).next_microbatch()  # samples 0 (2 tokens) and 1 (7 tokens)
    assert batch.input_ids.shape == (2, 8) and batch.input_ids.dtype == torch.long
    assert batch.input_ids[0, 2:].tolist() == [0] * 6
    ids1, mask1 = data[1]
    want = [int(ids1[t + 1]) if mask1[t + 1] else -100 for t in range(6)] + [-100, -100]
    assert batch.labels[1].tolist() == want
    assert batch.labels[0].tolist() == [int(data[0][0][1])] + [-100] * 7
    assert_shifted(batch)

    wide = make(data, shuffle=False, mb=3).next_microbatch()  # longest 12 -> 16
    assert wide.input_ids.shape == (3, 16)
    capped = make(data, shuffle=False, mb=3, max_seq_len=12).next_microbatch()  # 16 capped at max_seq_len
    assert capped.input_ids.shape == (3, 12)
    with pytest.raises(DataError, match="more than data.max_seq_len=10"):
        make(data, shuffle=False, mb=3, max_seq_len=10).next_microbatch()
