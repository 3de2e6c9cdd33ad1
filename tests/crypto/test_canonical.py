"""crypto.canonical: the json fast path gives exactly the rfc8785 package's bytes (RFC 8785)."""

from __future__ import annotations

import json

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.canonical import canonical_digest, canonicalize

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_fast_path_agrees_with_rfc8785(value: object) -> None:
    try:
        want = rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError):
        with pytest.raises(ValueError):
            canonicalize(value)
        return
    assert canonicalize(value) == want


def test_rfc8785_examples() -> None:
    # RFC 8785 §3.2.3 sorting example keys (UTF-16 order differs from code points above U+D800).
    value = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    keys = list(json.loads(canonicalize(value)).keys())
    assert keys == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    assert canonicalize({"numbers": [333333333.33333329, 1e30, 4.50, 2e-3, 1e-27]}) == (
        b'{"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27]}'
    )
    assert canonicalize({"b": 1, "a": "x\n\u2028"}) == b'{"a":"x\\n\xe2\x80\xa8","b":1}'
    assert canonical_digest({}) == "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


def test_unrepresentable_values_are_value_errors() -> None:
    for bad in (float("nan"), {1: "x"}, b"bytes", "\ud800", 2**60):
        with pytest.raises(ValueError):
            canonicalize(bad)
