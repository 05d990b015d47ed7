"""API keys: created once, stored only as hashes, checked in constant time.

Keys live in ``<config dir>/api_keys.json`` (file mode 0600): for each, a
name, the first characters for recognition, the SHA-256 of the key (keys are
32 random bytes, so a fast hash is enough; the key itself is never stored),
an optional rate limit and the creation time.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import re
import secrets
from pathlib import Path
from typing import Any

import attrs

from enigma.errors import BadRequestError, ConfigError, NotFoundError
from enigma.fsutil import atomic_write_text

PREFIX = "sk-enigma-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@attrs.frozen
class APIKey:
    name: str
    shown: str
    """The key's first characters, to recognise it in listings."""
    sha256: str
    created: str
    rate_limit: int | None = None
    """Requests per minute; None: the server's default."""
    token_limit: int | None = None
    """Prompt + generated tokens per minute; None: the server's default."""


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, path: str | Path | None = None) -> None:
        if path is None:
            from enigma.paths import get_paths

            path = get_paths().config_dir / "api_keys.json"
        self.path = Path(path)
        self._cache: tuple[tuple[int, int, int], list[APIKey]] | None = None

    def keys(self) -> list[APIKey]:
        """The keys, parsed again only when the file changed (the server checks them on every request)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return []
        version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)  # atomic rewrites change the inode
        if self._cache is not None and self._cache[0] == version:
            return self._cache[1]
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            keys = [APIKey(**entry) for entry in data["keys"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.path} is corrupt ({exc}); remove it and create the keys again") from exc
        self._cache = (version, keys)
        return keys

    def _save(self, keys: list[APIKey]) -> None:
        atomic_write_text(self.path, json.dumps({"keys": [attrs.asdict(k) for k in keys]}, indent=2) + "\n",
                          file_mode=0o600)

    def create(self, name: str, *, rate_limit: int | None = None, token_limit: int | None = None) -> str:
        """Make a key called ``name``; return it (the only time it is shown)."""
        if not _NAME.match(name):
            raise BadRequestError(f"key name {name!r} is not valid: use letters, digits, '.', '_' and '-'")
        if rate_limit is not None and rate_limit < 1:
            raise BadRequestError(f"rate limit {rate_limit} must be at least 1 request per minute")
        if token_limit is not None and token_limit < 1:
            raise BadRequestError(f"token limit {token_limit} must be at least 1 token per minute")
        keys = self.keys()
        if any(k.name == name for k in keys):
            raise BadRequestError(f"a key named {name!r} exists; revoke it first or pick another name")
        key = PREFIX + secrets.token_urlsafe(32)
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self._save([*keys, APIKey(name, key[: len(PREFIX) + 4], _hash(key), created, rate_limit, token_limit)])
        return key

    def revoke(self, name: str) -> None:
        keys = self.keys()
        if not any(k.name == name for k in keys):
            raise NotFoundError(f"no key named {name!r}; see `enigma keys list`")
        self._save([k for k in keys if k.name != name])

    def verify(self, presented: str) -> APIKey | None:
        """The key ``presented`` matches, or None; every stored hash is compared, in constant time."""
        digest = _hash(presented)
        found = None
        for key in self.keys():
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found

    def as_dict(self) -> list[dict[str, Any]]:
        return [{"name": k.name, "key": k.shown + "...", "created": k.created, "rate_limit": k.rate_limit,
                 "token_limit": k.token_limit} for k in self.keys()]
