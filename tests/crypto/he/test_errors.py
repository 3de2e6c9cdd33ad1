"""Clear errors for bad artifacts, dimensions and wire bytes; round trips; parameter choice."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from crypto.errors import HEError, UnsupportedOperator
from crypto.hazmat.tenseal_ops import HE_STANDARD_MAX_LOG_Q, choose_parameters, naf
from crypto.he import (
    CompiledModel,
    PublicContext,
    PublicPlan,
    SecretContext,
    compile_model,
    count_samples,
    evaluate,
    validate_artifact,
    wire,
)


@pytest.fixture(scope="module")
def lr(lr_cancer, cancer):
    return compile_model(lr_cancer, "npz", calibration=cancer[0])


@pytest.fixture(scope="module")
def keys(lr):
    sk = SecretContext.generate(lr.public_plan)
    return sk, PublicContext.from_bytes(sk.public_keyset_bytes(), plan=lr.public_plan)


def _onnx(op, extra_inits=()):
    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node(op, ["h"], ["y"])]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        [w, *extra_inits],
    )
    return helper.make_model(g).SerializeToString()


def test_unsupported_operator_is_named():
    with pytest.raises(UnsupportedOperator, match="'Exp'") as e:
        validate_artifact(_onnx("Exp"), "onnx")
    assert e.value.op_type == "Exp"


def test_validate_artifact_reports_shapes(lr_cancer, mlp_digits):
    info = validate_artifact(_onnx("Sigmoid"), "onnx")
    assert (info.input_dim, info.output_dim, info.postprocess) == (4, 2, "sigmoid")
    assert info.operators == ("MatMul", "Sigmoid")
    info = validate_artifact(mlp_digits, "npz")
    assert info.layer_shapes == ((64, 32), (32, 10)) and info.postprocess == "softmax"


def test_pickle_in_npz_refused():
    buf = io.BytesIO()
    np.savez(buf, **{"layer0.weight": np.array([{"evil": 1}], dtype=object)})
    with pytest.raises(HEError, match="pickle"):
        validate_artifact(buf.getvalue(), "npz")


@pytest.mark.parametrize("frac", [0.1, 0.5, 0.9])
def test_truncated_artifacts_refused(lr_cancer, frac):
    with pytest.raises(HEError):
        validate_artifact(lr_cancer[: int(len(lr_cancer) * frac)], "npz")
    onnx_bytes = _onnx("Sigmoid")
    with pytest.raises(HEError):
        validate_artifact(onnx_bytes[: int(len(onnx_bytes) * frac)], "onnx")


def test_bad_npz_keys_and_shapes(lr_cancer):
    buf = io.BytesIO()
    np.savez(
        buf, **{"layer0.weight": np.ones((2, 3)), "layer0.bias": np.ones(3), "layer0.activation": np.array("none")}
    )
    with pytest.raises(HEError, match="bias"):
        validate_artifact(buf.getvalue(), "npz")
    with pytest.raises(ValueError, match="too large"):
        validate_artifact(lr_cancer, "npz", max_bytes=10)
    with pytest.raises(ValueError, match="fmt"):
        validate_artifact(lr_cancer, "pt")


def test_wrong_dims(lr, keys):
    sk, _ = keys
    with pytest.raises(ValueError, match=r"\(n, 30\)"):
        sk.encrypt(np.ones((2, 29)))
    with pytest.raises(ValueError, match="calibration"):
        compile_model(_lr_bytes(), "npz", calibration=np.ones((5, 7)))


def _lr_bytes():
    buf = io.BytesIO()
    np.savez(
        buf, **{"layer0.weight": np.ones((1, 30)), "layer0.bias": np.ones(1), "layer0.activation": np.array("sigmoid")}
    )
    return buf.getvalue()


def test_malformed_wire_bytes(lr, keys, cancer):
    sk, pub = keys
    req = sk.encrypt(cancer[1][:3])
    assert count_samples(req, lr.public_plan) == 3
    bad = {
        "truncated": req[:-1],
        "trailing": req + b"\x00",
        "header": req[:20],
        "magic": b"X" + req[1:],
        "plan": req[:8] + bytes([req[8] ^ 1]) + req[9:],
        "count": req[:40] + (5000).to_bytes(4, "big") + req[44:],
    }
    for _name, b in bad.items():
        with pytest.raises(ValueError):
            evaluate(lr, pub, b)
        with pytest.raises(ValueError):
            count_samples(b, lr.public_plan)
    # right framing, garbage ciphertext
    f = wire.decode(req, lr.public_plan, kind=wire.KIND_REQUEST)
    junk = wire.make_frame(lr.public_plan, kind=1, layout="batch", n_samples=3, blobs=[b"\x01junk"] * len(f.blobs))
    with pytest.raises(ValueError):
        evaluate(lr, pub, junk)
    with pytest.raises(ValueError):  # a response is not a request
        evaluate(lr, pub, evaluate(lr, pub, req))


def test_round_trips(lr, keys):
    m2 = CompiledModel.from_bytes(lr.to_bytes())
    assert m2.public_plan == lr.public_plan
    assert all(np.array_equal(a.weight, b.weight) for a, b in zip(m2.layers, lr.layers, strict=True))
    assert PublicPlan.from_json(lr.public_plan.to_json()) == lr.public_plan
    with pytest.raises(HEError):
        CompiledModel.from_bytes(b"not a model")
    with pytest.raises(ValueError):
        PublicPlan.from_json('{"version": 99}')


def test_too_deep_is_refused():
    with pytest.raises(ValueError, match="depth 60"):
        choose_parameters(60)


@given(st.integers(min_value=1, max_value=20))
def test_parameters_fit_the_standard(depth):
    p = choose_parameters(depth)
    assert p.depth == depth
    assert p.log_q <= HE_STANDARD_MAX_LOG_Q[p.poly_modulus_degree]
    assert all(b <= 60 for b in p.coeff_mod_bit_sizes)


@given(st.integers(min_value=1, max_value=1 << 14))
def test_naf_sums_to_step(n):
    digits = naf(n)
    assert sum(digits) == n
    assert all(abs(d) & (abs(d) - 1) == 0 for d in digits)


@settings(max_examples=30)
@given(st.lists(st.binary(min_size=1, max_size=50), min_size=1, max_size=5), st.integers(1, 5))
def test_wire_roundtrip(blobs, n):
    plan = PublicPlan(8192, (60, 40, 60), 40, 3, 1, (3, 1), (), 1, ())
    frame = wire.make_frame(plan, kind=2, layout="single", n_samples=len(blobs), blobs=blobs)
    got = wire.decode(frame, plan, kind=2)
    assert got.blobs == tuple(blobs) and got.n_samples == len(blobs)
