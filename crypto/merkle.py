"""RFC 9162 §2.1 Merkle tree hashing, proof generation plans and proof verification.

For: the ledger's append-only log. Leaf and node hashing (RFC 9162 §2.1.1), storage-agnostic
proof *plans* that say which perfect-subtree nodes to read from storage and how to fold them into
an inclusion (§2.1.3) or consistency (§2.1.4) proof, a compact range (the tree's right frontier)
for O(log n) appends, verification of both proof kinds, and a small in-memory tree.

Not for: signing tree heads (see :mod:`crypto.checkpoint`), storage (the caller reads and writes
nodes), or sparse/map trees.

Vocabulary: a *perfect subtree* ``NodeId(level, index)`` covers leaves
``[index * 2**level, (index + 1) * 2**level)``. A tree of any size is a sequence of such
subtrees, one per set bit of its size, largest first. Proof generation follows the same shape as
transparency-dev/merkle ``proof.Inclusion``/``proof.Consistency``: every proof element is either
a perfect subtree node or one *ephemeral* node on the right border, which is folded from the
perfect subtrees that cover it.

Verification raises :class:`crypto.errors.InvalidProof` for every failure, without saying which
check failed. Arguments of the wrong *type* raise ``TypeError`` before any work.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from crypto.errors import InvalidProof

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "MerkleTree",
    "NodeId",
    "ProofPlan",
    "consistency_plan",
    "inclusion_plan",
    "leaf_hash",
    "node_hash",
    "range_nodes",
    "root_from_inclusion_proof",
    "root_plan",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
_sha256 = hashlib.sha256

# RFC 9162 §2.1.1: MTH({}) = SHA-256()
EMPTY_ROOT: bytes = _sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 §2.1.1: ``MTH({d}) = SHA-256(0x00 || d)``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"leaf data must be bytes, got {type(data).__name__}")
    return _sha256(b"\x00" + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 §2.1.1: ``SHA-256(0x01 || left || right)``."""
    if not isinstance(left, bytes) or not isinstance(right, bytes):
        raise TypeError(f"node children must be bytes, got {type(left).__name__}, {type(right).__name__}")
    return _sha256(b"\x01" + left + right).digest()


@dataclass(frozen=True, order=True)
class NodeId:
    """A perfect subtree covering leaves ``[index * 2**level, (index + 1) * 2**level)``."""

    level: int
    index: int

    def __post_init__(self) -> None:
        if type(self.level) is not int or type(self.index) is not int:
            raise TypeError("NodeId level and index must be int")
        if self.level < 0 or self.index < 0:
            raise ValueError(f"NodeId needs level >= 0 and index >= 0, got {self.level}, {self.index}")

    @property
    def begin(self) -> int:
        return self.index << self.level

    @property
    def end(self) -> int:
        return (self.index + 1) << self.level

    def sibling(self) -> NodeId:
        return NodeId(self.level, self.index ^ 1)

    def parent(self) -> NodeId:
        return NodeId(self.level + 1, self.index >> 1)


