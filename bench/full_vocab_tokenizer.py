"""A tokenizer whose vocabulary covers Llama-3's 128,256 ids, for peers that size the embedding to
the tokenizer they load (Unsloth does; with the embedded 1,024-token one its timed loop's random ids
overflowed the embedding). Word-level, made here: nothing is downloaded. The device command makes
it in place (it is too big to carry with the Unsloth wheels): python3 bench/full_vocab_tokenizer.py DIR"""
import sys

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VOCAB = 128256
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
vocab = {f"t{i}": i for i in range(VOCAB - len(SPECIALS))}
vocab.update({s: VOCAB - len(SPECIALS) + j for j, s in enumerate(SPECIALS)})
tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                              pad_token=SPECIALS[2], unk_token="t0")
assert len(tok) == VOCAB
tok.save_pretrained(sys.argv[1])
