"""A Flower ``Grid`` whose messages travel over the marketplace's own channel (a mailbox).

The coordinator (a Flower ServerApp in a marketplace thread) pushes ``Message``s into a
per-federation :class:`Mailbox`; participants long-poll ``GET /v1/federations/{id}/messages``
for the next one (Flower's protobuf, octet-stream) and ``POST .../replies`` the ClientApp's reply.
The mailbox checks every reply: it must parse, answer a message sent to *that* node and not be
answered yet; its ``src_node_id`` is set from the authenticated participant, never trusted.

Everything the coordinator receives passes :meth:`Mailbox.reply`, which keeps per round and node
a digest of the received bytes (the ledger's "digest of the masked update") and, when
``keep_view`` is set (tests, audits), the bytes themselves: the coordinator's whole view.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from uuid import uuid4

from flwr.app import Message
from flwr.app.message_type import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage
from flwr.common.secure_aggregation.secaggplus_constants import Key as SaKey
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from marketplace.federated.errors import ReplyRefused

__all__ = ["Mailbox", "MailboxGrid", "ReplyRefused", "ensure_identity"]

COORDINATOR_NODE = 1  # Flower's SUPERLINK_NODE_ID: the source of every instruction


def ensure_identity() -> None:
    """Flower stamps new Messages with the process's task identity; the marketplace is one
    coordinator process for many federations, so it is a fixed placeholder and each grid
    stamps its own run id on the messages it pushes."""
    if TaskIdentity._run_id is None:  # noqa: SLF001 - Flower exposes no getter that does not raise
        TaskIdentity.run_id = 0
        TaskIdentity.node_id = COORDINATOR_NODE
        TaskIdentity.task_id = 0


def _carries_update(ins: Message) -> bool:
    """Whether the reply to ``ins`` carries the (masked, with SecAgg+) model update."""
    if ins.metadata.message_type != MessageType.TRAIN:
        return False
    cfg = ins.content.config_records.get(RECORD_KEY_CONFIGS)
    return cfg is None or cfg.get(SaKey.STAGE) == Stage.COLLECT_MASKED_VECTORS


@dataclass
class Mailbox:
    """Queues between one federation's coordinator and its participants' nodes."""

    keep_view: bool = False
    max_reply_bytes: int = 16 * 1024 * 1024
    cv: threading.Condition = field(default_factory=threading.Condition)
    outbox: dict[int, deque[tuple[str, bytes]]] = field(default_factory=dict)
    sent_to: dict[str, int] = field(default_factory=dict)  # message id -> node
    instructions: dict[str, Message] = field(default_factory=dict)
    replies: dict[str, Message] = field(default_factory=dict)
    last_seen: dict[int, float] = field(default_factory=dict)
    digests: dict[tuple[str, int], hashlib._Hash] = field(default_factory=dict)  # (round, node)
    contributors: dict[str, set[int]] = field(default_factory=dict)  # round -> nodes whose update arrived
    view: list[tuple[int, str, bytes]] = field(default_factory=list)  # (node, round, bytes)
    polling: dict[int, int] = field(default_factory=dict)  # node -> long polls in progress
    closed: bool = False

    def post(self, msg: Message) -> None:
        data = message_to_proto(msg).SerializeToString()
        with self.cv:
            node = msg.metadata.dst_node_id
            self.outbox.setdefault(node, deque()).append((msg.metadata.message_id, data))
            self.sent_to[msg.metadata.message_id] = node
            self.instructions[msg.metadata.message_id] = msg
            self.cv.notify_all()

    def next_for(self, node: int, wait: float) -> bytes | None:
        """The next message for ``node``, waiting up to ``wait`` s (long poll)."""
        end = time.monotonic() + wait
        with self.cv:
            self.polling[node] = self.polling.get(node, 0) + 1
            try:
                while not self.closed:
                    self.last_seen[node] = time.monotonic()
                    q = self.outbox.get(node)
                    if q:
                        return q.popleft()[1]
                    left = end - time.monotonic()
                    if left <= 0:
                        return None
                    self.cv.wait(left)
            finally:
                self.polling[node] -= 1
                self.last_seen[node] = time.monotonic()
        return None

    def reply(self, node: int, data: bytes) -> None:
        """Accept ``node``'s reply (Flower protobuf) or raise :class:`ReplyRefused`."""
        if len(data) > self.max_reply_bytes:
            raise ReplyRefused(f"reply of {len(data)} bytes exceeds {self.max_reply_bytes}")
        try:
            proto = ProtoMessage.FromString(data)
            msg = message_from_proto(proto)
        except Exception as e:  # protobuf raises DecodeError, Flower ValueError/TypeError/KeyError
            raise ReplyRefused(f"not a Flower message: {type(e).__name__}") from e
        ref = msg.metadata.reply_to_message_id
        with self.cv:
            self.last_seen[node] = time.monotonic()
            if self.sent_to.get(ref) != node:
                raise ReplyRefused("the reply answers no message sent to this participant")
            if ref in self.replies:
                raise ReplyRefused("that message was already answered")
            ins = self.instructions.get(ref)
            if ins is None:
                raise ReplyRefused("that message was already answered")
            if msg.has_content() and msg.metadata.message_type != ins.metadata.message_type:
                raise ReplyRefused("the reply's type differs from the instruction's")
            md = msg.metadata.__dict__
            md["_src_node_id"] = node  # from the authenticated participant, never the payload
            md["_dst_node_id"] = COORDINATOR_NODE
            md["_run_id"] = ins.metadata.run_id
            md["_message_id"] = str(uuid4())
            rnd = ins.metadata.group_id
            if _carries_update(ins):
                self.contributors.setdefault(rnd, set()).add(node)
            self.digests.setdefault((rnd, node), hashlib.sha256()).update(data)
            if self.keep_view:
                self.view.append((node, rnd, data))
            self.replies[ref] = msg
            self.cv.notify_all()

    def take(self, ids: set[str], wait: float) -> list[Message]:
        end = time.monotonic() + wait
        with self.cv:
            while True:
                got = [self.replies.pop(i) for i in list(ids) if i in self.replies]
                if got or time.monotonic() >= end or self.closed:
                    for m in got:  # done: a second reply to it answers nothing
                        ref = m.metadata.reply_to_message_id
                        self.instructions.pop(ref, None)
                        self.sent_to.pop(ref, None)
                    return got
                self.cv.wait(end - time.monotonic())

    def finish_round(self, rnd: int) -> dict[int, str]:
        """The round's contributors (nodes whose update arrived) and the digest of everything
        received from each in the round; forgets the round."""
        key = str(rnd)
        with self.cv:
            nodes = self.contributors.pop(key, set())
            out = {n: "sha256:" + h.hexdigest() for (r, n), h in self.digests.items() if r == key and n in nodes}
            for k in [k for k in self.digests if k[0] == key]:
                del self.digests[k]
            return out

    def online(self, nodes: Iterable[int], within: float) -> list[int]:
        """Nodes waiting for a message now, or that were active in the last ``within`` s."""
        now = time.monotonic()
        with self.cv:
            return [n for n in nodes if self.polling.get(n) or now - self.last_seen.get(n, -1e9) <= within]

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()


