"""Raw TenSEAL (Microsoft SEAL, CKKS) calls and the tunables behind ``crypto.he``.

This is the hazmat layer: nothing here checks that a caller keeps a secret key secret or that
a result is circuit-private. Use ``crypto.he`` (SecretContext, PublicContext, evaluate) instead.

What lives here:
* CKKS parameter selection at 128-bit security (HE-standard bounds on log q),
* context creation and serialization of a *public* key set with only chosen Galois keys
  (TenSEAL 0.3.18 can only generate all power-of-two keys, so we build the subset with SEAL's
  ``KeyGenerator`` and splice it into TenSEAL's protobuf context message),
* non-adjacent-form (NAF) decomposition of rotation steps, which is how SEAL composes a rotation
  for which it has no key,
* a public-key encryption of zero brought down to the last modulus level (TenSEAL exposes no
  ``mod_switch``; adding a ciphertext at a lower level switches the other operand down),
* the exact RNS primes of a context and the *scale-drift* correction: after every rescale by a
  prime ``q`` TenSEAL 0.3.18 resets the ciphertext's scale to the global scale ``2^s`` although
  the true scale is ``2^(2s)/q``, so each rescale silently multiplies the value by ``2^s/q``
  (measured: 1 - 2.4e-4 for the 30-bit primes of [50,30,30,30,50], a 2.8e-2 logit error on the
  digits MLP). ``power_levels`` tracks that factor and ``affine_corrections`` folds its inverse
  into the next plaintext multiply, which leaves only the CKKS noise.

Measured with TenSEAL 0.3.18 on the build machine: N=8192 with [60,40,40,60] at 2^40 allows
depth 2; [50,30,30,30,50] at 2^30 allows depth 3; deeper needs N=16384. A public context is
~35 MB with all Galois keys, ~1.9 MB without.
"""

from __future__ import annotations

import os
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts

__all__ = [
    "FIRST_PRIME_HEADROOM_BITS",
    "HE_STANDARD_MAX_LOG_Q",
    "batch_affine",
    "ciphertext_polynomials",
    "powers",
    "single_affine",
    "MAX_PRIME_BITS",
    "CkksParameters",
    "affine_corrections",
    "candidate_parameters",
    "choose_parameters",
    "data_primes",
    "power_levels",
    "context_is_private",
    "encrypt_zero_at_last_level",
    "galois_elt",
    "load_context",
    "load_vector",
    "naf",
    "new_secret_context",
    "public_context_bytes",
    "rotation_key_steps",
]

# HomomorphicEncryption.org standard (2018), Table 1, classical 128-bit security, ternary secret.
HE_STANDARD_MAX_LOG_Q: dict[int, int] = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
# Bits above the scale in the first (and special) prime: the largest |value| is ~2^(this - 1).
FIRST_PRIME_HEADROOM_BITS = 20
MAX_PRIME_BITS = 60
# Scale candidates, best precision first. 2^30 still leaves ~2^-12 CKKS error on small nets.
_SCALE_BITS_CHOICES = (40, 36, 33, 30)


@dataclass(frozen=True)
class CkksParameters:
    """CKKS parameters: ring degree, coefficient modulus bit sizes, scale bits."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int

    @property
    def depth(self) -> int:
        """Multiplicative depth (rescales) these parameters allow."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def log_q(self) -> int:
        return sum(self.coeff_mod_bit_sizes)


