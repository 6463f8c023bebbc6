"""The one error hierarchy of sitepair.

Every error an operator can see derives from :class:`SitepairError`. The message says what went
wrong in terms of the operator's objects (a disk path, a key id, a server name); ``hint`` says what
to do about it. Each class names the gRPC status it becomes; servers translate errors to statuses
in exactly one place (``sitepair.rpc``), and clients turn statuses back into these classes, so a
traceback never reaches an operator.
"""

from __future__ import annotations


class SitepairError(Exception):
    """Root of all sitepair errors."""

    #: Name of the ``grpc.StatusCode`` this error becomes at an RPC boundary.
    status = "INTERNAL"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class InvalidArgument(SitepairError):
    status = "INVALID_ARGUMENT"


class ConfigError(InvalidArgument):
    """A configuration or credentials file is missing, unreadable or inconsistent."""


class NotFound(SitepairError):
    status = "NOT_FOUND"


class AlreadyExists(SitepairError):
    status = "ALREADY_EXISTS"


class FailedPrecondition(SitepairError):
    status = "FAILED_PRECONDITION"


class StaleEpoch(FailedPrecondition):
    """A command or cycle carries an epoch lower than one already seen: it is fenced off."""


class PermissionDenied(SitepairError):
    status = "PERMISSION_DENIED"


class Unauthenticated(SitepairError):
    status = "UNAUTHENTICATED"


class Unavailable(SitepairError):
    status = "UNAVAILABLE"


class ResourceExhausted(SitepairError):
    status = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(SitepairError):
    status = "DEADLINE_EXCEEDED"


class Aborted(SitepairError):
    status = "ABORTED"


class VirtualDiskError(SitepairError):
    """A virtual disk is corrupt, unsupported, or cannot be opened as asked.

    The message names the file and the structure at fault (for example "BAT entry 17 points
    beyond the end of the file") so the operator can tell a damaged image from a wrong path.
    """

    status = "FAILED_PRECONDITION"


ALL_BY_STATUS: dict[str, type[SitepairError]] = {
    cls.status: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        Unavailable,
        ResourceExhausted,
        DeadlineExceeded,
        Aborted,
    )
}
