"""crypto.merkle against the naive RFC 9162 reference (tests/crypto/naive_merkle.py).

Exhaustive for small sizes, Hypothesis for larger ones: plan-based proofs equal the naive
PATH/PROOF, verify, and the compact range reports exactly the perfect subtrees.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import merkle as m
from crypto.errors import InvalidProof
from tests.crypto import naive_merkle as naive

MAX = 300
DATA = [f"entry-{i}".encode() for i in range(MAX)]
TREE = m.MerkleTree(DATA)
EXHAUSTIVE = 64


@pytest.fixture(scope="module")
def naive_roots() -> list[bytes]:
    return [naive.mth(DATA[:n]) for n in range(MAX + 1)]


def test_roots_every_size(naive_roots):
    cr = m.CompactRange()
    for n in range(MAX + 1):
        assert TREE.root(n) == naive_roots[n]
        assert cr.root() == naive_roots[n]
        if n < MAX:
            cr.append(m.leaf_hash(DATA[n]))


def test_inclusion_exhaustive_small(naive_roots):
    for size in range(1, EXHAUSTIVE + 1):
        for index in range(size):
            proof = TREE.inclusion_proof(index, size)
            assert proof == naive.path(index, DATA[:size])
            m.verify_inclusion(TREE.leaf_hash(index), index, size, proof, naive_roots[size])


def test_consistency_exhaustive_small(naive_roots):
    for size2 in range(1, EXHAUSTIVE + 1):
        for size1 in range(1, size2 + 1):
            proof = TREE.consistency_proof(size1, size2)
            assert proof == naive.proof(size1, DATA[:size2])
            m.verify_consistency(size1, size2, proof, naive_roots[size1], naive_roots[size2])


@st.composite
def index_and_size(draw):
    size = draw(st.integers(1, MAX))
    return draw(st.integers(0, size - 1)), size


@st.composite
def two_sizes(draw):
    size2 = draw(st.integers(1, MAX))
    return draw(st.integers(1, size2)), size2


@settings(max_examples=300, deadline=None)
@given(index_and_size())
def test_inclusion_matches_naive(args):
    index, size = args
    proof = TREE.inclusion_proof(index, size)
    assert proof == naive.path(index, DATA[:size])
    root = naive.mth(DATA[:size])
    m.verify_inclusion(m.leaf_hash(DATA[index]), index, size, proof, root)
    assert m.root_from_inclusion_proof(m.leaf_hash(DATA[index]), index, size, proof) == root


@settings(max_examples=300, deadline=None)
@given(two_sizes())
def test_consistency_matches_naive(args):
    size1, size2 = args
    proof = TREE.consistency_proof(size1, size2)
    assert proof == naive.proof(size1, DATA[:size2])
    m.verify_consistency(size1, size2, proof, naive.mth(DATA[:size1]), naive.mth(DATA[:size2]))


@settings(max_examples=200, deadline=None)
@given(index_and_size(), st.integers(0, 255), st.data())
def test_any_bit_flip_in_inclusion_proof_rejected(args, bit, data):
    index, size = args
    proof = TREE.inclusion_proof(index, size)
    root = TREE.root(size)
    leaf = TREE.leaf_hash(index)
    target = data.draw(st.integers(-2, len(proof) - 1))
    if target == -2:
        root = _flip(root, bit)
    elif target == -1:
        leaf = _flip(leaf, bit)
    else:
        proof[target] = _flip(proof[target], bit)
    with pytest.raises(InvalidProof):
        m.verify_inclusion(leaf, index, size, proof, root)


@settings(max_examples=200, deadline=None)
@given(two_sizes(), st.integers(0, 255), st.data())
def test_any_bit_flip_in_consistency_proof_rejected(args, bit, data):
    size1, size2 = args
    if size1 == size2:
        size1 = max(1, size1 - 1)
    if size1 == size2:
        return
    proof = TREE.consistency_proof(size1, size2)
    r1, r2 = TREE.root(size1), TREE.root(size2)
    target = data.draw(st.integers(-2, len(proof) - 1))
    if target == -2:
        r1 = _flip(r1, bit)
    elif target == -1:
        r2 = _flip(r2, bit)
    else:
        proof[target] = _flip(proof[target], bit)
    with pytest.raises(InvalidProof):
        m.verify_consistency(size1, size2, proof, r1, r2)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, MAX))
def test_plans_fetch_perfect_subtrees_that_exist(size):
    # Every node a plan asks for is a complete perfect subtree of the tree of `size`.
    plans = [m.root_plan(size)]
    if size:
        plans += [m.inclusion_plan(size // 2, size), m.consistency_plan(max(1, size // 3), size)]
    for plan in plans:
        for node in plan.ids:
            assert node.end <= size
            assert TREE.node(node) == naive.mth(DATA[node.begin : node.end])


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 200), st.integers(0, 200))
def test_compact_range_reports_each_subtree_once(n, extra):
    seen: list[tuple[m.NodeId, bytes]] = []
    cr = m.CompactRange()
    for d in DATA[:n]:
        cr.append(m.leaf_hash(d), on_node=lambda node, h: seen.append((node, h)))
    nodes = [node for node, _ in seen]
    assert len(nodes) == len(set(nodes))
    expected = {m.NodeId(level, i) for level in range(9) for i in range(n >> level) if n >> level}
    assert set(nodes) == expected
    for node, h in seen:
        assert h == naive.mth(DATA[node.begin : node.end])
    # Restoring from the persisted frontier continues identically.
    restored = m.CompactRange(cr.size, cr.hashes)
    for d in DATA[n : n + extra]:
        restored.append(m.leaf_hash(d))
    assert restored.root() == naive.mth(DATA[: min(MAX, n + extra)])


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10**12), st.integers(0, 10**12))
def test_range_nodes_cover_exactly(a, b):
    begin, end = min(a, b), max(a, b)
    nodes = m.range_nodes(begin, end)
    pos = begin
    for node in nodes:
        assert node.begin == pos
        pos = node.end
    assert pos == end
    assert len(nodes) <= 2 * 41


def _flip(b: bytes, bit: int) -> bytes:
    out = bytearray(b)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)