def choose_parameters(depth: int, *, min_scale_bits: int = 30) -> CkksParameters:
    """Smallest ring (then largest scale) giving ``depth`` rescales at 128-bit security.

    Raises ValueError if no standard ring fits.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    for n, max_log_q in sorted(HE_STANDARD_MAX_LOG_Q.items()):
        for s in _SCALE_BITS_CHOICES:
            if s < min_scale_bits:
                continue
            first = min(s + FIRST_PRIME_HEADROOM_BITS, MAX_PRIME_BITS)
            bits = (first, *([s] * depth), first)
            if sum(bits) <= max_log_q:
                return CkksParameters(n, bits, s)
    raise ValueError(f"no 128-bit CKKS parameters for depth {depth} (max N=32768)")


def candidate_parameters(
    depth: int, *, headroom_bits: int, min_scale_bits: int = 20, max_scale_bits: int = 50
) -> list[CkksParameters]:
    """Parameter sets for ``depth`` rescales, cheapest first: one per ring degree N.

    ``[s + headroom, s x depth, s + headroom]`` with the largest scale ``s`` (in
    ``[min_scale_bits, max_scale_bits]``) inside the HE-standard 128-bit bound for N. At a given N
    and depth the cost does not depend on ``s`` (same number of RNS primes, each in one 64-bit
    word), so the largest ``s`` is the most precise choice at that cost. ``headroom_bits``: bits
    of the first prime above the scale; a result ``|v|`` must stay below ``2^(headroom - 1)``.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not 1 <= headroom_bits <= MAX_PRIME_BITS - min_scale_bits:
        raise ValueError(f"headroom_bits must be in [1, {MAX_PRIME_BITS - min_scale_bits}], got {headroom_bits}")
    out: list[CkksParameters] = []
    for n, max_log_q in sorted(HE_STANDARD_MAX_LOG_Q.items()):
        for s in range(min(max_scale_bits, MAX_PRIME_BITS - headroom_bits), min_scale_bits - 1, -1):
            bits = (s + headroom_bits, *([s] * depth), s + headroom_bits)
            if sum(bits) <= max_log_q:
                if not out or out[-1].coeff_mod_bit_sizes != bits:  # same precision, dearer: skip
                    out.append(CkksParameters(n, bits, s))
                break
    return out


def data_primes(ctx: ts.Context) -> tuple[int, ...]:
    """The data primes ``q_0..q_L`` of ``ctx`` (not the special prime), read from SEAL.

    TenSEAL does not bind ``seal::Modulus``; ``total_coeff_modulus()`` gives the low 64 bits of
    each level's product ``Q_i = Q_(i-1) q_i``, and since ``q_i < 2^64`` and ``Q_(i-1)`` is odd,
    ``q_i = Q_i * Q_(i-1)^-1 mod 2^64`` exactly.
    """
    m = 1 << 64
    sc = ctx.data.seal_context()
    top = sc.first_context_data().chain_index()
    cd = sc.last_context_data()
    prev = 1
    out: list[int] = []
    while True:
        t = int(cd.total_coeff_modulus()) % m
        out.append(t * pow(prev, -1, m) % m)
        prev = t
        if cd.chain_index() >= top:
            break
        cd = cd.prev_context_data()
    return tuple(out)


def power_levels(
    primes: Sequence[int], n_primes: int, degree: int, scale_bits: int, factor: float = 1.0
) -> dict[int, tuple[int, float]]:
    """``q -> (primes left, value factor)`` of ``x^q`` as ``powers`` computes it, given ``x`` at
    ``n_primes`` primes whose decryption is ``factor * x`` (TenSEAL's scale reset after each
    rescale by ``p`` multiplies the value by ``2^s / p``)."""
    d = float(2**scale_bits)
    out = {1: (n_primes, factor)}
    if degree >= 2:
        n2, f2 = n_primes - 1, factor * factor * d / primes[n_primes - 1]
        out[2] = (n2, f2)
        if degree >= 3:  # x^2 * x: x is mod-switched to n2 primes, then rescaled by primes[n2-1]
            out[3] = (n2 - 1, f2 * factor * d / primes[n2 - 1])
        if degree >= 4:
            out[4] = (n2 - 1, f2 * f2 * d / primes[n2 - 1])
    if min(n for n, _ in out.values()) < 1:
        raise ValueError("not enough primes left for this power")
    return out


def affine_corrections(
    levels: dict[int, tuple[int, float]], primes: Sequence[int], scale_bits: int
) -> dict[int, float]:
    """Per power ``q``, the factor to fold into the plaintext multiplier so that after the
    rescale by ``primes[n_q - 1]`` the term decrypts to its exact value (factor 1)."""
    d = float(2**scale_bits)
    return {q: primes[n - 1] / (d * f) for q, (n, f) in levels.items()}


def new_secret_context(params: CkksParameters) -> ts.Context:
    """A fresh asymmetric CKKS context with secret, public and relinearisation keys."""
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
    )
    ctx.global_scale = float(2**params.scale_bits)
    return ctx


def naf(n: int) -> list[int]:
    """Non-adjacent form of ``n`` as signed powers of two (SEAL's decomposition of a rotation)."""
    out: list[int] = []
    k = 0
    while n:
        if n & 1:
            z = 2 - (n % 4)
            out.append(z * (1 << k))
            n -= z
        n //= 2
        k += 1
    return out


