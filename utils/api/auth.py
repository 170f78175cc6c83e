"""API keys with names and roles: who may upload, read, or erase and read the audit.

Roles: `predict` (POST /predict), `read` (results, stored files, chart, FHIR), `admin` (DELETE /patients, GET
/audit). Keys come from the environment, never from the repository:

- `BONEAGE_API_KEYS`: comma-separated keys, each with the roles predict and read (never admin), named `api-key-1`,
  `api-key-2`, ... in their order;
- `BONEAGE_API_KEYS_FILE`: a file with one key a line, `name roles sha256:<hex of the key's SHA-256>`, roles
  comma-separated; `#` starts a comment. It holds digests only, so the file itself gives no access.

Only SHA-256 digests are kept in memory; a given key is hashed once and compared with every digest in constant time,
without stopping at the first match. A key is never logged, stored or answered: the audit records its name.

    python -m utils.api.auth new ward-3-viewer read     # prints a new random key and its line for the file
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import re
import secrets
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from utils.config import Settings

KEY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DIGEST_PATTERN = re.compile(r"^sha256:([0-9a-f]{64})$")
# A new key: 32 random bytes, URL-safe base64 (43 characters).
NEW_KEY_BYTES = 32


class Role(StrEnum):
    predict = "predict"
    read = "read"
    admin = "admin"


FLAT_KEY_ROLES = frozenset({Role.predict, Role.read})


class KeyFileError(ValueError):
    """The keys file cannot be read or has a malformed line (the message names the line, never a key)."""


@dataclass(frozen=True)
class ApiKey:
    """A configured key: its name (what the audit records), its roles and the SHA-256 digest of the key."""

    name: str
    roles: frozenset[Role]
    digest: bytes


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_roles(text: str) -> frozenset[Role]:
    """`predict,read` -> the roles; ValueError naming an unknown role."""
    roles = set()
    for name in (part.strip() for part in text.split(",")):
        if name not in Role.__members__:
            raise ValueError(f"unknown role {name!r} (roles: {', '.join(Role)})")
        roles.add(Role(name))
    return frozenset(roles)


def read_key_file(path: Path) -> list[ApiKey]:
    """The keys of a keys file; `KeyFileError` for an unreadable file or a malformed line."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"the API keys file {path} cannot be read ({type(exc).__name__})") from None
    keys = []
    for number, line in enumerate(lines, start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 3 or not KEY_NAME_PATTERN.fullmatch(fields[0]):
            raise KeyFileError(f"{path}:{number}: expected `name roles sha256:<hex>` (name: 1-64 of A-Z a-z 0-9 . _ -)")
        digest = DIGEST_PATTERN.fullmatch(fields[2])
        if digest is None:
            raise KeyFileError(f"{path}:{number}: the key must be given as sha256:<64 lowercase hex digits> (its "
                               "digest, not the key: python -m utils.api.auth new NAME ROLES)")
        try:
            roles = parse_roles(fields[1])
        except ValueError as exc:
            raise KeyFileError(f"{path}:{number}: {exc}") from None
        keys.append(ApiKey(fields[0], roles, bytes.fromhex(digest.group(1))))
    return keys


class KeyRing:
    """The configured keys; built once at start-up (`from_settings`)."""

    def __init__(self, keys: list[ApiKey]) -> None:
        names = [key.name for key in keys]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise KeyFileError(f"API key names must be unique: {', '.join(duplicates)}")
        self.keys = tuple(keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        flat = [ApiKey(f"api-key-{n}", FLAT_KEY_ROLES, key_digest(key))
                for n, key in enumerate(settings.api_key_list, start=1)]
        named = [] if settings.api_keys_file is None else read_key_file(settings.api_keys_file)
        return cls(flat + named)

    @property
    def enabled(self) -> bool:
        """Whether keys are configured: then every patient route needs one."""
        return bool(self.keys)

    def authenticate(self, given: str) -> ApiKey | None:
        """The key `given` is, or None; compared with every digest in constant time, none skipped."""
        if not given:
            return None
        digest = key_digest(given)
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


def presented_key(x_api_key: str, authorization: str) -> str:
    """The key a request presents: `X-API-Key`, else `Authorization: Bearer <key>`; empty if none. Whitespace
    around a header's value is not part of it (RFC 9110, 5.5; uvicorn keeps a trailing space)."""
    if x_api_key.strip():
        return x_api_key.strip()
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.api.auth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="make a random key; prints the key (once) and its line for the keys file")
    new.add_argument("name", help="what the audit records for this key, e.g. ward-3-viewer")
    new.add_argument("roles", help="comma-separated: predict, read, admin")
    args = parser.parse_args(argv)
    if not KEY_NAME_PATTERN.fullmatch(args.name):
        parser.error("the name must be 1-64 of A-Z a-z 0-9 . _ -")
    try:
        roles = parse_roles(args.roles)
    except ValueError as exc:
        parser.error(str(exc))
    key = secrets.token_urlsafe(NEW_KEY_BYTES)
    line = f"{args.name} {','.join(sorted(roles))} sha256:{key_digest(key).hex()}"
    sys.stdout.write(f"key (give it to its user; it is not stored anywhere): {key}\n"
                     f"line for BONEAGE_API_KEYS_FILE:\n{line}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
