"""URLs in messages: a service's address shown without its password."""

from __future__ import annotations


def redacted(url: str) -> str:
    """``url`` with any password replaced by ``***`` (``postgres://me:***@db/x``), for logs and errors."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL we can read: show nothing of its credentials
        _, at, tail = url.rpartition("@")
        return f"***@{tail}" if at else url
    if not password:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
