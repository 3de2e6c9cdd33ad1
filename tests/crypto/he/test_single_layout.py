"""The single-query layout: baby-step/giant-step diagonal products on one ciphertext per sample.

Checked against the plaintext network (several shapes, including a degree-2 activation whose x
and x^2 terms sit at different levels), against the batch layout, and for circuit privacy
(every non-output slot carries only flooding noise; two evaluations differ in every slot).
"""

from __future__ import annotations

import numpy as np
import pytest

from crypto.he import PublicContext, SecretContext, compile_model, evaluate
from crypto.he.circuit import single_steps

from .conftest import npz_bytes


def _keys(model):
    sk = SecretContext.generate(model.public_plan, layout="single")
    pub = PublicContext.from_bytes(sk.public_keyset_bytes(), plan=model.public_plan)
    assert pub.layouts == ("batch", "single")
    return sk, pub


@pytest.mark.parametrize(
    ("dims", "acts"),
    [((5, 3), ("none",)), ((17, 9, 2), ("relu", "none")), ((12, 7, 4), ("square", "softmax"))],
)
def test_single_layout_matches_plaintext(dims, acts):
    rng = np.random.default_rng(len(dims) * 100 + dims[0])
    layers = [
        (rng.normal(0, 0.4, (dims[i + 1], dims[i])), rng.normal(0, 0.1, dims[i + 1]), acts[i])
        for i in range(len(dims) - 1)
    ]
    cal = rng.uniform(-1, 1, (200, dims[0]))
    model = compile_model(npz_bytes(layers), "npz", calibration=cal)
    sk, pub = _keys(model)
    x = cal[:3]
    out = sk.decrypt(evaluate(model, pub, sk.encrypt(x, layout="single")), postprocess=False)
    assert np.abs(out - model.predict_plain(x)).max() < 2.0**-model.public_plan.precision_bits


def test_plan_lists_the_exact_rotation_steps():
    # a 64-32-10 network: baby steps 1..7 and giant steps 8..56 (g = 8), shared by both layers
    assert single_steps((64, 32, 10)) == [*range(1, 8), *range(8, 64, 8)]
    # ~2 sqrt(d) rotations instead of d: a 30-feature dot product needs 9 keys, not 29 steps
    assert len(single_steps((30, 1))) <= 2 * 6


def test_digits_mlp_single_matches_batch(mlp_digits, digits):
    xtr, xte, _, _ = digits
    model = compile_model(mlp_digits, "npz", calibration=xtr)
    sk, pub = _keys(model)
    x = xte[:2]
    single = sk.decrypt(evaluate(model, pub, sk.encrypt(x, layout="single")), postprocess=False)
    batch = sk.decrypt(evaluate(model, pub, sk.encrypt(x, layout="batch")), postprocess=False)
    bound = 2.0**-model.public_plan.precision_bits
    assert np.abs(single - model.predict_plain(x)).max() < bound
    assert np.abs(single - batch).max() < bound
    assert np.array_equal(single.argmax(1), batch.argmax(1))


def test_single_layout_result_is_masked_and_flooded(lr_cancer, cancer):
    model = compile_model(lr_cancer, "npz", calibration=cancer[0])
    sk, pub = _keys(model)
    req = sk.encrypt(cancer[1][:1], layout="single")
    _, (a,) = sk.decrypt_slots(evaluate(model, pub, req))
    _, (b,) = sk.decrypt_slots(evaluate(model, pub, req))
    sigma = 2.0**-model.public_plan.noise_bits
    assert len(a) == model.public_plan.slots
    assert abs(a[0] - model.predict_plain(cancer[1][:1])[0, 0]) < 2.0**-model.public_plan.precision_bits
    pad = a[1:]  # partial sums of the dot product would show here without the mask
    assert np.abs(pad).max() < 8 * sigma
    assert 0.8 * sigma < pad.std() < 1.2 * sigma
    assert np.all(a != b)


def test_auto_layout_single_for_one_sample_batch_for_many(lr_cancer, mlp_digits, cancer, digits):
    from crypto.he import choose_layout, layout_cost

    for data, cal in ((lr_cancer, cancer[0]), (mlp_digits, digits[0])):
        plan = compile_model(data, "npz", calibration=cal).public_plan
        assert choose_layout(plan, 1) == "single"
        assert choose_layout(plan, plan.slots) == "batch"
        # batch cost is flat up to a full ciphertext, single grows with every sample
        assert layout_cost(plan, "batch", 1) == layout_cost(plan, "batch", plan.slots)
        assert layout_cost(plan, "single", 2) == 2 * layout_cost(plan, "single", 1)
    with pytest.raises(ValueError, match="n_samples"):
        choose_layout(plan, 0)
