"""A compact binary payload for teacher scores, negotiated over HTTP.

SGLang answers scoring requests with JSON: every scored position is ``[logprob, token_id, null]``
and every top-k entry another such triple, ~30 bytes each. A client that sends
``Accept: application/x-opd-scores`` to the embedded server gets the same numbers as raw arrays
instead; a real SGLang server ignores the header and answers JSON, so the client reads whichever
content type comes back.

Layout (little-endian): ``uint32`` header length, a JSON header, the sampled-token log-probs of
all records concatenated (float32: the advantage needs them exact), then the top-k entries as one
bit stream. Each entry is ``id | magnitude << id_bits``: the id in ``ceil(log2(vocab))`` bits, and
the log-prob's magnitude as float16 (or float32 on request) without its sign bit, since a
log-prob is never positive — 33 bits per entry for a 152k vocabulary instead of ~30 JSON bytes.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import torch

MEDIA_TYPE = "application/x-opd-scores"
_FLOATS = {"float16": (np.float16, np.uint16, 15), "float32": (np.float32, np.uint32, 31)}  # magnitude bits


def accept_header(top_dtype: str = "float16") -> str:
    if top_dtype not in _FLOATS:
        raise ValueError(f"top_dtype must be one of {sorted(_FLOATS)}, got {top_dtype!r}")
    return f"{MEDIA_TYPE};top-dtype={top_dtype}, application/json;q=0.5"


def negotiated_top_dtype(accept: str | None) -> str | None:
    """The top-k float type asked for by an ``Accept`` header, or None when binary was not asked."""
    for part in (accept or "").split(","):
        media, *params = [p.strip() for p in part.split(";")]
        if media == MEDIA_TYPE:
            options = dict(p.split("=", 1) for p in params if "=" in p)
            dtype = options.get("top-dtype", "float16")
            if dtype not in _FLOATS:
                raise ValueError(f"Accept: {MEDIA_TYPE}: top-dtype must be one of {sorted(_FLOATS)}, got {dtype!r}")
            return dtype
    return None


def _id_bits(vocab_size: int) -> int:
    return max(1, (vocab_size - 1).bit_length())


def encode(records: list[dict[str, Any]], top_k: int, vocab_size: int, top_dtype: str = "float16") -> bytes:
    """Pack score records (``logprobs`` [T], optional ``top_logprobs``/``top_ids`` [T, k])."""
    lengths = [int(r["logprobs"].numel()) for r in records]
    header = {"lengths": lengths, "top_k": top_k, "top_dtype": top_dtype, "id_bits": _id_bits(vocab_size),
              "cached_tokens": [int(r.get("cached_tokens", 0)) for r in records],
              "computed_tokens": [int(r.get("computed_tokens", 0)) for r in records]}
    head = json.dumps(header, separators=(",", ":")).encode()
    logprobs = torch.cat([r["logprobs"].float().reshape(-1) for r in records]).numpy().astype("<f4")
    parts = [struct.pack("<I", len(head)), head, logprobs.tobytes()]
    if top_k and sum(lengths):
        float_type, bits_type, mag_bits = _FLOATS[top_dtype]
        values = torch.cat([r["top_logprobs"].reshape(-1) for r in records]).clamp_max(0).neg().numpy()
        ids = torch.cat([r["top_ids"].reshape(-1) for r in records]).numpy().astype(np.uint64)
        if ids.size and int(ids.max()) >= 1 << header["id_bits"]:
            raise ValueError(f"top-k id {int(ids.max())} does not fit a vocabulary of {vocab_size}")
        magnitude = values.astype(float_type).view(bits_type).astype(np.uint64) & ((1 << mag_bits) - 1)
        parts.append(_pack_bits(ids | (magnitude << np.uint64(header["id_bits"])), header["id_bits"] + mag_bits))
    return b"".join(parts)


def decode(payload: bytes) -> list[dict[str, Any]]:
    """The inverse of :func:`encode`: records with float32 ``logprobs`` and int64 ``top_ids``."""
    (head_len,) = struct.unpack_from("<I", payload)
    header = json.loads(payload[4:4 + head_len])
    lengths, k = header["lengths"], header["top_k"]
    total, offset = sum(lengths), 4 + head_len
    if offset + 4 * total > len(payload):
        raise ValueError("score payload is truncated")
    logprobs = torch.from_numpy(np.frombuffer(payload, dtype="<f4", count=total, offset=offset).copy())
    offset += 4 * total
    tops = ids = None
    if k and total:
        float_type, bits_type, mag_bits = _FLOATS[header["top_dtype"]]
        id_bits = header["id_bits"]
        width = id_bits + mag_bits
        nbytes = (total * k * width + 7) // 8
        if offset + nbytes != len(payload):
            raise ValueError(f"score payload: {len(payload) - offset} bytes of top-k, expected {nbytes} (corrupt or wrong version)")
        entries = _unpack_bits(payload[offset:], total * k, width)
        ids = torch.from_numpy((entries & np.uint64((1 << id_bits) - 1)).astype(np.int64)).view(total, k)
        magnitude = (entries >> np.uint64(id_bits)).astype(bits_type).view(float_type)
        tops = torch.from_numpy(-magnitude.astype(np.float32)).view(total, k)
    elif offset != len(payload):
        raise ValueError(f"score payload: {len(payload) - offset} trailing bytes (corrupt or wrong version)")
    records, at = [], 0
    for i, n in enumerate(lengths):
        record = {"logprobs": logprobs[at:at + n], "cached_tokens": header["cached_tokens"][i],
                  "computed_tokens": header["computed_tokens"][i]}
        if k:
            record["top_logprobs"] = tops[at:at + n] if tops is not None else torch.zeros(0, k)
            record["top_ids"] = ids[at:at + n] if ids is not None else torch.zeros(0, k, dtype=torch.long)
        records.append(record)
        at += n
    return records


def _pack_bits(values: np.ndarray, width: int) -> bytes:
    """``width`` (<= 64) low bits of every uint64 as one little-endian bit stream (entry i at bits
    ``i*width ..``), padded to a whole byte. 64 entries fill exactly ``width`` 64-bit words, so the
    stream is built a column of 64-entry groups at a time: 64 vectorised steps, whatever the count."""
    count = len(values)
    groups = -(-count // 64)
    padded = np.zeros(groups * 64, dtype=np.uint64)
    padded[:count] = values
    entries = padded.reshape(groups, 64)
    words = np.zeros((groups, width), dtype=np.uint64)
    for j in range(64):
        word, shift = divmod(j * width, 64)
        words[:, word] |= entries[:, j] << np.uint64(shift)
        if shift + width > 64:  # the entry runs into the next word
            words[:, word + 1] |= entries[:, j] >> np.uint64(64 - shift)
    return words.astype("<u8").tobytes()[: (count * width + 7) // 8]


def _unpack_bits(buffer: bytes, count: int, width: int) -> np.ndarray:
    groups = -(-count // 64)
    raw = np.zeros(groups * width * 8, dtype=np.uint8)
    raw[: len(buffer)] = np.frombuffer(buffer, dtype=np.uint8)
    words = raw.view("<u8").reshape(groups, width)
    mask = np.uint64((1 << width) - 1)
    out = np.empty((groups, 64), dtype=np.uint64)
    for j in range(64):
        word, shift = divmod(j * width, 64)
        value = words[:, word] >> np.uint64(shift)
        if shift + width > 64:
            value |= words[:, word + 1] << np.uint64(64 - shift)
        out[:, j] = value & mask
    return out.reshape(-1)[:count]
