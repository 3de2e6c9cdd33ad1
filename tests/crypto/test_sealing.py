"""Sealed payloads (HPKE): round trips, tampering, wrong recipient/context, framing checks."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.errors import DecryptionError, KeyMaterialError
from crypto.sealing import (
    SealKeyPair,
    SealPublicKey,
    job_info,
    open_sealed,
    seal,
)

HEADER_LEN = len(b"SOMSEAL") + 2
SITE = SealKeyPair.generate()
INFO = job_info("job-42", "input")


def _flip(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index] ^= 0x80
    return bytes(b)


@settings(max_examples=50, deadline=None)
@given(plaintext=st.binary(max_size=2048), aad=st.binary(max_size=64))
def test_round_trip(plaintext, aad):
    blob = seal(SITE.public_key(), plaintext, info=INFO, aad=aad)
    assert open_sealed(SITE, blob, info=INFO, aad=aad) == plaintext
    assert len(blob) == HEADER_LEN + 32 + len(plaintext) + 16


def test_job_flow_consumer_to_site_and_back():
    consumer_reply = SealKeyPair.generate()
    request = json.dumps({"inputs": "x,y\n1,2\n", "reply_to": consumer_reply.public_text()}).encode()
    sealed_in = seal(SITE.public_text(), request, info=job_info("job-7", "input"))
    # the site opens it and seals the result to the reply key it found inside
    opened = json.loads(open_sealed(SITE, sealed_in, info=job_info("job-7", "input")))
    sealed_out = seal(opened["reply_to"], b"result: 3", info=job_info("job-7", "result"))
    assert open_sealed(consumer_reply, sealed_out, info=job_info("job-7", "result")) == b"result: 3"
    # a result cannot be replayed as an input, nor onto another job
    with pytest.raises(DecryptionError):
        open_sealed(consumer_reply, sealed_out, info=job_info("job-7", "input"))
    with pytest.raises(DecryptionError):
        open_sealed(consumer_reply, sealed_out, info=job_info("job-8", "result"))


def test_sealing_is_randomised():
    a = seal(SITE.public_key(), b"same", info=INFO)
    b = seal(SITE.public_key(), b"same", info=INFO)
    assert a != b


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_bit_flip_after_header_fails_opaquely(data):
    blob = seal(SITE.public_key(), b"private inputs", info=INFO, aad=b"ctx")
    i = data.draw(st.integers(min_value=HEADER_LEN, max_value=len(blob) - 1))
    with pytest.raises(DecryptionError):
        open_sealed(SITE, _flip(blob, i), info=INFO, aad=b"ctx")


def test_truncation_and_trailing_garbage():
    blob = seal(SITE.public_key(), b"private inputs", info=INFO)
    for bad in (blob[:-1], blob + b"\x00", blob[: HEADER_LEN + 32 + 16]):
        with pytest.raises(DecryptionError):
            open_sealed(SITE, bad, info=INFO)


def test_wrong_recipient_info_or_aad():
    blob = seal(SITE.public_key(), b"private inputs", info=INFO, aad=b"contract-1")
    with pytest.raises(DecryptionError):
        open_sealed(SealKeyPair.generate(), blob, info=INFO, aad=b"contract-1")
    with pytest.raises(DecryptionError):
        open_sealed(SITE, blob, info=job_info("job-43", "input"), aad=b"contract-1")
    with pytest.raises(DecryptionError):
        open_sealed(SITE, blob, info=INFO, aad=b"contract-2")
    with pytest.raises(DecryptionError):
        open_sealed(SITE, blob, info=INFO)


def test_info_and_aad_are_not_confused():
    # moving bytes between info and aad must not open: they are length-delimited
    blob = seal(SITE.public_key(), b"p", info=b"ab", aad=b"c")
    with pytest.raises(DecryptionError):
        open_sealed(SITE, blob, info=b"a", aad=b"bc")


def test_oversized_and_malformed_framing_are_value_errors():
    blob = seal(SITE.public_key(), b"x" * 100, info=INFO)
    with pytest.raises(ValueError, match="too large"):
        open_sealed(SITE, blob, info=INFO, max_size=len(blob) - 1)
    assert open_sealed(SITE, blob, info=INFO, max_size=len(blob)) == b"x" * 100
    with pytest.raises(ValueError, match="too short"):
        open_sealed(SITE, blob[:20], info=INFO)
    with pytest.raises(ValueError, match="not a sealed payload"):
        open_sealed(SITE, b"XXXXXXX" + blob[7:], info=INFO)
    with pytest.raises(ValueError, match="unsupported sealed payload"):
        open_sealed(SITE, blob[:7] + b"\x02" + blob[8:], info=INFO)
    with pytest.raises(ValueError, match="unsupported sealed payload"):
        open_sealed(SITE, blob[:8] + b"\x09" + blob[9:], info=INFO)


def test_bad_arguments():
    with pytest.raises(ValueError, match="info"):
        seal(SITE.public_key(), b"x", info=b"")
    with pytest.raises(TypeError):
        seal(SITE.public_key(), "text", info=INFO)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        open_sealed(SITE, bytearray(b"x" * 100), info=INFO)  # type: ignore[arg-type]
    with pytest.raises(KeyMaterialError):
        seal("ed25519:AAAA", b"x", info=INFO)
    with pytest.raises(KeyMaterialError):
        SealPublicKey.from_text("x25519:AAAA")
    with pytest.raises(KeyMaterialError):
        SealPublicKey.from_text("x25519:!!!")
    with pytest.raises(ValueError):
        job_info("j", "sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        job_info("", "input")


def test_public_text_round_trip_and_private_bytes():
    kp = SealKeyPair.generate()
    text = kp.public_text()
    assert text.startswith("x25519:")
    assert SealPublicKey.from_text(text) == kp.public_key()
    raw = kp.unsafe_private_bytes()
    assert len(raw) == 32
    restored = SealKeyPair.from_private_bytes(raw)
    blob = seal(text, b"hello", info=INFO)
    assert open_sealed(restored, blob, info=INFO) == b"hello"
    assert raw.hex() not in repr(kp) and repr(raw) not in repr(kp)
    import base64

    assert base64.b64encode(raw).decode() not in repr(kp)
