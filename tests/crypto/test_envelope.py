"""Envelope encryption and KEK providers: round trips, tampering, rotation, key-file hygiene."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.envelope import (
    WrappedKey,
    artifact_aad,
    decrypt_artifact,
    encrypt_artifact,
    rewrap,
)
from crypto.errors import DecryptionError, KeyMaterialError
from crypto.keyproviders import (
    EnvKeyProvider,
    KeyProvider,
    LocalFileKeyProvider,
    generate_kek_text,
)

AAD = artifact_aad("ver-1", "sha256:" + hashlib.sha256(b"w").hexdigest())
OTHER_AAD = artifact_aad("ver-2", "sha256:" + hashlib.sha256(b"w").hexdigest())


@pytest.fixture
def provider(tmp_path):
    return LocalFileKeyProvider.create(tmp_path / "kek.json")


def _flip(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index % len(b)] ^= 0x01
    return bytes(b)


def _env(key: bytes | None = None) -> dict[str, str]:
    return {"SOM_KEK": base64.b64encode(key or os.urandom(32)).decode()}


# ---- round trips -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(plaintext=st.binary(min_size=0, max_size=4096), aad=st.binary(min_size=1, max_size=64))
def test_round_trip_any_size(plaintext, aad):
    provider = EnvKeyProvider(environ=_env(b"k" * 32))
    blob, wrapped = encrypt_artifact(plaintext, provider=provider, aad=aad)
    assert plaintext not in blob or len(plaintext) < 8
    assert decrypt_artifact(blob, wrapped, provider=provider, aad=aad) == plaintext


def test_round_trip_local_provider_and_json(provider):
    blob, wrapped = encrypt_artifact(b"weights" * 1000, provider=provider, aad=AAD)
    restored = WrappedKey.from_json(wrapped.to_json())
    assert restored == wrapped
    assert decrypt_artifact(blob, restored, provider=provider, aad=AAD) == b"weights" * 1000
    # a reloaded provider (new process) reads the same keyring
    again = LocalFileKeyProvider(provider.path)
    assert decrypt_artifact(blob, wrapped, provider=again, aad=AAD) == b"weights" * 1000


def test_fresh_dek_and_nonce_per_encryption(provider):
    b1, w1 = encrypt_artifact(b"same", provider=provider, aad=AAD)
    b2, w2 = encrypt_artifact(b"same", provider=provider, aad=AAD)
    assert b1 != b2 and w1.wrapped != w2.wrapped


def test_rng_is_a_parameter(provider):
    counter = iter(range(1, 1000))

    def rng(n: int) -> bytes:
        return bytes([next(counter)]) * n

    blob, wrapped = encrypt_artifact(b"x", provider=provider, aad=AAD, rng=rng)
    # the DEK was b"\x01"*32 and the nonce b"\x02"*12: the nonce appears right after the magic
    assert b"\x02" * 12 in blob
    assert decrypt_artifact(blob, wrapped, provider=provider, aad=AAD) == b"x"


def test_providers_satisfy_protocol(provider):
    assert isinstance(provider, KeyProvider)
    assert isinstance(EnvKeyProvider(environ=_env()), KeyProvider)


# ---- tampering -------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(index=st.integers(min_value=0, max_value=10_000))
def test_any_bit_flip_in_blob_is_detected(index):
    provider = EnvKeyProvider(environ=_env(b"t" * 32))
    blob, wrapped = encrypt_artifact(b"secret weights", provider=provider, aad=AAD)
    with pytest.raises(DecryptionError):
        decrypt_artifact(_flip(blob, index), wrapped, provider=provider, aad=AAD)


def test_tampered_nonce_truncation_and_trailing_garbage(provider):
    blob, wrapped = encrypt_artifact(b"secret weights", provider=provider, aad=AAD)
    nonce_at = len(b"SOMENV\x01")
    for bad in (_flip(blob, nonce_at), blob[:-1], blob + b"\x00", blob[:10], b""):
        with pytest.raises(DecryptionError):
            decrypt_artifact(bad, wrapped, provider=provider, aad=AAD)


def test_wrong_aad_is_detected(provider):
    blob, wrapped = encrypt_artifact(b"secret weights", provider=provider, aad=AAD)
    with pytest.raises(DecryptionError):
        decrypt_artifact(blob, wrapped, provider=provider, aad=OTHER_AAD)


def test_tampered_wrapped_dek_is_detected(provider):
    blob, wrapped = encrypt_artifact(b"secret weights", provider=provider, aad=AAD)
    for i in (0, 13, len(wrapped.wrapped) - 1):
        bad = WrappedKey(kek_id=wrapped.kek_id, alg=wrapped.alg, wrapped=_flip(wrapped.wrapped, i))
        with pytest.raises(DecryptionError):
            decrypt_artifact(blob, bad, provider=provider, aad=AAD)
    short = WrappedKey(kek_id=wrapped.kek_id, alg=wrapped.alg, wrapped=wrapped.wrapped[:5])
    with pytest.raises(DecryptionError):
        decrypt_artifact(blob, short, provider=provider, aad=AAD)


def test_swapped_wrapped_keys_between_artifacts_fail(provider):
    blob1, w1 = encrypt_artifact(b"model one", provider=provider, aad=AAD)
    blob2, w2 = encrypt_artifact(b"model two", provider=provider, aad=OTHER_AAD)
    with pytest.raises(DecryptionError):
        decrypt_artifact(blob1, w2, provider=provider, aad=AAD)
    with pytest.raises(DecryptionError):
        decrypt_artifact(blob1, w2, provider=provider, aad=OTHER_AAD)


def test_wrong_kek_same_id_is_decryption_error():
    a = EnvKeyProvider(environ=_env(), kek_id="prod")
    b = EnvKeyProvider(environ=_env(), kek_id="prod")
    blob, wrapped = encrypt_artifact(b"secret weights", provider=a, aad=AAD)
    with pytest.raises(DecryptionError):
        decrypt_artifact(blob, wrapped, provider=b, aad=AAD)


def test_wrong_keyring_is_key_material_error(tmp_path, provider):
    other = LocalFileKeyProvider.create(tmp_path / "other.json")
    blob, wrapped = encrypt_artifact(b"secret weights", provider=provider, aad=AAD)
    with pytest.raises(KeyMaterialError, match="not in key file"):
        decrypt_artifact(blob, wrapped, provider=other, aad=AAD)
    with pytest.raises(KeyMaterialError):
        decrypt_artifact(blob, wrapped, provider=EnvKeyProvider(environ=_env()), aad=AAD)


def test_bad_inputs_are_value_or_type_errors(provider):
    with pytest.raises(ValueError, match="aad"):
        encrypt_artifact(b"x", provider=provider, aad=b"")
    with pytest.raises(TypeError):
        encrypt_artifact("text", provider=provider, aad=AAD)  # type: ignore[arg-type]
    blob, wrapped = encrypt_artifact(b"x", provider=provider, aad=AAD)
    with pytest.raises(ValueError, match="unsupported blob algorithm"):
        decrypt_artifact(blob, WrappedKey(wrapped.kek_id, "A128CBC", wrapped.wrapped), provider=provider, aad=AAD)
    for text in ("not json", "[]", '{"alg":"A256GCM","kek_id":"k","wrapped":"!!"}', '{"alg":"A256GCM"}'):
        with pytest.raises(ValueError):
            WrappedKey.from_json(text)
    with pytest.raises(ValueError):
        artifact_aad("", "sha256:00")
    with pytest.raises(ValueError):
        artifact_aad("v", "md5:00")


# ---- rotation --------------------------------------------------------------------------------


def test_keyring_rotation_rewrap_then_retire(provider):
    blob, wrapped = encrypt_artifact(b"weights v1", provider=provider, aad=AAD)
    old_id = provider.kek_id
    new_id = provider.rotate()
    assert new_id != old_id and provider.kek_id == new_id
    assert set(provider.kek_ids()) == {old_id, new_id}
    # the old KEK still unwraps until retired
    assert decrypt_artifact(blob, wrapped, provider=provider, aad=AAD) == b"weights v1"
    blob_before = bytes(blob)
    moved = rewrap(wrapped, old=provider, new=provider, aad=AAD)
    assert moved.kek_id == new_id and moved.wrapped != wrapped.wrapped
    provider.retire(old_id)
    reloaded = LocalFileKeyProvider(provider.path)
    assert reloaded.kek_ids() == (new_id,)
    assert blob == blob_before
    assert decrypt_artifact(blob, moved, provider=reloaded, aad=AAD) == b"weights v1"
    with pytest.raises(KeyMaterialError):
        decrypt_artifact(blob, wrapped, provider=reloaded, aad=AAD)


def test_rotation_between_key_files_then_old_file_removed(tmp_path):
    old = LocalFileKeyProvider.create(tmp_path / "old.json")
    new = LocalFileKeyProvider.create(tmp_path / "new.json")
    blobs = {}
    for i in range(3):
        aad = artifact_aad(f"v{i}", "sha256:" + "0" * 64)
        blob, wrapped = encrypt_artifact(f"model {i}".encode() * 50, provider=old, aad=aad)
        blobs[i] = (aad, blob, wrapped)
    digests_before = {i: hashlib.sha256(b).hexdigest() for i, (_, b, _) in blobs.items()}
    moved = {i: rewrap(w, old=old, new=new, aad=aad) for i, (aad, _, w) in blobs.items()}
    os.unlink(tmp_path / "old.json")
    fresh = LocalFileKeyProvider(tmp_path / "new.json")
    for i, (aad, blob, _) in blobs.items():
        assert hashlib.sha256(blob).hexdigest() == digests_before[i]
        assert decrypt_artifact(blob, moved[i], provider=fresh, aad=aad) == f"model {i}".encode() * 50


def test_rewrap_needs_the_right_aad(provider):
    _, wrapped = encrypt_artifact(b"w", provider=provider, aad=AAD)
    with pytest.raises(DecryptionError):
        rewrap(wrapped, old=provider, new=provider, aad=OTHER_AAD)


def test_retire_refuses_active_and_unknown(provider):
    with pytest.raises(ValueError, match="active"):
        provider.retire(provider.kek_id)
    with pytest.raises(ValueError, match="no KEK"):
        provider.retire("local:nope")


# ---- key files -------------------------------------------------------------------------------


def test_first_use_creates_keyring_then_reuses_it(tmp_path):
    path = tmp_path / "keys" / "kek.json"
    path.parent.mkdir(mode=0o700)
    first = LocalFileKeyProvider(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    blob, wrapped = encrypt_artifact(b"w", provider=first, aad=AAD)
    second = LocalFileKeyProvider(path)
    assert second.kek_id == first.kek_id
    assert decrypt_artifact(blob, wrapped, provider=second, aad=AAD) == b"w"


def test_key_file_is_0600_after_create_and_rotate(provider):
    assert stat.S_IMODE(os.stat(provider.path).st_mode) == 0o600
    provider.rotate()
    assert stat.S_IMODE(os.stat(provider.path).st_mode) == 0o600
    assert [p.name for p in provider.path.parent.iterdir()] == [provider.path.name]  # no temp files


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_refuses_key_file_open_to_group_or_others(provider, mode):
    os.chmod(provider.path, mode)
    with pytest.raises(KeyMaterialError, match=r"chmod 600") as info:
        LocalFileKeyProvider(provider.path)
    assert f"{mode:04o}" in str(info.value)


def test_refuses_symlink_missing_malformed_and_existing(tmp_path, provider):
    link = tmp_path / "link.json"
    link.symlink_to(provider.path)
    with pytest.raises(KeyMaterialError):
        LocalFileKeyProvider(link)
    with pytest.raises(KeyMaterialError, match="does not exist"):
        LocalFileKeyProvider(tmp_path / "missing.json", create_if_missing=False)
    assert not (tmp_path / "missing.json").exists()
    bad = tmp_path / "bad.json"
    fd = os.open(bad, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b'{"format": "something else"}')
    os.close(fd)
    with pytest.raises(KeyMaterialError, match="not a som-keyring"):
        LocalFileKeyProvider(bad)
    with pytest.raises(KeyMaterialError, match="already exists"):
        LocalFileKeyProvider.create(provider.path)


def test_env_provider_errors_do_not_echo_the_value():
    with pytest.raises(KeyMaterialError, match="SOM_KEK is not set"):
        EnvKeyProvider(environ={})
    short_value = "c2VjcmV0LXNob3J0"  # base64 of 12 bytes
    with pytest.raises(KeyMaterialError) as info:
        EnvKeyProvider(environ={"SOM_KEK": short_value})
    assert short_value not in str(info.value)
    with pytest.raises(KeyMaterialError) as info:
        EnvKeyProvider(environ={"SOM_KEK": "not*base64*at*all"})
    assert "not*base64" not in str(info.value)


def test_env_provider_custom_var_and_generated_key():
    text = generate_kek_text()
    p = EnvKeyProvider("MY_KEK", environ={"MY_KEK": text})
    blob, wrapped = encrypt_artifact(b"w", provider=p, aad=AAD)
    assert wrapped.kek_id.startswith("env:")
    again = EnvKeyProvider("MY_KEK", environ={"MY_KEK": text})
    assert decrypt_artifact(blob, wrapped, provider=again, aad=AAD) == b"w"


def test_env_provider_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("SOM_KEK", generate_kek_text())
    assert EnvKeyProvider().kek_id.startswith("env:")


def test_no_key_material_in_reprs(provider):
    doc = json.loads(provider.path.read_text())
    key_texts = [e["key"] for e in doc["keys"]]
    raw_keys = [base64.b64decode(k) for k in key_texts]
    env_text = generate_kek_text()
    env_provider = EnvKeyProvider(environ={"SOM_KEK": env_text})
    _, wrapped = encrypt_artifact(b"w", provider=provider, aad=AAD)
    reprs = [repr(provider), str(provider), repr(env_provider), repr(wrapped)]
    for r in reprs:
        for k in [*key_texts, env_text]:
            assert k not in r
        for raw in raw_keys:
            assert raw.hex() not in r and repr(raw) not in r
    assert base64.b64encode(wrapped.wrapped).decode() not in repr(wrapped)
