"""Pretrain the embedded tiny Llama so that it speaks English and the chat format a little.

This is an *asset builder*, run once by ``python -m ftcluster.assets.make_assets`` (which calls
:func:`pretrain`), not part of ftcluster's training path: a plain single-process torch loop is
the right tool here (one CPU, a 1M-parameter model, a few minutes), and ftcluster's own trainer
is what the result is then fine-tuned with.

The corpus is made here, seeded, and never shipped:

* generic text: short English sentences and tiny stories from templates (things, colours,
  animals, places, counting sentences with digits);
* chat-formatted conversations, rendered with the tiny model's own chat template, of *other*
  kinds than the sample chat data: colours of things, animal sounds, opposites, the next number
  or weekday, even/odd, the larger of two numbers, plurals, spelling a word letter by letter,
  short facts.

None of the sample data's tasks (arithmetic, capitals, reversal, echo, letter counting, unit
conversion, greetings) appear, so the base model knows the format, English and digits but not
the answers: fine-tuning on ``data/sample_chat.jsonl`` then has something real to learn, and the
held-out loss on ``data/sample_chat_eval.jsonl`` measures it (README, "The embedded model").

Deterministic on a given machine and torch version (seeded data, seeded init, fixed batch
order; CPU kernels may differ across CPU types, so bytes may differ across machines).
"""
from __future__ import annotations

import math
import random
import time
from typing import Any, Callable

from ftcluster.assets.words import CAPITALS, CONVERSIONS, NAMES, WORDS

PRETRAIN_SEED = 7
NUM_TEXTS = 12000
NUM_CHATS = 24000
SEQ_LEN = 256
BATCH_SIZE = 32
STEPS = 500
LR = 3e-3
WARMUP = 30
LABEL_SMOOTHING = 0.1

