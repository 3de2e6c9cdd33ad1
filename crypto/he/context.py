"""Key roles as types: ``SecretContext`` (the consumer's) and ``PublicContext`` (the compute site's).

For: generating CKKS keys for a public plan, encrypting inputs in the plan's layout, decrypting
results (``SecretContext``), and loading a consumer's public key set at the compute site
(``PublicContext``), which refuses any context carrying a secret key and any parameters that do
not match the plan. Not for: evaluating models (``evaluate``).

Key sets: layout ``"batch"`` needs no Galois keys (~2 MB at N=8192); layout ``"single"`` adds
the power-of-two rotation keys listed in ``plan.galois_steps`` only (never all of them).
"""

from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts

from crypto.errors import DecryptionError, HEError
from crypto.hazmat import tenseal_ops as ops
from crypto.he import wire
from crypto.he.plan import Layout, PublicPlan

__all__ = ["PublicContext", "SecretContext", "apply_postprocess"]

_SK_MAGIC = b"SOMHESK1"


def apply_postprocess(logits: np.ndarray, postprocess: str | None) -> np.ndarray:
    """Apply the plan's consumer-side post-processing (sigmoid or softmax) to logits."""
    if postprocess == "sigmoid":
        return np.asarray(1.0 / (1.0 + np.exp(-logits)))
    if postprocess == "softmax":
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return np.asarray(e / e.sum(axis=1, keepdims=True))
    return logits


def _check_params(ctx: ts.Context, plan: PublicPlan) -> None:
    sc = ctx.data.seal_context()
    kd = sc.key_context_data()
    n = kd.parms().poly_modulus_degree()
    n_primes = kd.chain_index() + 1
    bits = kd.total_coeff_modulus_bit_count()
    want = plan.coeff_mod_bit_sizes
    ok = (
        n == plan.poly_modulus_degree
        and n_primes == len(want)
        and sum(want) - len(want) <= bits <= sum(want)
        and ctx.global_scale == float(2**plan.scale_bits)
    )
    if not ok:
        raise HEError(
            f"key set parameters do not match the plan: expected N={plan.poly_modulus_degree}, "
            f"{len(want)} primes ({sum(want)} bits), got N={n}, {n_primes} primes ({bits} bits)"
        )


@dataclass(frozen=True)
class PublicContext:
    """The compute site's view of a consumer's key set. Never holds a secret key."""

    plan: PublicPlan
    layouts: tuple[Layout, ...]
    _ctx: Any

    @classmethod
    def from_bytes(cls, keyset: bytes, *, plan: PublicPlan) -> PublicContext:
        """Load a public key set for ``plan``.

        Raises TypeError (not bytes), HEError if the context carries a secret key, is not a
        TenSEAL context, lacks a public or relinearisation key, or its parameters differ.
        """
        if not isinstance(keyset, bytes | bytearray):
            raise TypeError(f"expected bytes, got {type(keyset).__name__}")
        try:
            ctx = ops.load_context(bytes(keyset))
        except ValueError as e:
            raise HEError("key set is not a TenSEAL context") from e
        if ops.context_is_private(ctx):
            raise HEError("key set carries a secret key: refused (send the public context only)")
        if not (ctx.has_public_key() and ctx.has_relin_keys()):
            raise HEError("key set lacks a public or relinearisation key")
        _check_params(ctx, plan)
        layouts: list[Layout] = ["batch"]
        if ctx.has_galois_keys():
            gk = ctx.data.galois_keys()
            n = plan.poly_modulus_degree
            if all(gk.has_key(ops.galois_elt(s, n)) for s in plan.galois_steps):
                layouts.append("single")
        return cls(plan, tuple(layouts), ctx)

    @property
    def tenseal(self) -> Any:
        """The underlying public TenSEAL context (hazmat)."""
        return self._ctx

    @functools.cached_property
    def kit(self) -> ops.SealKit:
        """SEAL evaluator, encoder and keys of this key set (hazmat; built once)."""
        return ops.SealKit(self._ctx)


