"""Values from the network in logs and error messages: cut to a short bound, length kept.

A field a peer sends (a registration key id before its secret is checked, a command id an agent
acknowledges, a name that fails a check) may be any size the message limit allows. Logging it
whole lets anyone who can reach a port write that much into the broker's log per request, and
an error message that echoes it sends it back and logs it again. :func:`shown` keeps the first
``limit`` characters, printable, and says how long the original was, so an operator still sees
what arrived and how big it was.
"""

from __future__ import annotations

#: Characters of a peer-supplied value kept in a log field or an error message.
LOG_VALUE_LIMIT = 64
#: Characters of a whole error text kept in a log line or a gRPC status message.
LOG_TEXT_LIMIT = 1024


def shown(value: object, limit: int = LOG_VALUE_LIMIT) -> str:
    """``value`` as text of at most ``limit`` characters (plus a note of its full length);
    control characters are escaped so a value cannot forge log lines."""
    text = value if isinstance(value, str) else str(value)
    cut = text[:limit]
    safe = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in cut)
    if len(text) > limit:
        return f"{safe}... ({len(text)} characters)"
    return safe


def clipped(text: str, limit: int = LOG_TEXT_LIMIT) -> str:
    """A longer text (an error message) cut to ``limit`` characters, with its full length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"