THINGS = [  # (thing, colour)
    ("grass", "green"), ("the sky", "blue"), ("snow", "white"), ("coal", "black"), ("a banana", "yellow"),
    ("a tomato", "red"), ("an orange", "orange"), ("a plum", "purple"), ("milk", "white"), ("a leaf", "green"),
    ("the sea", "blue"), ("a carrot", "orange"), ("chocolate", "brown"), ("a lime", "green"), ("blood", "red"),
    ("the sun", "yellow"), ("a crow", "black"), ("sand", "yellow"), ("a cherry", "red"), ("ash", "grey"),
]
ANIMALS = [
    ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"), ("owl", "hoot"), ("lion", "roar"), ("frog", "croak"),
    ("pig", "oink"), ("bee", "buzz"), ("snake", "hiss"), ("goat", "bleat"), ("wolf", "howl"), ("crow", "caw"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"), ("light", "dark"),
    ("old", "young"), ("open", "closed"), ("full", "empty"), ("early", "late"), ("hard", "soft"), ("high", "low"),
    ("wet", "dry"), ("loud", "quiet"), ("rich", "poor"), ("left", "right"), ("near", "far"), ("long", "short"),
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NOUNS = [
    "boy", "girl", "man", "woman", "child", "teacher", "farmer", "doctor", "friend", "king", "queen", "baker",
    "fox", "bear", "rabbit", "kitten", "puppy", "pony", "goose", "hen", "box", "ball", "hat", "coat", "shoe",
    "cup", "spoon", "bell", "kite", "boat", "car", "bus", "bike", "hill", "lake", "field", "street", "village",
]
PLURALS = {"box": "boxes", "child": "children", "man": "men", "woman": "women", "goose": "geese", "bus": "buses",
           "puppy": "puppies", "pony": "ponies", "fox": "foxes"}
ADJECTIVES = ["little", "old", "happy", "tired", "clever", "quiet", "brave", "kind", "tall", "small", "young",
              "busy", "hungry", "sleepy", "red", "blue", "green", "warm", "cold", "new"]
VERBS = ["walked to", "looked at", "ran past", "sat near", "found", "liked", "carried", "painted", "cleaned",
         "visited", "watched", "followed", "jumped over", "waited by", "sang to", "talked to"]
PLACES = ["the park", "the market", "the school", "the garden", "the river", "the forest", "the beach",
          "the station", "the library", "the kitchen", "the farm", "the town"]
TIMES = ["In the morning", "At noon", "In the evening", "At night", "On Sunday", "Every day", "Yesterday",
         "Last week", "One day", "After lunch"]
FACTS = [
    "Bees make honey.", "Fish live in water.", "Birds can fly.", "Cats like to sleep.", "Trees grow slowly.",
    "Rain falls from clouds.", "The moon goes around the earth.", "Ice is frozen water.", "Owls hunt at night.",
    "Frogs can jump far.", "Wolves live in packs.", "Cows eat grass.", "Plants need light.", "Sheep have wool.",
]
SYSTEM = ["You are a helpful assistant.", "You are a kind teacher.", "You answer in one sentence.",
          "You are a friendly helper."]


def _plural(n: str) -> str:
    return PLURALS.get(n, n + "s")


def _domain_sentence(rng: random.Random) -> str:
    """Sentences that use the sample data's words (names, cities, countries, units, quoted words,
    digits) in unrelated statements: the base model has seen the vocabulary, not the tasks."""
    name, w = rng.choice(NAMES), rng.choice(WORDS)
    country, city = rng.choice(CAPITALS)[0], rng.choice(CAPITALS)[1]  # two draws: no capital pairs
    unit, k = rng.choice(CONVERSIONS)[rng.randint(0, 1)], rng.randint(2, 99)
    return rng.choice([
        f"{name} lives in {city}.",
        f"{name} went to {country} last year.",
        f'The word "{w}" is on the first page of the book.',
        f'{name} wrote "{w}" on the board.',
        f"The trip took {k} {unit}.",
        f"{name} has {k} {w}s and {rng.randint(2, 99)} books.",
        f"The train from {city} is {k} minutes late.",
        f"{name} likes the {w} in the garden.",
        f"There were {k} people in {city} that day.",
    ])


def _sentence(rng: random.Random) -> str:
    if rng.random() < 0.4:
        return _domain_sentence(rng)
    a, n, v, p = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS), rng.choice(PLACES)
    k = rng.randint(2, 99)
    return rng.choice([
        f"The {a} {n} {v} {p}.",
        f"{rng.choice(TIMES)}, the {n} {v} the {rng.choice(NOUNS)}.",
        f"There are {k} {_plural(n)} in {p}.",
        f"A {a} {n} lives near {p}.",
        f"{rng.choice(FACTS)}",
        f"The {n} has {k} {_plural(rng.choice(NOUNS))}.",
        f"{rng.choice(TIMES)}, it was {rng.choice(OPPOSITES)[rng.randint(0, 1)]} in {p}.",
    ])


def make_text(rng: random.Random) -> str:
    """A tiny story of 2 to 6 template sentences."""
    return " ".join(_sentence(rng) for _ in range(rng.randint(2, 6)))


def _chat_colour(rng: random.Random) -> tuple[str, str]:
    t, c = rng.choice(THINGS)
    q = rng.choice(["What color is {t}?", "Tell me the color of {t}.", "Which color does {t} have?"]).format(t=t)
    return q, rng.choice([f"{t[0].upper() + t[1:]} is usually {c}.", f"It is {c}.", f"The color of {t} is {c}."])


def _chat_sound(rng: random.Random) -> tuple[str, str]:
    a, s = rng.choice(ANIMALS)
    q = rng.choice(["What sound does a {a} make?", "How does a {a} sound?"]).format(a=a)
    return q, rng.choice([f"A {a} says {s}.", f"It says {s}.", f"The {a} makes the sound {s}."])


def _chat_opposite(rng: random.Random) -> tuple[str, str]:
    w, o = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        w, o = o, w
    q = rng.choice(['What is the opposite of "{w}"?', 'Give me the opposite of "{w}".']).format(w=w)
    return q, f'The opposite of "{w}" is "{o}".'


def _chat_next(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        i = rng.randrange(7)
        return f"What day comes after {DAYS[i]}?", f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}."
    n = rng.randint(0, 150)
    q = rng.choice(["What number comes after {n}?", "Which number follows {n}?"]).format(n=n)
    return q, rng.choice([f"After {n} comes {n + 1}.", f"The next number is {n + 1}.", f"{n + 1} follows {n}."])


def _chat_parity(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 200)
    return rng.choice(["Is {n} even or odd?", "Is the number {n} odd or even?"]).format(n=n), \
        f"{n} is {'even' if n % 2 == 0 else 'odd'}."


def _chat_bigger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(0, 200), 2)
    return rng.choice(["Which is bigger, {a} or {b}?", "Which number is larger: {a} or {b}?"]).format(a=a, b=b), \
        rng.choice([f"{max(a, b)} is bigger than {min(a, b)}.", f"The bigger one is {max(a, b)}."])