class MailboxGrid(Grid):
    """Flower's ``Grid`` over a :class:`Mailbox`: nodes are the federation's participants."""

    def __init__(self, mailbox: Mailbox, run_id: int, nodes: Callable[[], list[int]], *, timeout: float = 60.0) -> None:
        ensure_identity()
        self.default_timeout = timeout
        self.mailbox = mailbox
        self.nodes = nodes
        self._run = Run.create_empty(run_id)
        self.last_round_stats: dict[str, int] = {}
        self.current_round = 0  # the federation's round (Flower's own counter restarts per call)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            md = msg.metadata.__dict__
            md["_message_id"] = str(uuid4())
            md["_run_id"] = self._run.run_id
            md["_src_node_id"] = COORDINATOR_NODE
            md["_group_id"] = str(self.current_round)
            self.mailbox.post(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.mailbox.take(set(message_ids), 0.0)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else self.default_timeout)
        out: list[Message] = []
        while pending and time.monotonic() < end:
            got = self.mailbox.take(pending, max(0.0, end - time.monotonic()))
            out.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if self.mailbox.closed:
                break
        with self.mailbox.cv:
            for ref in pending:  # unanswered (dropped out): forget, a late reply is refused
                self.mailbox.sent_to.pop(ref, None)
                self.mailbox.instructions.pop(ref, None)
        failed = sum(1 for m in out if m.has_error())
        self.last_round_stats = {"replied": len(out) - failed, "failed": failed + len(pending)}
        return out