def rotation_key_steps(steps: Iterable[int]) -> list[int]:
    """The power-of-two steps whose Galois keys let SEAL perform every rotation in ``steps``."""
    out: set[int] = set()
    for s in steps:
        if s:
            out.update(naf(s))
    return sorted(out)


# --- minimal protobuf wire codec (TenSEALContextProto, tenseal/proto/tensealcontext.proto) ---


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(b):
            raise ValueError("truncated protobuf varint")
        x = b[i]
        i += 1
        value |= (x & 0x7F) << shift
        shift += 7
        if x < 0x80:
            return value, i


def _write_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        x = n & 0x7F
        n >>= 7
        if n:
            out.append(x | 0x80)
        else:
            out.append(x)
            return bytes(out)


def _fields(b: bytes) -> list[tuple[int, int, Any]]:
    i = 0
    out: list[tuple[int, int, Any]] = []
    while i < len(b):
        key, i = _read_varint(b, i)
        num, wt = key >> 3, key & 7
        v: Any
        if wt == 0:
            v, i = _read_varint(b, i)
        elif wt == 2:
            ln, i = _read_varint(b, i)
            v = b[i : i + ln]
            i += ln
        elif wt == 1:
            v = b[i : i + 8]
            i += 8
        elif wt == 5:
            v = b[i : i + 4]
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        out.append((num, wt, v))
    return out


def _encode(fields: Sequence[tuple[int, int, Any]]) -> bytes:
    out = bytearray()
    for num, wt, v in fields:
        out += _write_varint(num << 3 | wt)
        if wt == 0:
            out += _write_varint(v)
        elif wt == 2:
            out += _write_varint(len(v)) + v
        else:
            out += v
    return bytes(out)


def galois_elt(step: int, n: int) -> int:
    """SEAL's ``GaloisTool::get_elt_from_step``: ``3^step mod 2N`` (negative steps: ``N/2 - |step|``)."""
    half = n >> 1
    e = half - abs(step) if step < 0 else step
    return pow(3, e, 2 * n)


def _galois_keys_bytes(ctx: ts.Context, steps: list[int]) -> bytes:
    cpp = ts._ts_cpp
    keygen = cpp.KeyGenerator(ctx.data.seal_context(), ctx.data.secret_key())
    keys = cpp.GaloisKeys()
    n = ctx.data.seal_context().key_context_data().parms().poly_modulus_degree()
    # Galois elements, not steps: with only positive steps pybind11 would pick the elements
    # overload and read the steps as elements
    keygen.create_galois_keys(sorted({galois_elt(s, n) for s in steps}), keys)
    fd, path = tempfile.mkstemp(prefix="som-gk-")
    os.close(fd)
    try:
        keys.save(path)  # SEAL serialization, the format TenSEAL stores in the proto
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.remove(path)


def public_context_bytes(ctx: ts.Context, *, galois_steps: Sequence[int]) -> bytes:
    """Serialize public + relinearisation keys and Galois keys for exactly ``galois_steps``.

    The secret key is never written. ``ctx`` must hold the secret key (to make Galois keys).
    """
    base: bytes = ctx.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=True
    )
    if not galois_steps:
        return base
    gk = _galois_keys_bytes(ctx, list(galois_steps))
    out: list[tuple[int, int, Any]] = []
    for num, wt, v in _fields(base):
        if num == 2 and wt == 2:  # TenSEALPublicProto public_context = 2
            sub = [f for f in _fields(v) if f[0] != 5]
            sub.append((5, 2, gk))  # bytes galois_keys = 5
            v = _encode(sub)
        out.append((num, wt, v))
    return _encode(out)


_SEAL_MAGIC = 0xA15E
_COMPR_NONE, _COMPR_ZLIB, _COMPR_ZSTD = 0, 1, 2


def _seal_object(b: bytes) -> tuple[bytes, int]:
    """Parse a SEALHeader (16 bytes, little-endian: magic u16, header size u8, version u8 u8,
    compr_mode u8, reserved u16, total size u64); return (decompressed body, total size)."""
    if len(b) < 16:
        raise ValueError("truncated SEAL header")
    magic, hsize, _maj, _min, mode, _res, size = struct.unpack_from("<HBBBBHQ", b)
    if magic != _SEAL_MAGIC or hsize != 16 or not 16 <= size <= len(b):
        raise ValueError("not a SEAL object (bad magic, header size or length)")
    body = b[16:size]
    if mode == _COMPR_NONE:
        return body, size
    if mode == _COMPR_ZLIB:
        return zlib.decompress(body), size
    if mode == _COMPR_ZSTD:
        import zstandard  # optional: only audits need coefficient-level access

        return zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 30), size
    raise ValueError(f"unknown SEAL compression mode {mode}")


