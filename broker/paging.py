"""Pages of the admin API's lists: page sizes, page tokens, and a byte budget per page.

Every list whose length grows with the vault (servers, VMs, jobs, protected VMs, registration
keys) is paged, so no vault is ever too big to list: a response holds at most ``page_size``
items (:data:`DEFAULT_PAGE_SIZE` when the request says 0, never more than
:data:`MAX_PAGE_SIZE`), and ends early when the next item would take the page's serialized size
over :data:`PAGE_BYTES` (half the admin channel's message limit). A page always holds at least
one item, and no single item can be larger than :data:`MAX_ITEM_BYTES`: an item over it has its
largest fields withheld (:func:`trim`), so a page always fits in a message.

A page token is the sort key of the last item sent, as URL-safe base64 of a JSON list; the store
continues after it (keyset paging), so items added or removed during a walk neither shift nor
repeat the others. Tokens are opaque to clients and checked when they come back.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from google.protobuf.message import Message

from sitepair.errors import InvalidArgument

T = TypeVar("T")
M = TypeVar("M", bound=Message)

#: Items in a page when the request does not say.
DEFAULT_PAGE_SIZE = 100
#: The most items in one page, whatever the request asks.
MAX_PAGE_SIZE = 1000
#: Serialized bytes of one page's items (the admin channel carries 8 MiB per message).
PAGE_BYTES = 4 * 1024 * 1024
#: Serialized bytes of one item, after :func:`trim`.
MAX_ITEM_BYTES = 1024 * 1024
#: Serialized bytes of a single-item response (GetServer with its inventory); the channel's
#: limit is 8 MiB.
MAX_RESPONSE_BYTES = 7 * 1024 * 1024
#: Longest page token accepted back (a key of three columns of up to
#: :data:`broker.bounds.MAX_STORED_KEY` characters fits).
MAX_TOKEN = 32 * 1024


def page_size(requested: int, *, default: int = DEFAULT_PAGE_SIZE) -> int:
    """The number of items to put in a page the request asked ``requested`` of (0 = default)."""
    return max(1, min(requested or default, MAX_PAGE_SIZE))


def encode_token(key: Sequence[Any]) -> str:
    text = json.dumps(list(key), ensure_ascii=False)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_token(token: str, types: Sequence[type]) -> tuple[Any, ...] | None:
    """The sort key a page token holds (None for "" = the first page); InvalidArgument when it
    is not a token this broker made for this list."""
    if not token:
        return None
    bad = InvalidArgument(
        "the page token is not valid for this list", hint="start again without a page token"
    )
    if len(token) > MAX_TOKEN:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        key = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise bad from exc
    if not isinstance(key, list) or len(key) != len(types):
        raise bad
    out: list[Any] = []
    for raw_value, want in zip(key, types, strict=True):
        value = raw_value
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or isinstance(value, bool):
            raise bad
        out.append(value)
    return tuple(out)


def trim(msg: M, fields: Sequence[str], *, limit: int = MAX_ITEM_BYTES) -> M:
    """``msg`` itself if it is at most ``limit`` bytes serialized; otherwise with ``fields``
    cleared one by one, in the order given, until it fits, each named in its ``withheld`` field.
    Used on items whose stored values an older broker or an agent's reports could have made
    large; ``fields`` must hold enough of the message that clearing them all makes it fit."""
    if msg.ByteSize() <= limit:
        return msg
    withheld = msg.withheld  # type: ignore[attr-defined]
    for name in fields:
        msg.ClearField(name)
        withheld.append(name)
        if msg.ByteSize() <= limit:
            break
    return msg


def fill(
    rows: Sequence[T],
    size: int,
    convert: Callable[[T], M],
    key: Callable[[T], Sequence[Any]],
) -> tuple[list[M], str]:
    """The items of one page and the token of the next ("" = this is the last page).

    ``rows`` are the store's rows from where the page starts, at most ``size + 1`` of them (the
    extra one says whether there is more). Items are added until ``size`` is reached or the next
    one would take the page over :data:`PAGE_BYTES`.
    """
    items: list[M] = []
    used = 0
    for i, row in enumerate(rows):
        if i == size:
            return items, encode_token(key(rows[i - 1]))
        item = convert(row)
        cost = item.ByteSize() + 8  # the repeated field's tag and length
        if items and used + cost > PAGE_BYTES:
            return items, encode_token(key(rows[i - 1]))
        items.append(item)
        used += cost
    return items, ""
