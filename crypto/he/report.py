"""The compile report ("HE model card"): cost, security and accuracy of a compiled model.

For: telling providers and consumers what the HE version of a model costs and how close it is
to the plaintext model, measured by actually generating keys, encrypting the calibration data,
evaluating (with circuit privacy on) and decrypting. Not for: production inference.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from crypto.he.compiler import CompiledModel
from crypto.he.context import PublicContext, SecretContext
from crypto.he.evaluate import evaluate

__all__ = ["HEModelCard", "compile_report"]


@dataclass(frozen=True)
class HEModelCard:
    depth: int
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    security_bits: int
    keyset_bytes_batch: int
    request_bytes_per_sample: float
    response_bytes_per_sample: float
    samples: int
    encrypt_seconds: float
    evaluate_seconds: float
    decrypt_seconds: float
    throughput_samples_per_s: float
    argmax_agreement: float  # HE vs the original (exact-activation) plaintext model
    max_abs_error_vs_polynomial: float  # HE vs the same polynomial network in plaintext
    max_abs_error_vs_exact: float
    promised_precision: float
    flood_sigma: float
    # the compiler's measured parameter search (None for hand-built models)
    compile_max_abs_error: float | None = None  # chosen parameters, no flooding, calibration sample
    requested_precision_bits: int | None = None
    parameter_search: dict[str, Any] | None = None  # ParameterSearch.to_dict(): every candidate tried

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        return d


def _labels(logits: np.ndarray) -> np.ndarray:
    if logits.shape[1] == 1:
        return np.asarray(logits[:, 0] > 0)
    return np.asarray(logits.argmax(axis=1))


def compile_report(model: CompiledModel, calibration: np.ndarray) -> HEModelCard:
    """Measure ``model`` end to end on ``calibration`` (batch layout)."""
    plan = model.public_plan
    x = np.asarray(calibration, dtype=np.float64)
    sk = SecretContext.generate(plan, layout="batch")
    keyset = sk.public_keyset_bytes()
    pub = PublicContext.from_bytes(keyset, plan=plan)
    t0 = time.perf_counter()
    req = sk.encrypt(x)
    t1 = time.perf_counter()
    resp = evaluate(model, pub, req)
    t2 = time.perf_counter()
    he = sk.decrypt(resp, postprocess=False)
    t3 = time.perf_counter()
    poly = model.predict_plain(x)
    exact = model.predict_plain(x, exact=True)
    n = x.shape[0]
    return HEModelCard(
        depth=plan.depth,
        poly_modulus_degree=plan.poly_modulus_degree,
        coeff_mod_bit_sizes=plan.coeff_mod_bit_sizes,
        scale_bits=plan.scale_bits,
        security_bits=plan.security_bits,
        keyset_bytes_batch=len(keyset),
        request_bytes_per_sample=len(req) / n,
        response_bytes_per_sample=len(resp) / n,
        samples=n,
        encrypt_seconds=t1 - t0,
        evaluate_seconds=t2 - t1,
        decrypt_seconds=t3 - t2,
        throughput_samples_per_s=n / (t3 - t0),
        argmax_agreement=float(np.mean(_labels(he) == _labels(exact))),
        max_abs_error_vs_polynomial=float(np.abs(he - poly).max()),
        max_abs_error_vs_exact=float(np.abs(he - exact).max()),
        promised_precision=2.0**-plan.precision_bits,
        flood_sigma=2.0**-plan.noise_bits,
        compile_max_abs_error=model.search.chosen.max_abs_error if model.search else None,
        requested_precision_bits=model.search.requested_precision_bits if model.search else None,
        parameter_search=model.search.to_dict() if model.search else None,
    )
