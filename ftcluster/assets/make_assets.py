"""Generate ftcluster's embedded default assets, deterministically.

Run with::

    python -m ftcluster.assets.make_assets            # generate, then self-check
    python -m ftcluster.assets.make_assets --check    # self-check the shipped files only

It (re)writes, next to this file:

* ``data/sample_chat.jsonl`` -- ~2,000 short synthetic chat conversations built from
  templated, learnable tasks (arithmetic, capitals, word reversal/echo, letter counting,
  unit conversions, greetings); some with a system message, some with two assistant turns.
* ``data/README.md``
* ``tiny-llama/`` -- a Hugging Face model directory that loads fully offline:
  a byte-level BPE tokenizer (1024 tokens incl. Llama-3 style special tokens and a
  Llama-3 style chat template) and a ~1M-parameter Llama model (float32, single
  ``model.safetensors``), pretrained by ``pretrain_tiny.py`` on a corpus of generic text and
  chat conversations of *other* kinds than the sample data (77 s on 16 CPU cores,
  much longer on 2), so it knows English and the chat format but not the sample tasks.

Everything is seeded; running the script twice on the same machine produces byte-identical
files (no timestamps are written anywhere; the pretraining's CPU kernels may round differently
on another CPU type).  Nothing is downloaded: the script forces ``HF_HUB_OFFLINE=1``.

Chat-template contract relied on by the trainer: rendering ``messages[:k]`` with
``add_generation_prompt=True`` yields a *token* prefix of rendering ``messages[:k+1]``
when message ``k`` is an assistant turn, the remainder being exactly the assistant
content followed by ``<|eot_id|>``.  The self-check verifies this on every conversation.
"""

from __future__ import annotations

import os

# Must be set before transformers / huggingface_hub are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import hashlib
import json
import random
import shutil
import sys
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DATA_DIR = ASSETS_DIR / "data"
DATA_FILE = DATA_DIR / "sample_chat.jsonl"
DATA_README = DATA_DIR / "README.md"
EVAL_FILE = DATA_DIR / "sample_chat_eval.jsonl"
"""Held-out conversations from the same generator (another seed), none identical to a training one:
the embedded default's eval set. Kept apart from sample_chat.jsonl so the training data (and the
losses recorded from it) stay as they are."""

MODEL_DIR = ASSETS_DIR / "tiny-llama"

DATA_SEED = 1234
MODEL_SEED = 0
NUM_CONVERSATIONS = 2000
NUM_EVAL_CONVERSATIONS = 100
EVAL_SEED = DATA_SEED + 1
VOCAB_SIZE = 1024

BOS = "<|begin_of_text|>"
EOS_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|pad|>"
# Order fixes the ids: 0..5.
SPECIAL_TOKENS = [BOS, EOS_TEXT, START_HEADER, END_HEADER, EOT, PAD]

# Llama-3 pre-tokenizer split pattern.  Unlike GPT-2's pattern, runs of newlines are a
# piece of their own whether or not text follows them, so "<|end_header_id|>\n\n" tokenizes
# the same at the end of a generation prompt as in front of the assistant's content.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama-3 style chat template.  <|begin_of_text|> once, then per message
# <|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>, and with
# add_generation_prompt a trailing <|start_header_id|>assistant<|end_header_id|>\n\n.
# The assistant content + <|eot_id|> is wrapped in {% generation %}...{% endgeneration %}:
# transformers 5.x supports return_assistant_tokens_mask with it, the tags do not change the
# rendered text (so the prefix property is unaffected), and the self-check verifies that the
# mask it returns equals the prefix-difference labels on every conversation.
CHAT_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|eot_id|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- message['content'] + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)
USES_GENERATION_TAGS = True

# --------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------

from ftcluster.assets.words import CAPITALS, CONVERSIONS, NAMES, WORDS  # noqa: E402  (the sample tasks' words)

SINGULAR = {
    "meters": "meter", "centimeters": "centimeter", "kilometers": "kilometer",
    "hours": "hour", "minutes": "minute", "seconds": "second", "kilograms": "kilogram",
    "grams": "gram", "days": "day", "weeks": "week", "liters": "liter", "milliliters": "milliliter",
}

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer in one short sentence.",
    "You are a patient math tutor.",
    "You are a friendly assistant who answers briefly.",
    "You are a precise assistant. Keep answers short.",
]

