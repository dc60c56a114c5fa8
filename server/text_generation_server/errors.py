"""Shard errors with a typed code; the servicer turns them into gRPC errors the router can map."""

from __future__ import annotations

from enum import IntEnum

from text_generation_server.pb import generate_pb2 as pb

# tessera.v2.ErrorCode, read from the generated module (one definition, in the .proto).
ErrorCode = IntEnum("ErrorCode", {name: value for name, value in pb.ErrorCode.items() if value})


class ShardError(Exception):
    def __init__(self, code: ErrorCode, message: str, request_ids: list[int] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_ids = request_ids or []
