"""Large messages cut into MQTT payloads of at most 1 MB (the default packet limit of EMQX,
far below Mosquitto's) and rebuilt by a receiver with per-sender budgets.

A message's size limit is per kind (`max_bytes(kind)`): checked by the Reassembler on a
message's first chunk where the topic tells the kind, and again by `codec.decode`.
"""

from __future__ import annotations

import mmap
import struct
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_runtime.protocol.fields import MAX_MESSAGE_BYTES, CodecError
from edge_runtime.protocol.messages import max_bytes

CHUNK_MAGIC = b"HRC1"
MAX_CHUNK_PAYLOAD = 1_000_000  # bytes per MQTT payload, chunk header included
_CHUNK_HEAD = struct.Struct("<4s16sIIQ")  # magic, message id, index, count, total bytes


def chunk(payload: bytes, msg_id: str, max_payload: int = MAX_CHUNK_PAYLOAD) -> list[bytes]:
    """Split an encoded message into MQTT payloads of at most `max_payload` bytes each."""
    per = max_payload - _CHUNK_HEAD.size
    if per <= 0:
        raise ValueError("max_payload is smaller than the chunk header")
    count = max(1, -(-len(payload) // per))
    mid = uuid.UUID(hex=msg_id).bytes
    return [_CHUNK_HEAD.pack(CHUNK_MAGIC, mid, i, count, len(payload)) +
            payload[i * per:(i + 1) * per] for i in range(count)]


def wire_bytes(last_chunk: bytes, message_bytes: int) -> int:
    """The MQTT payload bytes a message of `message_bytes` travelled as, from its last
    chunk's header (its count): what the sender's publish counted."""
    if len(last_chunk) < _CHUNK_HEAD.size:
        return message_bytes
    count = _CHUNK_HEAD.unpack(last_chunk[:_CHUNK_HEAD.size])[3]
    return message_bytes + count * _CHUNK_HEAD.size


PIECE_OVERHEAD = 64  # bytes booked per received chunk on top of its data (its index entry)
PARTIAL_OVERHEAD = 4096  # bytes booked per pending message (its mapping, its bookkeeping)


@dataclass
class _Partial:
    """A message being rebuilt: each piece is copied into `data` at its offset as it
    arrives, so a large message costs its own size once, not pieces plus their join."""

    count: int
    total: int
    per: int  # bytes in every piece but the last (chunk's split)
    first_seen: float
    data: mmap.mmap | bytearray = field(default_factory=bytearray)  # anonymous mmap: pages
    # become memory only as pieces are written into them (a bare header cannot make the
    # receiver allocate a message's size)
    have: set[int] = field(default_factory=set)
    booked: int = PARTIAL_OVERHEAD  # what it holds: received pieces plus overheads

    @staticmethod
    def first(count: int, total: int, index: int, size: int, now: float) -> _Partial:
        if count == 1:
            per = total
        elif index < count - 1:
            per = size
        elif (total - size) % (count - 1) == 0:
            per = (total - size) // (count - 1)
        else:
            raise CodecError(f"chunk {index} of {count} has {size} bytes, which no split of "
                             f"{total} gives")
        if count > 1 and (per <= 0 or per * (count - 1) >= total or per * count < total):
            raise CodecError(f"chunk sizes do not add up: {count} chunks of {per} bytes "
                             f"for {total}")
        return _Partial(count, total, per, now)

    def want(self, index: int) -> int:
        return self.per if index < self.count - 1 else self.total - self.per * (self.count - 1)

    def allocate(self) -> None:
        if self.total:
            try:
                self.data = mmap.mmap(-1, self.total)
            except (OSError, ValueError, OverflowError) as exc:
                raise CodecError(f"cannot map {self.total} bytes for a message: {exc}") from None

    def put(self, index: int, piece: bytes) -> None:
        self.data[index * self.per:index * self.per + len(piece)] = piece
        self.have.add(index)
        self.booked += len(piece) + PIECE_OVERHEAD


class Reassembler:
    """Rebuilds messages from chunks that may arrive duplicated or out of order.

    Keyed by (topic, message id) so one sender cannot complete another's message; a topic
    is one sender's (the broker's ACL lets a device publish only on its own), so budgets are
    kept per topic and count what was actually received, never what a header declares:

    - a message's declared size must be within its kind's limit (`max_bytes(kind)`, when
      the caller knows the kind from the topic);
    - a topic holds at most `max_topic_messages` incomplete messages and twice its kind's
      limit in received bytes; past that, its own oldest incomplete message is dropped;
    - all topics together hold at most `max_pending_messages` and `max_pending_bytes`; past
      that, the topic holding the most loses its oldest incomplete message, so a sender
      filling the budget evicts itself, not the others. If that is the message the chunk
      belongs to, the chunk is refused (CodecError).

    Incomplete messages are dropped after `timeout_s` (counted in `expired`; budget drops in
    `evicted`); completed ids are remembered per topic (the last `remember`) so a QoS 1
    redelivery of a whole message is applied once (counted in `duplicates`).
    """

    def __init__(self, timeout_s: float = 120.0, max_pending_bytes: int = 2 * MAX_MESSAGE_BYTES,
                 remember: int = 256, *, max_topic_messages: int = 4,
                 max_pending_messages: int = 1024, max_topics_remembered: int = 16_384,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = min(max_message_bytes, MAX_MESSAGE_BYTES)
        self.timeout_s = timeout_s
        self.max_pending_bytes = max_pending_bytes
        self.max_topic_messages = max_topic_messages
        self.max_pending_messages = max_pending_messages
        self._pending: dict[tuple[str, bytes], _Partial] = {}  # oldest first
        self._done: OrderedDict[str, OrderedDict[bytes, None]] = OrderedDict()
        self._remember = remember
        self._max_topics = max_topics_remembered
        self.duplicates = 0
        self.expired = 0
        self.evicted = 0
        self._dropped: dict[str, int] = {}  # topic -> incomplete messages dropped (take_dropped)

    def add(self, topic: str, payload: bytes, now: float | None = None,
            kind: str | None = None) -> memoryview | None:
        """Feed one MQTT payload; returns the whole message once its last chunk arrives.
        `kind`: the message kind the topic carries, if known (its size limit applies)."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        if len(payload) < _CHUNK_HEAD.size:
            raise CodecError(f"chunk of {len(payload)} bytes is shorter than its header")
        if len(payload) > MAX_CHUNK_PAYLOAD:
            raise CodecError(f"oversized chunk: {len(payload)} bytes > {MAX_CHUNK_PAYLOAD}")
        magic, mid, index, count, total = _CHUNK_HEAD.unpack_from(payload)
        if magic != CHUNK_MAGIC:
            raise CodecError("not a heron chunk (bad magic)")
        if count == 0 or index >= count or total > MAX_MESSAGE_BYTES:
            raise CodecError(f"bad chunk header (index {index}, count {count}, total {total})")
        if total > self.max_message_bytes:
            raise CodecError(f"message of {total} bytes is over the {self.max_message_bytes} "
                             "bytes this receiver can hold; dropping chunk")
        limit = max_bytes(kind)
        if total > limit:
            raise CodecError(f"{kind} message of {total} bytes exceeds the {kind} limit of "
                             f"{limit}")
        key = (topic, mid)
        done = self._done.get(topic)
        if done is not None and mid in done:
            self.duplicates += 1
            return None
        piece = payload[_CHUNK_HEAD.size:]
        part = self._pending.get(key)
        if part is None:
            part = _Partial.first(count, total, index, len(piece), now)
        elif part.count != count or part.total != total:
            raise CodecError("chunk header disagrees with earlier chunks of the message")
        if index in part.have:
            self.duplicates += 1
            return None
        if len(piece) != part.want(index):
            raise CodecError(f"chunk {index} has {len(piece)} bytes, expected "
                             f"{part.want(index)}")
        if key not in self._pending:
            part.allocate()
            self._pending[key] = part
        self._make_room(key, len(piece) + PIECE_OVERHEAD, 2 * limit)
        part.put(index, piece)
        if len(part.have) < part.count:
            return None
        del self._pending[key]
        self._remember_done(topic, mid)
        return memoryview(part.data)  # compares equal to the bytes sent; arrays may view it

    def pending_bytes(self, topic: str | None = None) -> int:
        """Bytes booked by incomplete messages (of one topic, or all): what was received
        plus overheads, never the sizes their headers declare."""
        return sum(p.booked for (t, _), p in self._pending.items() if topic in (None, t))

    def pending_by_topic(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t, _ in self._pending:
            counts[t] = counts.get(t, 0) + 1
        return counts

    def pending_messages(self, topic: str | None = None) -> int:
        return sum(1 for t, _ in self._pending if topic in (None, t))

    def _make_room(self, key: tuple[str, bytes], cost: int, topic_budget: int) -> None:
        """Drop incomplete messages until `cost` more bytes for `key` fit every budget."""
        topic = key[0]
        while True:
            if self.pending_messages(topic) > self.max_topic_messages or \
                    self.pending_bytes(topic) + cost > topic_budget:
                self._evict(topic, key, "its topic's budget")
            elif len(self._pending) > self.max_pending_messages:
                self._evict(self._largest(lambda p: 1), key, "the pending-message budget")
            elif self.pending_bytes() + cost > self.max_pending_bytes:
                self._evict(self._largest(lambda p: p.booked), key, "the pending-byte budget")
            else:
                return

    def _largest(self, weight: Callable[[_Partial], int]) -> str:
        held: dict[str, int] = {}
        for (t, _), p in self._pending.items():
            held[t] = held.get(t, 0) + weight(p)
        return max(held, key=lambda t: held[t])

    def _evict(self, topic: str, key: tuple[str, bytes], budget: str) -> None:
        oldest = next(k for k in self._pending if k[0] == topic)
        del self._pending[oldest]
        if oldest == key:
            raise CodecError(f"incomplete messages pending on {topic} exceed {budget}; "
                             "dropping this message")
        self.evicted += 1
        self._note_dropped(topic)

    def _note_dropped(self, topic: str) -> None:
        if len(self._dropped) < self._max_topics or topic in self._dropped:
            self._dropped[topic] = self._dropped.get(topic, 0) + 1

    def take_dropped(self) -> dict[str, int]:
        """Incomplete messages dropped (expired or evicted) per topic since the last call,
        so that the receiver can count them against their sender."""
        dropped, self._dropped = self._dropped, {}
        return dropped

    def _remember_done(self, topic: str, mid: bytes) -> None:
        done = self._done.pop(topic, None) or OrderedDict()
        self._done[topic] = done  # most recently used topic last
        done[mid] = None
        while len(done) > self._remember:
            done.popitem(last=False)
        while len(self._done) > self._max_topics:
            self._done.popitem(last=False)

    def _expire(self, now: float) -> None:
        for key in [k for k, p in self._pending.items() if now - p.first_seen > self.timeout_s]:
            del self._pending[key]
            self.expired += 1
            self._note_dropped(key[0])