GREETINGS = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hi! How can I help you today?"),
    ("Good morning!", "Good morning! How can I help you today?"),
    ("Good evening.", "Good evening! How can I help you today?"),
    ("Thank you!", "You are welcome!"),
    ("Thanks for your help.", "You are welcome! I am glad I could help."),
    ("Goodbye!", "Goodbye! Have a nice day."),
    ("See you later.", "See you later! Have a nice day."),
    ("How are you?", "I am doing well, thank you. How can I help you today?"),
]


def _unit(name: str, n: int) -> str:
    return name if n != 1 else SINGULAR[name]


def _task_arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice(["plus", "minus", "times"])
    if op == "plus":
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        r = a + b
    elif op == "minus":
        a = rng.randint(0, 60)
        b = rng.randint(0, a)
        r = a - b
    else:
        a, b = rng.randint(1, 12), rng.randint(1, 12)
        r = a * b
    q = rng.choice([
        "What is {a} {op} {b}?",
        "Compute {a} {op} {b}.",
        "Please tell me what {a} {op} {b} is.",
        "How much is {a} {op} {b}?",
    ]).format(a=a, op=op, b=b)
    return q, f"{a} {op} {b} is {r}."


def _task_capital(rng: random.Random) -> tuple[str, str]:
    country, city = rng.choice(CAPITALS)
    q = rng.choice([
        "What is the capital of {c}?",
        "Name the capital city of {c}.",
        "Which city is the capital of {c}?",
    ]).format(c=country)
    return q, f"The capital of {country} is {city}."