class SecretContext:
    """The consumer's keys for one plan. Keep it local; share only ``public_keyset_bytes()``."""

    def __init__(self, plan: PublicPlan, ctx: ts.Context, layout: Layout) -> None:
        if not ops.context_is_private(ctx):
            raise HEError("a SecretContext needs a secret key")
        if layout not in plan.layouts:
            raise ValueError(f"layout must be one of {plan.layouts}, got {layout!r}")
        self.plan = plan
        self.layout: Layout = layout
        self._ctx = ctx

    @classmethod
    def generate(cls, plan: PublicPlan, *, layout: Layout = "batch") -> SecretContext:
        """Fresh CKKS keys for ``plan``; ``layout="single"`` also makes the plan's Galois keys."""
        return cls(plan, ops.new_secret_context(plan.params), layout)

    def public_keyset_bytes(self) -> bytes:
        """Public, relinearisation and (layout "single") the plan's Galois keys; no secret key."""
        steps = self.plan.galois_steps if self.layout == "single" else ()
        return ops.public_context_bytes(self._ctx, galois_steps=steps)

    def encrypt(self, x: np.ndarray, *, layout: Layout | None = None) -> bytes:
        """Encrypt samples ``x`` of shape (n, input_dim) into a request frame."""
        layout = layout or self.layout
        x = np.asarray(x, dtype=np.float64)
        d = self.plan.input_dim
        if x.ndim == 1:
            x = x.reshape(1, -1)
        if x.ndim != 2 or x.shape[1] != d or x.shape[0] < 1:
            raise ValueError(f"expected samples of shape (n, {d}), got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("samples must be finite")
        n, s = x.shape[0], self.plan.slots
        blobs: list[bytes] = []
        if layout == "batch":
            for start in range(0, n, s):
                chunk = np.zeros((s, d))
                part = x[start : start + s]
                chunk[: len(part)] = part  # zero padding: never replicated samples
                for j in range(d):
                    blobs.append(ts.ckks_vector(self._ctx, chunk[:, j].tolist()).serialize())
        elif layout == "single":
            for row in x:
                blobs.append(ts.ckks_vector(self._ctx, row.tolist()).serialize())
        else:
            raise ValueError(f"layout must be batch|single, got {layout!r}")
        return wire.make_frame(self.plan, kind=wire.KIND_REQUEST, layout=layout, n_samples=n, blobs=blobs)

    def decrypt_slots(self, response: bytes) -> tuple[wire.Frame, list[np.ndarray]]:
        """Every slot of every result ciphertext (for audits of masking). Raises DecryptionError."""
        frame = wire.decode(response, self.plan, kind=wire.KIND_RESPONSE)
        out: list[np.ndarray] = []
        try:
            for b in frame.blobs:
                out.append(np.asarray(ts.ckks_vector_from(self._ctx, b).decrypt()))
        except Exception as e:
            raise DecryptionError("result did not decrypt") from e
        return frame, out

    def decrypt(self, response: bytes, *, postprocess: bool = True) -> np.ndarray:
        """Outputs of shape (n, output_dim), with the plan's post-processing unless disabled."""
        frame, slots = self.decrypt_slots(response)
        n, k, s = frame.n_samples, self.plan.output_dim, self.plan.slots
        if frame.layout == "batch":
            cols = np.stack(slots, axis=0)  # (chunks*k, s)
            chunks = cols.reshape(-1, k, s).transpose(0, 2, 1).reshape(-1, k)
            logits = chunks[:n]
        else:
            logits = np.stack([v[:k] for v in slots], axis=0)
        return apply_postprocess(logits, self.plan.postprocess) if postprocess else logits

    def to_bytes(self) -> bytes:
        """Local key cache: plan, layout and the full context INCLUDING the secret key."""
        head = json.dumps({"plan": self.plan.to_dict(), "layout": self.layout}).encode()
        body: bytes = self._ctx.serialize(save_secret_key=True, save_galois_keys=False)
        return _SK_MAGIC + struct.pack(">I", len(head)) + head + body

    @classmethod
    def from_bytes(cls, data: bytes) -> SecretContext:
        if not data.startswith(_SK_MAGIC) or len(data) < len(_SK_MAGIC) + 4:
            raise ValueError("not a SecretContext cache")
        (ln,) = struct.unpack_from(">I", data, len(_SK_MAGIC))
        start = len(_SK_MAGIC) + 4
        try:
            head = json.loads(data[start : start + ln])
            ctx = ops.load_context(data[start + ln :])
        except (ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"not a SecretContext cache: {e}") from e
        return cls(PublicPlan.from_dict(head["plan"]), ctx, head["layout"])
