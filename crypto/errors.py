"""Errors raised by the ``crypto`` package.

The tree::

    CryptoError
    ├── InvalidSignature      a signature, note or cosignature did not verify (opaque)
    ├── InvalidProof          an inclusion or consistency proof did not verify (opaque)
    ├── DecryptionError       an envelope, sealed box or ciphertext did not open (opaque)
    ├── KeyError_             a key is missing, malformed or of the wrong kind
    └── HEError               the HE engine or compiler refused a model, context or ciphertext
        └── UnsupportedOperator   an ONNX operator the compiler cannot translate

Verification failures are deliberately opaque: they never say which check failed.
Bad *input* (wrong type, wrong length) is a ``ValueError``/``TypeError`` raised before any work.
"""

from __future__ import annotations

__all__ = [
    "CryptoError",
    "DecryptionError",
    "HEError",
    "InvalidProof",
    "InvalidSignature",
    "KeyMaterialError",
    "UnsupportedOperator",
]


class CryptoError(Exception):
    """Base class of every error raised by ``crypto``."""


class InvalidSignature(CryptoError):
    """A signature did not verify."""


class InvalidProof(CryptoError):
    """A Merkle inclusion or consistency proof did not verify."""


class DecryptionError(CryptoError):
    """Ciphertext could not be decrypted or authenticated."""


class KeyMaterialError(CryptoError):
    """Key material is missing, malformed or of the wrong kind."""


class HEError(CryptoError):
    """The HE engine or model compiler refused its input."""


class UnsupportedOperator(HEError):
    """An ONNX operator (named in the message) that the compiler cannot translate."""

    def __init__(self, op_type: str, node_name: str = "") -> None:
        where = f" (node {node_name!r})" if node_name else ""
        super().__init__(
            f"unsupported ONNX operator {op_type!r}{where}; supported: Gemm, MatMul, Add, Sub, "
            "Mul, Flatten, Identity, Relu, Sigmoid, Tanh"
        )
        self.op_type = op_type