def ciphertext_polynomials(vector_bytes: bytes) -> np.ndarray:
    """The RNS coefficients of a serialized TenSEAL CKKSVector's (single) SEAL ciphertext.

    Returns uint64 ``(size, n_primes, N)`` (NTT form, as CKKS keeps them): ``[1]`` is the second
    polynomial ``c1``. For audits and tests (needs the ``zstandard`` package for TenSEAL's
    zstd-compressed output). Raises ValueError on anything else.
    """
    ct = [v for num, wt, v in _fields(vector_bytes) if num == 2 and wt == 2]
    if len(ct) != 1:
        raise ValueError("expected a CKKSVector with exactly one ciphertext")
    body, _ = _seal_object(ct[0])
    # Ciphertext::save_members: parms_id (4 x u64), is_ntt_form u8, size u64, N u64,
    # coeff_modulus_size u64, scale f64, correction_factor u64, then a DynArray<u64>
    off = 32
    (is_ntt,) = struct.unpack_from("<B", body, off)
    size, n, k = struct.unpack_from("<QQQ", body, off + 1)
    off += 1 + 24 + 8 + 8
    arr, _ = _seal_object(body[off:])
    (count,) = struct.unpack_from("<Q", arr)
    if not is_ntt or count != size * n * k or len(arr) < 8 + 8 * count:
        raise ValueError("unexpected SEAL ciphertext layout")
    return np.frombuffer(arr, dtype="<u8", count=count, offset=8).reshape(size, k, n)


def load_context(data: bytes) -> ts.Context:
    """Deserialize a TenSEAL context (raises ValueError on garbage)."""
    try:
        return ts.context_from(data)
    except Exception as e:  # TenSEAL raises assorted C++ exceptions
        raise ValueError(f"not a TenSEAL context: {type(e).__name__}") from e


def context_is_private(ctx: ts.Context) -> bool:
    """Whether ``ctx`` carries a secret key."""
    return bool(ctx.is_private())


def load_vector(ctx: ts.Context, data: bytes) -> ts.CKKSVector:
    """Deserialize a CKKS vector under ``ctx`` (raises ValueError on garbage)."""
    try:
        return ts.ckks_vector_from(ctx, data)
    except Exception as e:
        raise ValueError(f"not a CKKS vector for this context: {type(e).__name__}") from e


def encrypt_zero_at_last_level(ctx: ts.Context, size: int, *, levels_down: int) -> ts.CKKSVector:
    """A fresh public-key encryption of ``size`` zeros, rescaled ``levels_down`` times.

    Adding it to a result re-randomises the result and (TenSEAL's auto_mod_switch) brings the
    result down to the level of this ciphertext, so it serializes with the fewest primes.
    """
    z = ts.ckks_vector(ctx, [0.0] * size)
    for _ in range(levels_down):
        z = z * 1.0  # multiply_plain + rescale: drops one prime, value stays 0
    return z


# --- evaluation kernels -------------------------------------------------------------------


def powers(h: list[Any], degree: int) -> dict[int, list[Any]]:
    """x, x^2, x^3, x^4 of every ciphertext in ``h`` (depth ceil(log2(degree)))."""
    p: dict[int, list[Any]] = {1: h}
    if degree >= 2:
        p[2] = [v.square() for v in h]
    if degree >= 3:
        p[3] = [a * b for a, b in zip(p[2], h, strict=True)]
    if degree >= 4:
        p[4] = [v.square() for v in p[2]]
    if degree > 4:
        raise ValueError(f"activation degree must be <= 4, got {degree}")
    return p


def batch_affine(
    pw: dict[int, list[Any]],
    coeffs: Sequence[float],
    weight: Any,
    bias: Any,
    mask: Any | None,
    *,
    corrections: dict[int, float] | None = None,
) -> list[Any]:
    """Slot-per-sample ``sum_q (c_q * W)^T x^q + (b + c_0 W^T 1)``; ``mask`` (0/1 over slots)
    is folded into the plaintext multiplies so the result is zero outside it; ``corrections[q]``
    (``affine_corrections``) multiplies the plaintext of power ``q`` (scale-drift fix)."""
    d_in, d_out = weight.shape
    corr = corrections or {}
    consts = bias + coeffs[0] * weight.sum(axis=0)
    out: list[Any] = []
    for k in range(d_out):
        acc = None
        for q in range(1, len(coeffs)):
            c = coeffs[q]
            if c == 0.0:
                continue
            c *= corr.get(q, 1.0)
            for j in range(d_in):
                w = float(weight[j, k] * c)
                if w == 0.0:
                    continue
                t = pw[q][j] * (w if mask is None else (mask * w).tolist())
                if acc is None:
                    acc = t
                else:
                    acc += t
        if acc is None:  # an all-zero column: an encryption of zero at the right level
            acc = pw[1][0] * 0.0
        b = float(consts[k])
        if b != 0.0:
            acc += b if mask is None else (mask * b).tolist()
        out.append(acc)
    return out


