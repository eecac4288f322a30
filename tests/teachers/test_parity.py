"""The tokenizer parity check between student and teacher."""
import pytest
from helpers import REPO

STUDENT = REPO / "assets" / "tiny" / "student_init"


def test_parity_check_refuses_a_different_tokenizer(tmp_path):
    import shutil

    from megatron_opd.teachers.parity import TokenizerMismatch, check_parity

    same = tmp_path / "same"
    shutil.copytree(REPO / "assets" / "tiny" / "tokenizer", same)
    other = tmp_path / "other"
    shutil.copytree(same, other)
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert check_parity(STUDENT, {"math": same}) == {}
    with pytest.raises(TokenizerMismatch, match="(?s)teacher 'fmt'.*chat template differs"):
        check_parity(STUDENT, {"math": same, "fmt": other})
    assert "fmt" in check_parity(STUDENT, {"fmt": other}, allow_mismatch=True)
    with pytest.raises(TokenizerMismatch, match="no local tokenizer"):
        check_parity(STUDENT, {"remote": None})

