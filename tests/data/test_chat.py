"""Chat data: assistant-only masks, bad/overlong rows counted, deterministic batching."""
import json

import pytest
from transformers import AutoTokenizer

from megatron_opd.data.chat import (
    DataError, epoch_order, global_batch_indices, load_rows, tokenize_conversation, tokenize_dataset,
)
from megatron_opd.data.toy import chat_rows


@pytest.fixture(scope="module")
def tokenizer(tiny_world):
    return AutoTokenizer.from_pretrained(tiny_world["student"])


def test_loss_mask_covers_exactly_the_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "be terse"},
        {"role": "user", "content": "count from 1 to 3"},
        {"role": "assistant", "content": "1, 2, 3"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "1, 2"},
    ]
    ex = tokenize_conversation(tokenizer, messages)
    assert ex.input_ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    trained = tokenizer.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
    assert trained == "1, 2, 3<|im_end|>\n1, 2<|im_end|>\n"


def test_bad_rows_are_counted_and_skipped(tokenizer, tmp_path):
    good = chat_rows("count", 3, seed=0)
    rows = good + [
        {"domain": "count", "text": "no messages here"},
        {"domain": "count", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
        {"domain": "count", "messages": [{"role": "user", "content": "hi"}]},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, report = tokenize_dataset(load_rows(str(path)), tokenizer, max_length=128)
    assert len(examples) == report.kept == 3 and report.rows == 6
    assert report.skipped == {"missing messages": 1, "bad messages": 2}
    assert any("row 4: empty assistant turn" in e for e in report.first_errors)
    assert "3/6 rows kept" in report.summary()


def test_overlong_rows_are_dropped_or_truncated_and_counted(tokenizer):
    rows = [{"messages": [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y" * 50}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    dropped, report = tokenize_dataset(rows, tokenizer, max_length=40, overlong="drop")
    assert len(dropped) == 1 and report.skipped["longer than max_length"] == 1
    kept, report = tokenize_dataset(rows, tokenizer, max_length=80, overlong="truncate")
    assert len(kept) == 2 and report.truncated == 1 and len(kept[0].input_ids) == 80
    assert sum(kept[0].loss_mask) > 0


def test_unreadable_or_missing_files_raise_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [}\nnot json\n')
    with pytest.raises(DataError, match="bad.jsonl: could not be read"):
        load_rows(str(bad))
    with pytest.raises(DataError, match="not found"):
        load_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="unsupported data file type"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_rows(str(tmp_path / "x.csv"))
    for name, text in [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", ""), ("empty.parquet", "")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=f"{name}: the file is empty \\(no rows\\)$"):  # was: a blank reason
            load_rows(str(tmp_path / name))


def test_batches_are_deterministic_and_cover_each_epoch():
    assert epoch_order(10, 3, 0) == epoch_order(10, 3, 0) != epoch_order(10, 3, 1)
    stream = [i for step in range(5) for i in global_batch_indices(10, 3, step, 4)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert global_batch_indices(10, 3, 2, 4) == stream[8:12]  # epoch boundary inside a batch
