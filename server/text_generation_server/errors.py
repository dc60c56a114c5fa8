"""Shard errors with a typed code; the servicer turns them into gRPC errors the router can map."""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):  # mirrors tessera.v1.ErrorCode
    OUT_OF_MEMORY = 1
    INVALID_REQUEST = 2
    ADAPTER_NOT_FOUND = 3
    BAD_ADAPTER = 4
    BATCH_NOT_FOUND = 5
    INTERNAL = 6


class ShardError(Exception):
    def __init__(self, code: ErrorCode, message: str, request_ids: list[int] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_ids = request_ids or []
