"""Evaluate a compiled model on an encrypted request, at the compute site.

For: ``evaluate(model, ctx, request) -> response`` where both are ``crypto.he.wire`` frames;
the compute site holds the weights and a ``PublicContext`` (never a secret key). Results are
masked (non-output slots zero, folded into the last multiply), re-randomised and flooded before
serialization (``crypto.he.privacy``). Not for: key generation or decryption.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import OrderedDict
from typing import Any

from crypto.errors import HEError
from crypto.hazmat import tenseal_ops as ops
from crypto.he import circuit, privacy, wire
from crypto.he.compiler import CompiledModel
from crypto.he.context import PublicContext

__all__ = ["evaluate"]

log = logging.getLogger(__name__)

PROGRAM_CACHE_SIZE = 8
_programs: OrderedDict[tuple[int, str], tuple[weakref.ref[CompiledModel], circuit.SingleProgram]] = OrderedDict()
_programs_lock = threading.Lock()


def _single_program(model: CompiledModel, ctx: PublicContext, primes: tuple[int, ...]) -> circuit.SingleProgram:
    """The model's single-layout diagonals, encoded once per (model, plan) and kept in memory."""
    plan = model.public_plan
    key = (id(model), plan.digest())
    with _programs_lock:
        hit = _programs.get(key)
        if hit is not None and hit[0]() is model:
            _programs.move_to_end(key)
            return hit[1]
    prog = circuit.single_program(model.layers, ctx.kit, slots=plan.slots, primes=primes, scale_bits=plan.scale_bits)
    with _programs_lock:
        _programs[key] = (weakref.ref(model), prog)
        while len(_programs) > PROGRAM_CACHE_SIZE:
            _programs.popitem(last=False)
    return prog


def _load(ctx: Any, blobs: tuple[bytes, ...], *, size: int, n_primes: int) -> list[Any]:
    out = []
    for i, b in enumerate(blobs):
        v = ops.load_vector(ctx, b)
        cts = v.ciphertext()
        if v.size() != size or len(cts) != 1:
            raise ValueError(f"ciphertext {i}: expected a vector of {size} slots, got {v.size()}")
        ct = cts[0]
        if ct.size() != 2 or ct.coeff_modulus_size() != n_primes:
            raise ValueError(
                f"ciphertext {i}: expected a fresh 2-component ciphertext at {n_primes} primes, "
                f"got {ct.size()} components at {ct.coeff_modulus_size()} primes"
            )
        out.append(v)
    return out


def evaluate(
    model: CompiledModel,
    ctx: PublicContext,
    request: bytes,
    *,
    rng: privacy.Rng | None = None,
    unsafe_no_circuit_privacy: bool = False,
) -> bytes:
    """Run ``model`` on an encrypted request frame; return the response frame.

    ``rng(nbytes) -> bytes`` feeds the flooding noise (default ``os.urandom``).
    Raises TypeError/ValueError for malformed requests (before HE work), HEError if the
    context, plan and layout do not fit together.
    """
    if not isinstance(model, CompiledModel) or not isinstance(ctx, PublicContext):
        raise TypeError("expected a CompiledModel and a PublicContext")
    plan = model.public_plan
    if ctx.plan.digest() != plan.digest():
        raise HEError("key set was registered for a different plan")
    frame = wire.decode(request, plan, kind=wire.KIND_REQUEST)
    if frame.layout not in ctx.layouts:
        raise HEError(f"key set does not support layout {frame.layout!r} (missing Galois keys)")
    if unsafe_no_circuit_privacy:
        log.warning("unsafe_no_circuit_privacy: result ciphertexts are NOT re-randomised or flooded")
    tctx = ctx.tenseal
    s = plan.slots
    fresh_primes = len(plan.coeff_mod_bit_sizes) - 1
    primes = ops.data_primes(tctx)
    if len(model.layers) == 0:
        raise HEError("model has no layers")
    kit = ctx.kit
    results: list[Any] = []  # SEAL ciphertexts
    if frame.layout == "batch":
        xs = _load(tctx, frame.blobs, size=s, n_primes=fresh_primes)
        d = plan.input_dim
        for c in range(len(xs) // d):
            n_valid = min(s, frame.n_samples - c * s)
            outs = circuit.run_batch(
                model.layers,
                xs[c * d : (c + 1) * d],
                n_valid=n_valid,
                slots=s,
                primes=primes,
                scale_bits=plan.scale_bits,
            )
            results.extend(ops.seal_ciphertext(v) for v in outs)
    else:
        xs = _load(tctx, frame.blobs, size=plan.input_dim, n_primes=fresh_primes)
        prog = _single_program(model, ctx, primes)
        results = [circuit.run_single_program(prog, kit, ops.seal_ciphertext(x)) for x in xs]
    if not unsafe_no_circuit_privacy:
        sigma = 2.0**-plan.noise_bits
        results = [privacy.sanitize_seal(c, kit, sigma=sigma, rng=rng or os.urandom) for c in results]
    blobs = [ops.vector_bytes(c, size=s, scale=kit.scale) for c in results]
    return wire.make_frame(plan, kind=wire.KIND_RESPONSE, layout=frame.layout, n_samples=frame.n_samples, blobs=blobs)