def _chat_plural(rng: random.Random) -> tuple[str, str]:
    n = rng.choice(NOUNS)
    return rng.choice(['What is the plural of "{n}"?', 'Give the plural of "{n}".']).format(n=n), \
        f'The plural of "{n}" is "{_plural(n)}".'


def _chat_spell(rng: random.Random) -> tuple[str, str]:
    n = rng.choice(NOUNS + [a for a, _ in ANIMALS])
    return rng.choice(['Spell the word "{n}".', 'How do you spell "{n}"?']).format(n=n), \
        f'"{n}" is spelled {"-".join(n)}.'


def _chat_fact(rng: random.Random) -> tuple[str, str]:
    return rng.choice(["Tell me a fact.", "Say something true.", "Tell me something about nature."]), rng.choice(FACTS)


def _chat_story(rng: random.Random) -> tuple[str, str]:
    return rng.choice(["Tell me a short story.", "Write two sentences about a {n}."]).format(n=rng.choice(NOUNS)), \
        make_text(rng)


CHATS: list[Callable[[random.Random], tuple[str, str]]] = [
    _chat_colour, _chat_sound, _chat_opposite, _chat_next, _chat_parity, _chat_bigger, _chat_plural, _chat_spell,
    _chat_fact, _chat_story,
]


def make_chat(rng: random.Random) -> list[dict]:
    messages = [{"role": "system", "content": rng.choice(SYSTEM)}] if rng.random() < 0.3 else []
    for _ in range(2 if rng.random() < 0.3 else 1):
        q, a = rng.choice(CHATS)(rng)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages


def make_corpus(tokenizer: Any, *, seed: int = PRETRAIN_SEED) -> list[int]:
    """All documents, tokenised and concatenated in a seeded order (packed pretraining)."""
    rng = random.Random(seed)
    eos_text = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    docs: list[list[int]] = []
    for _ in range(NUM_TEXTS):
        docs.append(tokenizer(make_text(rng))["input_ids"] + [eos_text])  # BOS text EOS, as Llama-3 pretraining
    for _ in range(NUM_CHATS):
        docs.append(list(tokenizer.apply_chat_template(make_chat(rng), tokenize=True, return_dict=False)))
    rng.shuffle(docs)
    return [t for d in docs for t in d]


def _lr(step: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, STEPS - WARMUP))))


def pretrain(model: Any, tokenizer: Any, *, steps: int = STEPS, device: str = "cpu",
             log: Callable[[str], None] = print) -> list[float]:
    """Train ``model`` in place on the packed corpus (on ``device``; the model comes back on the CPU);
    returns the per-step losses."""
    import torch

    model.to(device)

    ids = torch.tensor(make_corpus(tokenizer), dtype=torch.long)
    n_seq = ids.numel() // SEQ_LEN
    seqs = ids[: n_seq * SEQ_LEN].view(n_seq, SEQ_LEN)
    g = torch.Generator().manual_seed(PRETRAIN_SEED)
    order = torch.cat([torch.randperm(n_seq, generator=g) for _ in range(steps * BATCH_SIZE // n_seq + 1)])
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    log(f"pretraining on {ids.numel():,} tokens ({n_seq} sequences of {SEQ_LEN}), {steps} steps of {BATCH_SIZE}")
    model.train()
    losses, t0 = [], time.monotonic()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step)
        batch = seqs[order[step * BATCH_SIZE:(step + 1) * BATCH_SIZE]].to(device)
        logits = model(input_ids=batch).logits[:, :-1]
        # Label smoothing keeps the model from being certain on a corpus this regular: on the
        # sample chat data (other tasks, same format) it should be unsure, not confidently wrong.
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                 label_smoothing=LABEL_SMOOTHING)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # an asset builder may sync every step
        if step % 50 == 0 or step == steps - 1:
            log(f"  step {step + 1:4d}/{steps}  loss {losses[-1]:.3f}  ({time.monotonic() - t0:.0f} s)")
    model.to("cpu").eval()
    return losses