def _check_size(name: str, value: object) -> int:
    if type(value) is not int:
        raise TypeError(f"{name} must be int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def range_nodes(begin: int, end: int) -> list[NodeId]:
    """The minimal perfect subtrees covering leaves ``[begin, end)``, left to right.

    Levels first increase (alignment of ``begin``) then decrease (bits of what is left).
    """
    _check_size("begin", begin)
    _check_size("end", end)
    if begin > end:
        raise ValueError(f"range needs begin <= end, got [{begin}, {end})")
    out: list[NodeId] = []
    while begin < end:
        # Largest aligned block starting at `begin` that fits before `end`.
        level = (begin & -begin).bit_length() - 1 if begin else (end - begin).bit_length() - 1
        while begin + (1 << level) > end:
            level -= 1
        out.append(NodeId(level, begin >> level))
        begin += 1 << level
    return out


@dataclass(frozen=True)
class ProofPlan:
    """Which stored nodes to read (``ids``) and how to fold them (:meth:`rehash`) into a proof.

    ``ids[_begin:_end]`` are the perfect subtrees under the ephemeral right-border node, ordered
    from the lowest level up; :meth:`rehash` replaces them with their folded hash. For a
    :func:`root_plan` the fold yields the single root hash (``EMPTY_ROOT`` for size 0).
    """

    ids: tuple[NodeId, ...]
    _begin: int = 0
    _end: int = 0
    _empty: bytes | None = field(default=None, repr=False)

    def rehash(self, hashes: Sequence[bytes]) -> list[bytes]:
        """Fold the hashes of ``ids`` (same order) into the proof (or ``[root]``)."""
        if len(hashes) != len(self.ids):
            raise ValueError(f"expected {len(self.ids)} hashes, got {len(hashes)}")
        for h in hashes:
            if not isinstance(h, bytes) or len(h) != HASH_SIZE:
                raise ValueError(f"each hash must be {HASH_SIZE} bytes")
        if not self.ids and self._empty is not None:
            return [self._empty]
        out = list(hashes[: self._begin])
        if self._begin < self._end:
            acc = hashes[self._begin]
            for h in hashes[self._begin + 1 : self._end]:
                acc = _sha256(b"\x01" + h + acc).digest()
            out.append(acc)
        out.extend(hashes[self._end :])
        return out


def _path_nodes(index: int, level: int, size: int) -> tuple[list[NodeId], int, int]:
    """Nodes proving (level, index) is in the tree of ``size``: seed, inner siblings,
    ephemeral-node parts (ascending), then left border nodes (ascending). Returns
    (ids, begin, end) with ids[begin:end] the ephemeral parts.
    """
    # Where the path to (level, index) leaves the path to the right border.
    inner = (index ^ (size >> level)).bit_length() - 1
    fork = NodeId(level + inner, index >> inner)
    ids = [NodeId(level, index)]
    node = ids[0]
    while node.level < fork.level:
        ids.append(node.sibling())
        node = node.parent()
    first = len(ids)
    ids.extend(reversed(range_nodes(fork.end, size)))
    last = len(ids)
    ids.extend(reversed(range_nodes(0, fork.begin)))
    if last - first < 1:
        first = last = 0
    return ids, first, last


def _skip_first(ids: list[NodeId], begin: int, end: int) -> ProofPlan:
    if begin < end:
        begin, end = begin - 1, end - 1
    return ProofPlan(tuple(ids[1:]), begin, end)


def inclusion_plan(index: int, size: int) -> ProofPlan:
    """Plan for the RFC 9162 §2.1.3.1 inclusion proof of leaf ``index`` in a tree of ``size``.

    Requires ``0 <= index < size`` (``ValueError`` otherwise).
    """
    _check_size("index", index)
    _check_size("size", size)
    if index >= size:
        raise ValueError(f"index must be < size, got index {index}, size {size}")
    ids, b, e = _path_nodes(index, 0, size)
    return _skip_first(ids, b, e)


def consistency_plan(size1: int, size2: int) -> ProofPlan:
    """Plan for the RFC 9162 §2.1.4.1 consistency proof between sizes ``size1`` and ``size2``.

    Requires ``0 < size1 <= size2`` (``ValueError`` otherwise); equal sizes give an empty proof.
    """
    _check_size("size1", size1)
    _check_size("size2", size2)
    if size1 == 0 or size1 > size2:
        raise ValueError(f"consistency needs 0 < size1 <= size2, got {size1}, {size2}")
    if size1 == size2:
        return ProofPlan(())
    # The largest perfect subtree ending at size1 is the seed; it is part of the proof
    # unless size1 is itself a power of two (then the verifier already knows it: root1).
    level = (size1 & -size1).bit_length() - 1
    ids, b, e = _path_nodes((size1 - 1) >> level, level, size2)
    if size1 & (size1 - 1) == 0:
        return _skip_first(ids, b, e)
    return ProofPlan(tuple(ids), b, e)


def root_plan(size: int) -> ProofPlan:
    """Plan for the root hash ``MTH(D[0:size])``: :meth:`ProofPlan.rehash` returns ``[root]``."""
    _check_size("size", size)
    ids = tuple(reversed(range_nodes(0, size)))
    return ProofPlan(ids, 0, len(ids), EMPTY_ROOT)


# ---------------------------------------------------------------------------- verification


def _hash_list(name: str, proof: object) -> list[bytes]:
    if isinstance(proof, (bytes, str)) or not isinstance(proof, Sequence):
        raise TypeError(f"{name} must be a sequence of bytes, got {type(proof).__name__}")
    out = list(proof)
    for p in out:
        if not isinstance(p, bytes):
            raise TypeError(f"{name} elements must be bytes, got {type(p).__name__}")
    return out


def _bytes(name: str, value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
    return value


def _int(name: str, value: object) -> int:
    if type(value) is not int:
        raise TypeError(f"{name} must be int, got {type(value).__name__}")
    return value


def root_from_inclusion_proof(leaf: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root implied by an inclusion proof (RFC 9162 §2.1.3.2 steps 1-4).

    Raises :class:`InvalidProof` if the proof cannot be for (index, size) at all.
    """
    leaf = _bytes("leaf_hash", leaf)
    index, size = _int("index", index), _int("size", size)
    path = _hash_list("proof", proof)
    if not 0 <= index < size or len(leaf) != HASH_SIZE:
        raise InvalidProof("inclusion proof did not verify")
    if any(len(p) != HASH_SIZE for p in path):
        raise InvalidProof("inclusion proof did not verify")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise InvalidProof("inclusion proof did not verify")
        if fn & 1 or fn == sn:
            r = _sha256(b"\x01" + p + r).digest()
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = _sha256(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProof("inclusion proof did not verify")
    return r


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """RFC 9162 §2.1.3.2: ``None`` if ``proof`` shows leaf hash ``leaf`` at ``index`` in the
    tree of ``size`` with ``root``; :class:`InvalidProof` otherwise."""
    root = _bytes("root", root)
    computed = root_from_inclusion_proof(leaf, index, size, proof)
    if len(root) != HASH_SIZE or not hmac.compare_digest(computed, root):
        raise InvalidProof("inclusion proof did not verify")


def verify_consistency(size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes) -> None:
    """RFC 9162 §2.1.4.2: ``None`` if ``proof`` shows the tree (size1, root1) is a prefix of
    (size2, root2); :class:`InvalidProof` otherwise.

    Equal sizes need an empty proof and equal roots (size 0: both roots ``EMPTY_ROOT``). A proof
    from size 0 to a larger size is meaningless and refused, as upstream does.
    """
    size1, size2 = _int("size1", size1), _int("size2", size2)
    path = _hash_list("proof", proof)
    root1, root2 = _bytes("root1", root1), _bytes("root2", root2)
    bad = InvalidProof("consistency proof did not verify")
    if size1 < 0 or size2 < size1:
        raise bad
    if size1 == size2:
        # Roots compared as opaque values (the upstream probes accept any equal pair here).
        if path or not hmac.compare_digest(root1, root2):
            raise bad
        if size1 == 0 and root1 != EMPTY_ROOT:
            raise bad
        return
    if size1 == 0 or not path:
        raise bad
    if len(root1) != HASH_SIZE or len(root2) != HASH_SIZE or any(len(p) != HASH_SIZE for p in path):
        raise bad
    # Step 2: if size1 is a power of two, the verifier knows the seed: root1.
    if size1 & (size1 - 1) == 0:
        path = [root1, *path]
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise bad
        if fn & 1 or fn == sn:
            fr = _sha256(b"\x01" + c + fr).digest()
            sr = _sha256(b"\x01" + c + sr).digest()
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = _sha256(b"\x01" + sr + c).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0 or not hmac.compare_digest(fr, root1) or not hmac.compare_digest(sr, root2):
        raise bad


# ---------------------------------------------------------------------------- compact range


class CompactRange:
    """The right frontier of a tree of ``size`` leaves: one hash per set bit of ``size``,
    largest subtree first. Appending is O(log n); the root is a fold of the frontier.

    Persist with ``(cr.size, cr.hashes)``; restore with ``CompactRange(size, hashes)``.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        _check_size("size", size)
        hs = _hash_list("hashes", hashes)
        if len(hs) != size.bit_count():
            raise ValueError(f"a range of size {size} needs {size.bit_count()} hashes, got {len(hs)}")
        if any(len(h) != HASH_SIZE for h in hs):
            raise ValueError(f"each hash must be {HASH_SIZE} bytes")
        self._size = size
        self._hashes = hs

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> list[bytes]:
        return list(self._hashes)

    def nodes(self) -> list[NodeId]:
        """The perfect subtrees whose hashes are :attr:`hashes`, same order."""
        return range_nodes(0, self._size)

    def append(self, leaf_hash: bytes, on_node: Callable[[NodeId, bytes], None] | None = None) -> None:
        """Append one leaf *hash*; ``on_node`` hears of every completed perfect subtree,
        the leaf itself (level 0) first, then each merge upwards."""
        if not isinstance(leaf_hash, bytes) or len(leaf_hash) != HASH_SIZE:
            raise ValueError(f"leaf hash must be {HASH_SIZE} bytes")
        idx = self._size
        hs = self._hashes
        h = leaf_hash
        if on_node is not None:
            on_node(NodeId(0, idx), h)
        level = 0
        while (idx >> level) & 1:
            h = _sha256(b"\x01" + hs.pop() + h).digest()
            level += 1
            if on_node is not None:
                on_node(NodeId(level, idx >> level), h)
        hs.append(h)
        self._size = idx + 1

    def root(self) -> bytes:
        """``MTH`` of the leaves so far (RFC 9162 §2.1.1); ``EMPTY_ROOT`` when empty."""
        hs = self._hashes
        if not hs:
            return EMPTY_ROOT
        acc = hs[-1]
        for h in reversed(hs[:-1]):
            acc = _sha256(b"\x01" + h + acc).digest()
        return acc

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size})"


# ---------------------------------------------------------------------------- in-memory tree


class MerkleTree:
    """An append-only in-memory tree storing every perfect subtree node, level by level.

    Proofs are built with the same plans a database-backed store uses.
    """

    __slots__ = ("_levels",)

    def __init__(self, leaves: Sequence[bytes] = ()) -> None:
        self._levels: list[list[bytes]] = [[]]
        self.extend(leaves)

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def append(self, data: bytes) -> int:
        """Append leaf *data* (hashed with :func:`leaf_hash`); return its index."""
        idx = self.size
        self.append_hash(leaf_hash(data))
        return idx

    def extend(self, leaves: Sequence[bytes]) -> None:
        for d in leaves:
            self.append(d)

    def append_hash(self, h: bytes) -> None:
        """Append an already computed leaf hash."""
        if not isinstance(h, bytes) or len(h) != HASH_SIZE:
            raise ValueError(f"leaf hash must be {HASH_SIZE} bytes")
        levels = self._levels
        level = 0
        row = levels[0]
        row.append(h)
        while len(row) % 2 == 0:
            h = _sha256(b"\x01" + row[-2] + h).digest()
            level += 1
            if level == len(levels):
                levels.append([])
            row = levels[level]
            row.append(h)

    def node(self, node: NodeId) -> bytes:
        """Hash of a stored perfect subtree; ``KeyError`` if not (yet) complete."""
        try:
            return self._levels[node.level][node.index]
        except IndexError:
            raise KeyError(node) from None

    def _fetch(self, plan: ProofPlan) -> list[bytes]:
        return plan.rehash([self.node(i) for i in plan.ids])

    def _size_arg(self, size: int | None) -> int:
        if size is None:
            return self.size
        _check_size("size", size)
        if size > self.size:
            raise ValueError(f"size must be <= {self.size}, got {size}")
        return size

    def root(self, size: int | None = None) -> bytes:
        return self._fetch(root_plan(self._size_arg(size)))[0]

    def leaf_hash(self, index: int) -> bytes:
        return self.node(NodeId(0, index))

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        return self._fetch(inclusion_plan(index, self._size_arg(size)))

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        return self._fetch(consistency_plan(size1, self._size_arg(size2)))
