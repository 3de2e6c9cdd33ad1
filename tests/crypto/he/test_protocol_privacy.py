"""Roles across a bytes-only boundary, and circuit privacy (docs/design.md §9)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tenseal as ts

from crypto.errors import HEError
from crypto.he import (
    CompiledModel,
    PublicContext,
    PublicPlan,
    SecretContext,
    compile_model,
    evaluate,
)
from crypto.he.compiler import CompiledLayer
from crypto.he.wire import count_samples


@pytest.fixture(scope="module")
def lr(lr_cancer, cancer):
    return compile_model(lr_cancer, "npz", calibration=cancer[0])


def test_protocol_owner_server_consumer_bytes_only(tmp_path, lr, cancer):
    owner, server, consumer = (tmp_path / d for d in ("owner", "server", "consumer"))
    for d in (owner, server, consumer):
        d.mkdir()
    (owner / "model.bin").write_bytes(lr.to_bytes())
    (owner / "plan.json").write_text(lr.public_plan.to_json())
    # consumer sees only the public plan
    plan = PublicPlan.from_json((owner / "plan.json").read_text())
    sk = SecretContext.generate(plan)
    (consumer / "sk.bin").write_bytes(sk.to_bytes())
    (server / "keyset.bin").write_bytes(sk.public_keyset_bytes())
    (server / "req.bin").write_bytes(sk.encrypt(cancer[1][:7]))
    # server: weights + public key set + request, all from bytes
    model = CompiledModel.from_bytes((owner / "model.bin").read_bytes())
    pub = PublicContext.from_bytes((server / "keyset.bin").read_bytes(), plan=model.public_plan)
    assert not pub.tenseal.is_private()
    req = (server / "req.bin").read_bytes()
    assert count_samples(req, model.public_plan) == 7
    (consumer / "resp.bin").write_bytes(evaluate(model, pub, req))
    # nothing the server holds can decrypt
    for f in server.iterdir():
        with pytest.raises((HEError, ValueError)):
            ctx = ts.context_from(f.read_bytes())
            if not ctx.is_private():
                raise HEError("public")
    sk2 = SecretContext.from_bytes((consumer / "sk.bin").read_bytes())
    probs = sk2.decrypt((consumer / "resp.bin").read_bytes())
    ref = 1 / (1 + np.exp(-lr.predict_plain(cancer[1][:7])))
    assert np.abs(probs - ref).max() < 2.0**-8


def test_secret_bearing_context_is_refused(lr):
    sk = SecretContext.generate(lr.public_plan)
    with pytest.raises(HEError, match="secret key"):
        PublicContext.from_bytes(sk._ctx.serialize(save_secret_key=True), plan=lr.public_plan)


def test_mismatched_parameters_refused(lr, mlp_digits, digits):
    other = compile_model(mlp_digits, "npz", calibration=digits[0], min_scale_bits=30).public_plan
    assert other.coeff_mod_bit_sizes != lr.public_plan.coeff_mod_bit_sizes
    sk = SecretContext.generate(other)
    with pytest.raises(HEError, match="do not match"):
        PublicContext.from_bytes(sk.public_keyset_bytes(), plan=lr.public_plan)


def test_single_layout_needs_galois_keys(lr, cancer):
    sk = SecretContext.generate(lr.public_plan, layout="batch")
    pub = PublicContext.from_bytes(sk.public_keyset_bytes(), plan=lr.public_plan)
    assert pub.layouts == ("batch",)
    with pytest.raises(HEError, match="Galois"):
        evaluate(lr, pub, sk.encrypt(cancer[1][:1], layout="single"))


@pytest.fixture(scope="module")
def session(lr, cancer):
    sk = SecretContext.generate(lr.public_plan)
    pub = PublicContext.from_bytes(sk.public_keyset_bytes(), plan=lr.public_plan)
    return sk, pub, sk.encrypt(cancer[1][:50])


def test_two_evaluations_differ(lr, session):
    sk, pub, req = session
    a, b = evaluate(lr, pub, req), evaluate(lr, pub, req)
    _, sa = sk.decrypt_slots(a)
    _, sb = sk.decrypt_slots(b)
    assert a != b
    # the flooding noise differs in every slot
    assert np.all(sa[0] != sb[0])
    # byte-level: after the header the serializations differ almost everywhere
    n = min(len(a), len(b))
    diff = np.frombuffer(a[200:n], np.uint8) != np.frombuffer(b[200:n], np.uint8)
    assert diff.mean() > 0.95


def test_padding_slots_show_only_noise(lr, session):
    sk, pub, req = session
    _, slots = sk.decrypt_slots(evaluate(lr, pub, req))
    pad = slots[0][50:]
    sigma = 2.0**-lr.public_plan.noise_bits
    assert np.abs(pad).max() < 8 * sigma
    assert 0.8 * sigma < pad.std() < 1.2 * sigma  # flooding is present and of the stated size


def _perturbed(model, delta):
    layer = model.layers[0]
    w = layer.weight.copy()
    w[0, 0] += delta
    return CompiledModel((CompiledLayer(w, layer.bias, layer.activation, layer.coeffs),), model.public_plan)


def test_replay_attacker_learns_weights_only_without_defence(lr, session, caplog):
    """The consumer knows the architecture and two candidate weight vectors that differ by 2^-20
    (far below the promised output precision) and recomputes the evaluation with the public
    context. Without the defence the result ciphertext pins down the true weights; with it,
    neither candidate matches."""
    _, pub, req = session
    candidates = {"true": lr, "other": _perturbed(lr, 2.0**-20)}
    with caplog.at_level(logging.WARNING):
        leaked = evaluate(lr, pub, req, unsafe_no_circuit_privacy=True)
    assert "unsafe_no_circuit_privacy" in caplog.text
    guess = [k for k, m in candidates.items() if evaluate(m, pub, req, unsafe_no_circuit_privacy=True) == leaked]
    assert guess == ["true"]
    protected = evaluate(lr, pub, req)
    guess = [k for k, m in candidates.items() if evaluate(m, pub, req, unsafe_no_circuit_privacy=True) == protected]
    assert guess == []
    guess = [k for k, m in candidates.items() if evaluate(m, pub, req) == protected]
    assert guess == []