def single_affine(
    pw: dict[int, Any],
    coeffs: Sequence[float],
    weight: Any,
    bias: Any,
    *,
    corrections: dict[int, float] | None = None,
) -> Any:
    """One-ciphertext-per-sample ``sum_q x^q @ (c_q W) + (b + c_0 1 W)`` with TenSEAL's
    diagonal vector-matrix product (rotations by 0..d_in-1); ``corrections`` as in
    ``batch_affine``."""
    corr = corrections or {}
    acc = None
    for q in range(1, len(coeffs)):
        c = coeffs[q]
        if c == 0.0:
            continue
        t = pw[q].mm((weight * (c * corr.get(q, 1.0))).tolist())
        acc = t if acc is None else acc + t
    if acc is None:
        raise ValueError("activation polynomial has no non-constant term")
    consts = bias + coeffs[0] * weight.sum(axis=0)
    return acc + consts.tolist()


# --- SEAL-level kernels (single layout, circuit privacy) -----------------------------------
#
# TenSEAL's ``CKKSVector.mm`` rotates once per matrix row (d_in rotations, each composed from
# power-of-two keys) and encodes every diagonal per call. The kernels below work on the SEAL
# ciphertexts inside TenSEAL vectors (``tenseal.sealapi`` binds the same C++ types), so that the
# single layout can use the baby-step/giant-step diagonal method with rotation keys for its exact
# steps and plaintexts encoded once per model. They keep TenSEAL's scale convention (the scale is
# reset to the global scale after a rescale), so ``power_levels``/``affine_corrections`` apply.


class SealKit:
    """SEAL evaluator, encoder and public keys of a TenSEAL context (one per loaded key set)."""

    def __init__(self, ctx: ts.Context) -> None:
        import tenseal.sealapi as sa

        self._sa = sa
        sc = ctx.data.seal_context()
        self.seal_context = sc
        self.evaluator = sa.Evaluator(sc)
        self.encoder = sa.CKKSEncoder(sc)
        self.galois_keys = ctx.data.galois_keys() if ctx.has_galois_keys() else None
        self.relin_keys = ctx.data.relin_keys() if ctx.has_relin_keys() else None
        self.encryptor = sa.Encryptor(sc, ctx.data.public_key())
        self.scale = float(ctx.global_scale)
        self.slots = int(self.encoder.slot_count())
        self.parms: dict[int, list[int]] = {}  # number of data primes -> parms_id
        cd = sc.first_context_data()
        while cd is not None:
            self.parms[cd.chain_index() + 1] = cd.parms_id()
            cd = cd.next_context_data()

    def encode(self, values: Any, n_primes: int, *, scale: float | None = None) -> Any:
        """A plaintext of ``values`` (at most ``slots``; zero-padded) at ``n_primes`` primes,
        at ``scale`` (default: the global scale)."""
        pt = self._sa.Plaintext()
        vals = np.asarray(values, dtype=np.float64).tolist()
        self.encoder.encode(vals, self.parms[n_primes], scale or self.scale, pt)
        return pt

    def new_ciphertext(self) -> Any:
        return self._sa.Ciphertext(self.seal_context)

    def rotate(self, ct: Any, step: int) -> Any:
        if self.galois_keys is None:
            raise ValueError("this key set has no Galois keys")
        out = self.new_ciphertext()
        self.evaluator.rotate_vector(ct, step, self.galois_keys, out)
        return out

    def rescale(self, ct: Any) -> None:
        """Rescale by the last prime and reset the scale to the global scale (as TenSEAL does)."""
        self.evaluator.rescale_to_next_inplace(ct)
        ct.scale = self.scale

    def mod_switch(self, ct: Any, n_primes: int) -> Any:
        if ct.coeff_modulus_size() == n_primes:
            return ct
        out = self.new_ciphertext()
        self.evaluator.mod_switch_to(ct, self.parms[n_primes], out)
        return out

    def zero(self, n_primes: int) -> Any:
        """A fresh public-key encryption of zero at ``n_primes`` primes (scale: global)."""
        z = self.new_ciphertext()
        self.encryptor.encrypt_zero(self.parms[n_primes], z)
        z.scale = self.scale
        return z


