"""Mailboxes: in-process (an actor's asyncio inbox) and between processes (msgspec frames over a
local Unix socket). A frame is a 4-byte big-endian length, then one byte naming the message type
(its index in protocol.MESSAGE_TYPES), then the msgpack body."""
from __future__ import annotations

import asyncio
import struct
from typing import Any, Optional

import msgspec

from gemma4rt.protocol import MESSAGE_TYPES

_HDR = struct.Struct(">IB")
_TYPE_INDEX = {t: i for i, t in enumerate(MESSAGE_TYPES)}
_ENC = msgspec.msgpack.Encoder()
_DECS = [msgspec.msgpack.Decoder(t) for t in MESSAGE_TYPES]
MAX_FRAME = 1 << 31


def encode_frame(msg: Any) -> bytes:
    body = _ENC.encode(msg)
    return _HDR.pack(len(body) + 1, _TYPE_INDEX[type(msg)]) + body


def decode_body(type_index: int, body: bytes) -> Any:
    return _DECS[type_index].decode(body)


class SocketChannel:
    """Both directions of one Unix-socket connection. recv() returns None at EOF."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.closed = False
        self.partial = False        # a frame's header is read, its body not yet (see EngineActor.run)

    def send(self, msg: Any) -> None:
        if self.closed:
            raise ConnectionError("channel closed")
        self.writer.write(encode_frame(msg))

    async def drain(self) -> None:
        await self.writer.drain()

    async def recv(self) -> Optional[Any]:
        try:
            hdr = await self.reader.readexactly(_HDR.size)
            n, t = _HDR.unpack(hdr)
            self.partial = True
            body = await self.reader.readexactly(n - 1)
            self.partial = False
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed = True
            self.partial = False
            return None
        return decode_body(t, body)

    def close(self) -> None:
        self.closed = True
        try:
            self.writer.close()
        except Exception:
            pass


async def pump(channel: SocketChannel, actor) -> None:
    """Move every frame from a channel into an actor's inbox; put None there at EOF."""
    while True:
        msg = await channel.recv()
        actor.send(msg)
        if msg is None:
            return
