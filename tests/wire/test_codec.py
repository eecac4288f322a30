"""The binary score payload: an exact round trip, and corruption refused."""
import pytest
import torch


def test_score_codec_round_trip_and_corruption():
    from megatron_opd.wire import score_codec

    torch.manual_seed(0)
    records = []
    for n in (5, 0, 7):
        lp = torch.log_softmax(torch.randn(n, 151936) * 3, -1)
        values, ids = torch.topk(lp, 20, -1)
        records.append({"logprobs": lp[:, 0].clone(), "top_logprobs": values, "top_ids": ids, "cached_tokens": 3, "computed_tokens": n})
    exact = score_codec.decode(score_codec.encode(records, 20, 151936, "float32"))
    half = score_codec.decode(score_codec.encode(records, 20, 151936, "float16"))
    for ref, a, b in zip(records, exact, half):
        assert torch.equal(a["logprobs"], ref["logprobs"]) and torch.equal(a["top_ids"], ref["top_ids"])
        assert torch.equal(a["top_logprobs"], ref["top_logprobs"])  # float32: bit-exact
        assert torch.equal(b["logprobs"], ref["logprobs"]) and torch.equal(b["top_ids"], ref["top_ids"])
        assert torch.equal(b["top_logprobs"], ref["top_logprobs"].neg().half().float().neg())  # float16 rounding only
        assert a["cached_tokens"] == 3 and a["computed_tokens"] == len(ref["logprobs"])
    payload = score_codec.encode(records, 20, 151936)
    with pytest.raises(ValueError, match="bytes of top-k"):
        score_codec.decode(payload[:-3])
    assert score_codec.negotiated_top_dtype("application/json") is None
    assert score_codec.negotiated_top_dtype(score_codec.accept_header("float32")) == "float32"
    with pytest.raises(ValueError, match="top-dtype"):
        score_codec.negotiated_top_dtype(f"{score_codec.MEDIA_TYPE};top-dtype=int8")

