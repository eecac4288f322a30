"""A character-level tokenizer made with ``tokenizers`` and saved as standard HF files.

No pretrained tokenizer can be downloaded here, and the tiny world's domains are written in a small
alphabet, so one token per character keeps models tiny and every answer's tokens countable.
Saved with a ChatML template so every component loads it with ``AutoTokenizer``.
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_ALPHABET = string.printable[:95] + "\n"  # printable ASCII incl. space, plus newline


def build_char_tokenizer(out_dir: str | Path, alphabet: str = DEFAULT_ALPHABET):
    """Write tokenizer.json + tokenizer_config.json (with chat template) to ``out_dir``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token=None,
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_bpe_tokenizer(out_dir: str | Path, texts: list[str], vocab_size: int = 256,
                        alphabet: str = DEFAULT_ALPHABET):
    """A tokenizer *unlike* the character-level one, for a teacher with its own vocabulary: BPE
    merges learned on ``texts`` (words, ``answer:``, ``add``, ``+``/``=`` runs ...), whitespace and digits kept as their
    own tokens, the same ChatML template and special-token names (a different id for each). Written
    like :func:`build_char_tokenizer`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    # whitespace and every digit their own tokens (as Qwen's and Llama 3's tokenizers split digits): a
    # teacher that reads numbers in merged chunks could not learn column addition at this size
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"),
                                                  pre_tokenizers.Digits(individual_digits=True)])
    core.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS[::-1],  # ids differ from the char one
                                  initial_alphabet=sorted(set(alphabet)), show_progress=False)
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", eos_token="<|im_end|>",
                                        bos_token=None, unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
