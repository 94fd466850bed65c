"""Domain errors with stable machine codes; the API maps them to HTTP in one place (`api/errors.py`)."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base of every error a client may see; `code` is part of the API contract."""

    code = "internal"

    def __init__(self, message: str, *, details: Any = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code


class NotFound(DomainError):
    code = "not_found"


class InvalidRequest(DomainError):
    code = "invalid_request"


class InvalidSpec(InvalidRequest):
    code = "invalid_spec"


class InvalidImage(InvalidRequest):
    code = "invalid_image"


class PayloadTooLarge(DomainError):
    code = "payload_too_large"


class QuotaExceeded(DomainError):
    """A key's standing allowance (its storage quota) would be passed; waiting does not help, deleting does."""

    code = "quota_exceeded"


class Unauthorized(DomainError):
    code = "unauthorized"


class Conflict(DomainError):
    code = "conflict"


class ServiceUnavailable(DomainError):
    code = "service_unavailable"


class TooManyRequests(DomainError):
    """A per-key limit was hit; `retry_after_s` tells the client when to try again."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int, code: str | None = None) -> None:
        super().__init__(message, code=code, details={"retry_after_s": retry_after_s})
        self.retry_after_s = retry_after_s
