"""Errors the loopback server turns into HTTP answers or failed futures."""

from __future__ import annotations


class UserError(Exception):
    """The request is wrong (bad value, unknown id): a 4xx, or a future failed with category ``user``."""

    status_code = 400
    kind = "bad_request"


class NotFound(UserError):
    """An id or path that does not exist: 404, so the SDK fails at once instead of retrying."""

    status_code = 404
    kind = "not_found"


class Gone(UserError):
    """The session was finished: 410 (the SDK's heartbeat loop stops on it)."""

    status_code = 410
    kind = "gone"


class Unauthorized(UserError):
    """Missing or wrong ``X-API-Key``."""

    status_code = 401
    kind = "unauthorized"
