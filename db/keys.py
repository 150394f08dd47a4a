"""API keys and tenants: create, import, verify, revoke and list keys; tenants and their quota overrides.

A key is ``dbk_<id>.<secret>``: verifying it reads one row by primary key. Only a salted scrypt hash of the
secret is stored. An operator's own key (``keys import``, any 32+ characters) gets an id derived from it by
the same slow hash, so the id tells nothing the stored hash does not.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session

from db.models import ApiKey, Tenant
from db.session import rows_changed

KEY_PREFIX = "dbk_"
MIN_IMPORTED_KEY_LENGTH = 32
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# About 16 MiB and tens of milliseconds a hash; the API caches keys it has verified, so a client pays it once.
SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
_OWN_KEY = re.compile(re.escape(KEY_PREFIX) + r"([0-9a-f]{16})\.([A-Za-z0-9_-]{32,})")
_IMPORTED_ID_SALT = b"diffbatch imported api key id"
_KEY_CHARACTERS = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: fits an HTTP header


class KeyStoreError(ValueError):
    """A key or tenant name that cannot be stored (the message says why)."""


def hash_secret(secret: str, salt: str) -> str:
    return hashlib.scrypt(secret.encode(), salt=bytes.fromhex(salt), **SCRYPT).hex()


def split_key(key: str) -> tuple[str, str] | None:
    """The row id and secret a presented key names; None if it cannot be a key."""
    if match := _OWN_KEY.fullmatch(key):
        return match.group(1), match.group(2)
    if len(key) >= MIN_IMPORTED_KEY_LENGTH and _KEY_CHARACTERS.fullmatch(key) and not key.startswith(KEY_PREFIX):
        digest = hashlib.scrypt(key.encode(), salt=_IMPORTED_ID_SALT, **SCRYPT)
        return "ext" + digest[:8].hex(), key
    return None


def secret_matches(row: ApiKey, secret: str) -> bool:
    return hmac.compare_digest(hash_secret(secret, row.salt), row.secret_hash)


def check_tenant_name(name: str) -> str:
    if not TENANT_NAME.fullmatch(name):
        raise KeyStoreError(f"tenant name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a "
                        "letter or digit")
    return name


def ensure_tenant(session: Session, *, tenant_id: str, now: int) -> Tenant:
    row = session.get(Tenant, check_tenant_name(tenant_id))
    if row is None:
        row = Tenant(id=tenant_id, created_at=now)
        session.add(row)
        session.flush()
    return row


def create_key(session: Session, *, tenant_id: str, now: int, admin: bool = False) -> tuple[ApiKey, str]:
    """A new key for the tenant (created if new): its row, and the key itself, which is shown once."""
    key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    row = _store(session, key_id=key_id, secret=secret, tenant_id=tenant_id, now=now, admin=admin)
    return row, f"{KEY_PREFIX}{key_id}.{secret}"


def import_key(session: Session, *, tenant_id: str, key: str, now: int,
               admin: bool = False) -> tuple[ApiKey, bool]:
    """Store a key the operator chose; True if stored now, False if it already was (for that tenant)."""
    parts = split_key(key)
    if parts is None:
        raise KeyStoreError(f"an API key must be at least {MIN_IMPORTED_KEY_LENGTH} printable characters without "
                        f"spaces (or one printed by `diffbatch keys create`)")
    key_id, secret = parts
    existing = session.get(ApiKey, key_id)
    if existing is None:
        return _store(session, key_id=key_id, secret=secret, tenant_id=tenant_id, now=now, admin=admin), True
    if not secret_matches(existing, secret):
        raise KeyStoreError(f"another key has the id {key_id}; choose another key")
    if existing.tenant_id != tenant_id:
        raise KeyStoreError(f"this key ({key_id}) already belongs to tenant {existing.tenant_id!r}")
    if existing.revoked_at is not None:
        raise KeyStoreError(f"this key ({key_id}) was revoked; choose another key")
    return existing, False


def _store(session: Session, *, key_id: str, secret: str, tenant_id: str, now: int, admin: bool) -> ApiKey:
    ensure_tenant(session, tenant_id=tenant_id, now=now)
    salt = secrets.token_hex(16)
    row = ApiKey(id=key_id, tenant_id=tenant_id, salt=salt, secret_hash=hash_secret(secret, salt), admin=admin,
                 created_at=now)
    session.add(row)
    session.flush()
    return row


def get_key(session: Session, *, key_id: str) -> ApiKey | None:
    return session.get(ApiKey, key_id)


def any_key_exists(session: Session) -> bool:
    """Revoked keys count: once a server had keys, it never serves anonymous requests again."""
    return bool(session.scalar(select(exists().select_from(ApiKey))))


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.tenant_id, ApiKey.created_at, ApiKey.id)))


def find_key(session: Session, *, key_or_id: str) -> ApiKey | None:
    """The key named by its id or by the key itself."""
    row = session.get(ApiKey, key_or_id)
    if row is None and (parts := split_key(key_or_id)):
        row = session.get(ApiKey, parts[0])
    return row


def revoke_key(session: Session, *, key_id: str, now: int) -> bool:
    """Revoke the key; False if it already was (its first revocation time stays)."""
    changed = rows_changed(session, update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                                    .values(revoked_at=now))
    return changed == 1


def touch_key(session: Session, *, key_id: str, now: int, every_s: int) -> bool:
    """Record a use, at most once per ``every_s`` seconds, so requests do not each write a row."""
    changed = rows_changed(session, update(ApiKey).where(
        ApiKey.id == key_id, (ApiKey.last_used_at.is_(None)) | (ApiKey.last_used_at <= now - every_s))
        .values(last_used_at=now))
    return changed == 1


def get_tenant(session: Session, *, tenant_id: str) -> Tenant | None:
    return session.get(Tenant, tenant_id)


def list_tenants(session: Session) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.id)))


def set_quotas(session: Session, *, tenant_id: str, now: int, **limits: int | None) -> Tenant:
    """Set the named overrides (max_queued_requests, max_queued_tokens); None means the server's setting."""
    row = ensure_tenant(session, tenant_id=tenant_id, now=now)
    for name, value in limits.items():
        if name not in ("max_queued_requests", "max_queued_tokens"):
            raise TypeError(f"no quota {name}")
        setattr(row, name, value)
    session.flush()
    return row