def seal_powers(kit: SealKit, x: Any, degree: int) -> dict[int, Any]:
    """``powers`` on a SEAL ciphertext: relinearised and rescaled like TenSEAL's operators."""
    ev, rk = kit.evaluator, kit.relin_keys
    p: dict[int, Any] = {1: x}

    def finish(c: Any) -> Any:
        ev.relinearize_inplace(c, rk)
        kit.rescale(c)
        return c

    if degree > 4:
        raise ValueError(f"activation degree must be <= 4, got {degree}")
    if degree >= 2:
        x2 = kit.new_ciphertext()
        ev.square(x, x2)
        p[2] = finish(x2)
    if degree >= 3:
        x3 = kit.new_ciphertext()
        ev.multiply(p[2], kit.mod_switch(x, p[2].coeff_modulus_size()), x3)
        p[3] = finish(x3)
    if degree >= 4:
        x4 = kit.new_ciphertext()
        ev.square(p[2], x4)
        p[4] = finish(x4)
    return p


def bsgs_steps(d_in: int, giant: int) -> tuple[list[int], list[int]]:
    """Baby steps ``1..g-1`` and giant steps ``g, 2g, ...`` of a ``d_in``-row diagonal product."""
    return list(range(1, min(giant, d_in))), list(range(giant, d_in, giant))


def bsgs_matvec(
    kit: SealKit,
    src: dict[int, Any],
    babies: Sequence[int],
    giants: Sequence[tuple[int, Sequence[tuple[int, int, Any]]]],
) -> Any:
    """``sum_j rot(sum_(q,b) rot(src[q], b) * P_(j,q,b), g_j)`` (no rescale): the diagonal
    method with baby-step/giant-step rotations; ``giants``: ``(giant step, ((q, b, plaintext)))``."""
    ev = kit.evaluator
    rot: dict[tuple[int, int], Any] = {}
    for q, c in src.items():
        rot[(q, 0)] = c
        for b in babies:
            rot[(q, b)] = kit.rotate(c, b)
    acc = None
    for step, terms in giants:
        inner = None
        for q, b, pt in terms:
            t = kit.new_ciphertext()
            ev.multiply_plain(rot[(q, b)], pt, t)
            if inner is None:
                inner = t
            else:
                ev.add_inplace(inner, t)
        if inner is None:
            continue
        if step:
            ev.rotate_vector_inplace(inner, step, kit.galois_keys)
        if acc is None:
            acc = inner
        else:
            ev.add_inplace(acc, inner)
    if acc is None:
        raise ValueError("all-zero layer")
    return acc


_tls = threading.local()


def seal_bytes(obj: Any) -> bytes:
    """SEAL's own serialization of ``obj`` (via an in-memory file: sealapi saves to paths only)."""
    fd = getattr(_tls, "fd", None)
    if fd is None and hasattr(os, "memfd_create"):
        fd = os.memfd_create("som-seal", os.MFD_CLOEXEC)
        _tls.fd = fd
    if fd is None:  # pragma: no cover - not Linux
        tfd, path = tempfile.mkstemp(prefix="som-seal-")
        os.close(tfd)
        try:
            obj.save(path)
            with open(path, "rb") as f:
                return f.read()
        finally:
            os.remove(path)
    obj.save(f"/proc/self/fd/{fd}")
    return os.pread(fd, os.fstat(fd).st_size, 0)


def vector_bytes(ct: Any, *, size: int, scale: float) -> bytes:
    """A TenSEAL ``CKKSVectorProto`` (sizes, ciphertexts, scale) around a SEAL ciphertext."""
    return _encode([(1, 2, _write_varint(size)), (2, 2, seal_bytes(ct)), (3, 1, struct.pack("<d", scale))])


def seal_ciphertext(vec: Any) -> Any:
    """The (single) SEAL ciphertext of a TenSEAL CKKSVector (a copy)."""
    cts = vec.ciphertext()
    if len(cts) != 1:
        raise ValueError("expected a CKKSVector with one ciphertext")
    return cts[0]