def _task_reverse(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    q = rng.choice([
        'Reverse the word "{w}".',
        'Spell "{w}" backwards.',
        'What is "{w}" written backwards?',
    ]).format(w=w)
    return q, f'The word "{w}" reversed is "{w[::-1]}".'


def _task_echo(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(1, 3)
    phrase = " ".join(rng.choice(WORDS) for _ in range(n))
    q = rng.choice([
        "Repeat after me: {p}",
        "Please repeat exactly: {p}",
        "Say this back to me: {p}",
    ]).format(p=phrase)
    return q, phrase


def _task_count_letters(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    if rng.random() < 0.5:
        q = rng.choice([
            'How many letters are in the word "{w}"?',
            'Count the letters in "{w}".',
        ]).format(w=w)
        n = len(w)
        return q, f'The word "{w}" has {n} letter{"s" if n != 1 else ""}.'
    letter = rng.choice(sorted(set(w)))
    n = w.count(letter)
    q = f'How many times does the letter "{letter}" appear in "{w}"?'
    return q, f'The letter "{letter}" appears {n} time{"s" if n != 1 else ""} in "{w}".'


def _task_convert(rng: random.Random) -> tuple[str, str]:
    src, dst, factor = rng.choice(CONVERSIONS)
    n = rng.randint(1, 12)
    q = rng.choice([
        "How many {dst} are in {n} {src}?",
        "Convert {n} {src} to {dst}.",
    ]).format(dst=dst, n=n, src=_unit(src, n))
    return q, f"{n} {_unit(src, n)} is {n * factor} {dst}."


def _task_greeting(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.4:
        name = rng.choice(NAMES)
        q = rng.choice(["Hi, my name is {n}.", "Hello, I am {n}."]).format(n=name)
        return q, f"Nice to meet you, {name}! How can I help you today?"
    return rng.choice(GREETINGS)


TASKS = [
    (_task_arithmetic, 3),
    (_task_capital, 2),
    (_task_reverse, 1),
    (_task_echo, 1),
    (_task_count_letters, 2),
    (_task_convert, 2),
    (_task_greeting, 1),
]


def _sample_task(rng: random.Random) -> tuple[str, str]:
    fns = [f for f, _ in TASKS]
    weights = [w for _, w in TASKS]
    return rng.choices(fns, weights=weights, k=1)[0](rng)


def make_conversations(n: int = NUM_CONVERSATIONS, seed: int = DATA_SEED) -> list[dict]:
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.35:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        turns = 2 if rng.random() < 0.3 else 1
        for t in range(turns):
            q, a = _sample_task(rng)
            if t > 0 and rng.random() < 0.3 and not q.startswith(("Hi", "Hello", "Good", "Thank", "See", "How are")):
                q = "And one more: " + q
            messages.append({"role": "user", "content": q})
            messages.append({"role": "assistant", "content": a})
        convs.append({"messages": messages})
    return convs


def write_data(convs: list[dict]) -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    with open(DATA_FILE, "w", encoding="utf-8", newline="\n") as f:
        for c in convs:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    DATA_README.write_text(
        "# sample_chat.jsonl\n\n"
        f"{len(convs)} synthetic chat conversations (`{{\"messages\": [{{\"role\", \"content\"}}, ...]}}` per line) "
        "built from templated, easily learnable tasks: arithmetic, capital cities, word reversal/echo, "
        "letter counting, unit conversions and greetings; some with a system message, some with two assistant turns.\n"
        "`sample_chat_eval.jsonl`: 100 held-out conversations from the same generator with another seed, none "
        "identical to a training one (the embedded default's eval set).\n"
        "Generated deterministically by `python -m ftcluster.assets.make_assets` (do not edit by hand).\n",
        encoding="utf-8",
        newline="\n",
    )


def make_eval_conversations(train: list[dict]) -> list[dict]:
    seen = {json.dumps(c, sort_keys=True) for c in train}
    out: list[dict] = []
    extra = 0
    while len(out) < NUM_EVAL_CONVERSATIONS:
        batch = make_conversations(NUM_EVAL_CONVERSATIONS + extra, seed=EVAL_SEED)
        out = [c for c in batch if json.dumps(c, sort_keys=True) not in seen][:NUM_EVAL_CONVERSATIONS]
        extra += 50
    return out


def write_eval_data(convs: list[dict]) -> None:
    with open(EVAL_FILE, "w", encoding="utf-8", newline="\n") as f:
        for c in convs:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    os.chmod(EVAL_FILE, 0o644)


def load_conversations() -> list[dict]:
    with open(DATA_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def _training_texts(convs: list[dict]):
    # Exactly the pieces the tokenizer sees between special tokens once the chat template
    # is applied: the role name, and "\n\n" + content.
    for role in ("system", "user", "assistant"):
        yield role
    for c in convs:
        for m in c["messages"]:
            yield m["role"]
            yield "\n\n" + m["content"]


def build_tokenizer(convs: list[dict]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=False, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_training_texts(convs), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Plain-text encoding (add_special_tokens=True) prepends <|begin_of_text|>, like Llama-3.
    # apply_chat_template tokenizes with add_special_tokens=False, so chats get exactly one BOS
    # (from the template).
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    for s in SPECIAL_TOKENS:
        assert tok.token_to_id(s) is not None, s

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,  # chat end-of-turn, as in Llama-3-instruct
        pad_token=PAD,
        # The remaining control tokens, so they show up in all_special_ids / all_special_tokens.
        extra_special_tokens=[EOS_TEXT, START_HEADER, END_HEADER],
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    return hf_tok


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


def build_model(tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    n_tok = len(tokenizer)
    vocab = max(VOCAB_SIZE, ((n_tok + 63) // 64) * 64)
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    eos_text_id = tokenizer.convert_tokens_to_ids(EOS_TEXT)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(MODEL_SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[eot_id, eos_text_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


# --------------------------------------------------------------------------------------
# Generate / check
# --------------------------------------------------------------------------------------


def generate() -> None:
    convs = make_conversations()
    write_data(convs)
    write_eval_data(make_eval_conversations(convs))

    tokenizer = build_tokenizer(convs)
    model = build_model(tokenizer)
    from ftcluster.assets.pretrain_tiny import pretrain

    pretrain(model, tokenizer)
    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    MODEL_DIR.mkdir(parents=True)
    # save_jinja_files=False: keep the chat template inside tokenizer_config.json.
    tokenizer.save_pretrained(str(MODEL_DIR), save_jinja_files=False)
    model.save_pretrained(str(MODEL_DIR), safe_serialization=True)
    for p in [DATA_FILE, DATA_README, *MODEL_DIR.iterdir()]:
        os.chmod(p, 0o644)  # safetensors writes 0600; ship world-readable files
    print(f"wrote {DATA_FILE.relative_to(ASSETS_DIR.parent.parent)} ({len(convs)} conversations)")
    print(f"wrote {MODEL_DIR.relative_to(ASSETS_DIR.parent.parent)}/")


def _ids(tokenizer, messages, add_generation_prompt):
    return tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )


def check_prefix_property(tokenizer, messages) -> tuple[list[int], list[int]]:
    """Verify the prefix property for one conversation.

    Returns (input_ids, labels_mask) of the full conversation, where the mask marks the
    assistant tokens (content + <|eot_id|>) found by prefix differences.
    """
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    full = _ids(tokenizer, messages, False)
    mask = [0] * len(full)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _ids(tokenizer, messages[:k], True)
        upto = _ids(tokenizer, messages[: k + 1], False)
        if upto[: len(prompt)] != prompt:
            raise AssertionError(f"prefix property violated at turn {k}: {messages!r}")
        reply = upto[len(prompt):]
        if not reply or reply[-1] != eot_id:
            raise AssertionError(f"assistant reply does not end with <|eot_id|>: {messages!r}")
        if tokenizer.decode(reply[:-1]) != m["content"]:
            raise AssertionError(f"assistant reply does not round-trip: {messages!r}")
        if full[: len(upto)] != upto:
            raise AssertionError(f"rendering is not incremental at turn {k}: {messages!r}")
        for i in range(len(prompt), len(upto)):
            mask[i] = 1
    return full, mask


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    convs = load_conversations()
    tokenizer = AutoTokenizer.from_pretrained(str(MODEL_DIR), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), local_files_only=True, use_safetensors=True)
    model.eval()

    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        **{t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS},
    }
    assert special["bos"] == special[BOS] and special["eos"] == special[EOT] and special["pad"] == special[PAD]
    assert len(set(tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS)) == len(SPECIAL_TOKENS)
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert model.config.vocab_size >= len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert set(tokenizer.all_special_tokens) == set(SPECIAL_TOKENS)
    assert "{% generation %}" in CHAT_TEMPLATE or "{%- generation -%}" in CHAT_TEMPLATE

    lengths = []
    n_assistant = 0
    n_sys = n_multi = 0
    for c in convs:
        msgs = c["messages"]
        assert any(m["role"] == "assistant" for m in msgs)
        n_sys += msgs[0]["role"] == "system"
        n_multi += sum(m["role"] == "assistant" for m in msgs) > 1
        full, mask = check_prefix_property(tokenizer, msgs)
        n_assistant += sum(m["role"] == "assistant" for m in msgs)
        # string and token renderings agree, BOS exactly once at the start
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        assert tokenizer.encode(text, add_special_tokens=False) == full
        assert full[0] == special["bos"] and full.count(special["bos"]) == 1
        # {% generation %} mask == prefix-difference labels
        out = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert list(out["input_ids"]) == full
        assert list(out["assistant_masks"]) == mask, f"assistant mask mismatch: {msgs!r}"
        lengths.append(len(full))

    # Plain text gets BOS prepended by the post-processor.
    assert tokenizer("hello")["input_ids"][0] == special["bos"]

    # The pretrained model runs; its loss on the sample data is below ln(vocab), an untrained model's.
    batch = [check_prefix_property(tokenizer, c["messages"])[0] for c in convs[:8]]
    width = max(len(b) for b in batch)
    ids = torch.full((len(batch), width), special["pad"], dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, b in enumerate(batch):
        ids[i, : len(b)] = torch.tensor(b)
        att[i, : len(b)] = 1
    labels = ids.masked_fill(att == 0, -100)
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss.item()
    n_params = sum(p.numel() for p in model.parameters())

    print("self-check OK")
    print(f"  conversations:            {len(convs)} ({n_sys} with system message, {n_multi} multi-turn, "
          f"{n_assistant} assistant turns)")
    print(f"  prefix property:          verified on all {n_assistant} assistant turns (token ids)")
    print(f"  generation-tag mask:      equals prefix-difference labels on all {len(convs)} conversations")
    print(f"  rendered tokens:          max {max(lengths)}, mean {sum(lengths) / len(lengths):.1f}, "
          f"total {sum(lengths)}")
    print(f"  tokenizer vocab (len):    {len(tokenizer)}")
    print(f"  model vocab_size:         {model.config.vocab_size}")
    print(f"  model parameters:         {n_params:,}")
    print(f"  base loss (8 convs):      {loss:.3f} (untrained: ln V = {torch.log(torch.tensor(float(model.config.vocab_size))):.3f})")
    print("  special token ids:        " + ", ".join(f"{k}={v}" for k, v in special.items()))
    files = [DATA_FILE, EVAL_FILE, DATA_README] + sorted(p for p in MODEL_DIR.iterdir() if p.is_file())
    for p in files:
        print(f"  {_sha256(p)[:16]}  {p.stat().st_size:>9,d}  {p.relative_to(ASSETS_DIR)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only run the self-check on the shipped files")
    parser.add_argument("--no-check", action="store_true", help="generate without running the self-check")
    args = parser.parse_args(argv)
    if not args.check:
        generate()
    if not args.no_check:
        check()
    return 0


if __name__ == "__main__":
    sys.exit(main())
