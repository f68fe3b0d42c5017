"""The driver's control messages to the other ranks, over one pipe per rank (raw bytes).

A message is one opcode byte and a payload. Pipes, not a collective: the driver hands a step's
plan to every rank and goes on at once (a collective broadcast would wait until the last
pipeline stage is free, and stages could never work on different micro-batches at once). Each
rank reads its messages in order, so ranks run the same steps in the same order and their
device collectives pair up. Ranks answer on the same pipe (a KV block count; the sampling
rank of a pipeline's last stage its step results). Only bytes travel: nothing is pickled.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from multiprocessing.connection import Connection


class Op(enum.IntEnum):
    PROFILE = 1  # payload: max sequence length -> every rank answers its KV block count (min taken)
    INIT_KV = 2  # payload: num_blocks, max_model_len
    WARMUP = 3
    STEP = 4  # payload: step_message.encode_step(SchedulerOutput)
    SHUTDOWN = 5
    LORA_LOAD = 6  # payload: JSON {"slot", "name", "path"} (runtime LoRA loading; no reply)
    LORA_UNLOAD = 7  # payload: JSON {"slot", "name"}


def pack_ints(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}q", *values)


def unpack_ints(data: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(data) // 8}q", data)


class DriverChannels:
    """The driver's ends of the pipes to ranks ``1 .. world - 1`` (index ``rank - 1``)."""

    def __init__(self, conns: Sequence[Connection]) -> None:
        self.conns = list(conns)

    def send(self, op: Op, payload: bytes = b"") -> None:
        message = bytes([op]) + payload
        for conn in self.conns:
            conn.send_bytes(message)

    def replies(self) -> list[tuple[int, ...]]:
        """Every other rank's integer answer, in rank order."""
        return [tuple(unpack_ints(conn.recv_bytes())) for conn in self.conns]

    def recv_from(self, rank: int) -> bytes:
        return self.conns[rank - 1].recv_bytes()


class RankChannel:
    """A rank's end of its pipe from the driver."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def recv(self) -> tuple[Op, bytes]:
        message = self.conn.recv_bytes()
        return Op(message[0]), message[1:]

    def reply(self, data: bytes) -> None:
        self.conn.send_bytes(data)
