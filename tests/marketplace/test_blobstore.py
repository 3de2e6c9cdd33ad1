"""Content-addressed blob store: round trip, addressing, corruption, atomicity, permissions;
plus the leak-scan helper on real envelope-encrypted weights."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto.envelope import artifact_aad, decrypt_artifact, encrypt_artifact
from crypto.keyproviders import LocalFileKeyProvider
from marketplace.errors import PayloadTooLarge
from marketplace.services.blobstore import BlobCorrupt, BlobNotFound, BlobStore, parse_address
from tests.scan import find_bytes, float_patterns


@pytest.fixture
def store(tmp_path):
    return BlobStore(tmp_path / "blobs", fsync=False)


def _all_files(root):
    return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=5000))
def test_round_trip_and_address_is_sha256(store, data):
    addr = store.put(data)
    assert addr == "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.exists(addr)
    assert store.get(addr) == data
    assert b"".join(store.iter_chunks(addr, chunk_size=7)) == data
    assert store.size(addr) == len(data)


def test_idempotent_put_and_listing(store):
    a = store.put(b"one")
    assert store.put(b"one") == a
    b = store.put_stream([b"tw", b"o"])
    assert b == store.put(b"two")
    assert list(store.iter_addresses()) == sorted([a, b])
    assert len(_all_files(store.root)) == 2


def test_fan_out_layout(store):
    addr = store.put(b"layout")
    hexd = parse_address(addr)
    assert store.path_of(addr) == store.root / hexd[:2] / hexd[2:4] / hexd
    assert store.path_of(addr).is_file()


def test_put_stream_large_in_chunks(store):
    chunks = [os.urandom(256 * 1024) for _ in range(12)]  # 3 MiB
    addr = store.put_stream(iter(chunks))
    assert store.get(addr) == b"".join(chunks)


def test_put_stream_limit_leaves_nothing(store):
    with pytest.raises(PayloadTooLarge):
        store.put_stream([b"x" * 10, b"y" * 10], max_bytes=15)
    assert list(store.iter_addresses()) == []
    assert _all_files(store.root) == []


def test_failed_stream_leaves_no_temp_file(store):
    def chunks():
        yield b"partial data"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.put_stream(chunks())
    assert _all_files(store.root) == []
    with pytest.raises(TypeError):
        store.put_stream(["text"])  # type: ignore[list-item]
    assert _all_files(store.root) == []


def test_corruption_detected_on_get_and_stream(store):
    addr = store.put(b"encrypted artifact bytes")
    path = store.path_of(addr)
    raw = bytearray(path.read_bytes())
    raw[3] ^= 1
    os.chmod(path, 0o600)
    path.write_bytes(bytes(raw))
    with pytest.raises(BlobCorrupt, match="corrupt"):
        store.get(addr)
    with pytest.raises(BlobCorrupt):
        b"".join(store.iter_chunks(addr))


def test_substituted_file_detected(store):
    a = store.put(b"blob A")
    b = store.put(b"blob B")
    os.replace(store.path_of(b), store.path_of(a))
    with pytest.raises(BlobCorrupt):
        store.get(a)


def test_missing_and_delete(store):
    addr = "sha256:" + "0" * 64
    with pytest.raises(BlobNotFound):
        store.get(addr)
    with pytest.raises(BlobNotFound):
        list(store.iter_chunks(addr))
    assert not store.exists(addr)
    real = store.put(b"to delete")
    assert store.delete(real) is True
    assert store.delete(real) is False
    assert not store.exists(real)
    with pytest.raises(BlobNotFound):
        store.get(real)


@pytest.mark.parametrize(
    "bad",
    ["", "sha256:", "sha256:" + "A" * 64, "md5:" + "0" * 32, "sha256:" + "0" * 63, "sha256:../../etc/passwd", "0" * 64],
)
def test_bad_addresses_rejected(store, bad):
    with pytest.raises(ValueError, match="sha256"):
        store.get(bad)
    with pytest.raises(ValueError):
        store.exists(bad)


def test_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        store = BlobStore(tmp_path / "perm", fsync=True)
        addr = store.put(b"perm")
    finally:
        os.umask(old)
    path = store.path_of(addr)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for d in (store.root, path.parent, path.parent.parent, store.root / ".tmp"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


# ---- leak scanning ---------------------------------------------------------------------------


def _weights():
    return np.random.default_rng(1234).normal(size=(16, 8)).astype(np.float32)


def test_scan_finds_plaintext_weights_in_every_rendering(tmp_path):
    w = _weights()
    pats = float_patterns(w)
    flat = w.reshape(-1)
    mid = (flat.size - 4) // 2
    renderings = {
        "raw.npy": flat.tobytes(),
        "raw64.bin": flat.astype(np.float64).tobytes(),
        "weights.json": json.dumps(flat.tolist()).encode(),
        "weights.csv": "\n".join(",".join(str(v) for v in row) for row in w.tolist()).encode(),
        "log.txt": f"INFO layer[{mid}] = {float(flat[mid])!r}\n".encode(),
    }
    for name, data in renderings.items():
        (tmp_path / name).write_bytes(b"prefix" * 1000 + data)
        hits = find_bytes(pats, paths=[tmp_path / name])
        assert hits, f"{name} not detected"
        assert str(tmp_path / name) in hits[0]
    buf = io.BytesIO()
    np.savez(buf, layer0=w)
    assert find_bytes(pats, extra_blobs=[b"", buf.getvalue()]) != []  # npz stores raw bytes


def test_scan_finds_pattern_across_chunk_boundary(tmp_path):
    pat = b"NEEDLE-IN-HAYSTACK"
    data = b"x" * ((1 << 20) - 5) + pat + b"x" * 100
    (tmp_path / "big.bin").write_bytes(data)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "other.bin").write_bytes(b"no")
    assert find_bytes([pat], paths=[tmp_path]) == [f"{tmp_path / 'big.bin'}@{(1 << 20) - 5}: pattern 0 ({pat!r})"]
    assert find_bytes([pat], paths=[tmp_path / "missing"], extra_blobs=[b"nothing"]) == []
    with pytest.raises(ValueError):
        find_bytes([b""], paths=[tmp_path])


def test_encrypted_weights_in_blob_store_leave_no_trace(tmp_path):
    w = _weights()
    buf = io.BytesIO()
    np.savez(buf, layer0=w)
    plaintext = buf.getvalue()
    provider = LocalFileKeyProvider.create(tmp_path / "kek.json")
    aad = artifact_aad("ver-1", "sha256:" + hashlib.sha256(plaintext).hexdigest())
    blob, wrapped = encrypt_artifact(plaintext, provider=provider, aad=aad)
    store = BlobStore(tmp_path / "data" / "blobs", fsync=False)
    addr = store.put(blob)
    db_row = json.dumps({"blob": addr, "wrapped_key": wrapped.to_json()}).encode()
    pats = float_patterns(w)
    assert find_bytes(pats, paths=[tmp_path / "data"], extra_blobs=[db_row]) == []
    # and the control: the same scan sees the weights once decrypted
    out = decrypt_artifact(store.get(addr), wrapped, provider=provider, aad=aad)
    assert find_bytes(pats, extra_blobs=[out]) != []
