"""The one error the gateway raises on purpose: an HTTP answer other than 200.

Every refusal (a bad key, another tenant's model, a malformed body, a limit) is an
:class:`HttpError` carrying the status, the message (naming the value and the fix) and, where one
field is at fault, its name. :mod:`orchestrator.gateway.server` renders it as the JSON body the
SDK shows in its exception (``{"detail": message, "field": name}``); anything else that escapes a
route is a bug, logged and answered 500.
"""

from __future__ import annotations

from events.errors import MultiLoraError


class HttpError(MultiLoraError):
    """Answer ``status`` with ``message``; ``field`` names the request field at fault."""

    def __init__(self, status: int, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def bad_request(field: str, message: str) -> HttpError:
    """A 400 about ``field`` (the message is prefixed with it, like the spec errors)."""
    return HttpError(400, f"{field}: {message}" if field else message, field=field)


def not_found(what: str) -> HttpError:
    """A 404: ``what`` does not exist *for this tenant* (another tenant's looks the same)."""
    return HttpError(404, f"{what} not found for this API key")
