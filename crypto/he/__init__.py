"""Homomorphic-encryption (CKKS, TenSEAL) inference: compiler, key roles, evaluation.

For: a provider compiling a model (``compile_model``, ``validate_artifact``), a consumer making
keys and encrypting/decrypting (``SecretContext``), and a compute site evaluating on
ciphertexts with only a consumer's public key set (``PublicContext``, ``evaluate``).
Not for: transport, storage or metering (the marketplace does that; ``wire.count_samples``
tells it how many samples a request carries). See docs/he.md.
"""

from __future__ import annotations

from crypto.he.compiler import (
    ArtifactInfo,
    CompiledModel,
    ParameterSearch,
    ParameterTrial,
    compile_model,
    validate_artifact,
)
from crypto.he.context import PublicContext, SecretContext, apply_postprocess
from crypto.he.evaluate import evaluate
from crypto.he.layouts import choose_layout, layout_cost
from crypto.he.plan import PublicPlan
from crypto.he.report import HEModelCard, compile_report
from crypto.he.wire import count_samples

__all__ = [
    "ArtifactInfo",
    "CompiledModel",
    "HEModelCard",
    "ParameterSearch",
    "ParameterTrial",
    "PublicContext",
    "PublicPlan",
    "SecretContext",
    "apply_postprocess",
    "choose_layout",
    "compile_model",
    "compile_report",
    "count_samples",
    "evaluate",
    "layout_cost",
    "validate_artifact",
]
