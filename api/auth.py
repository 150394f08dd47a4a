"""Who is calling: the tenant of the API key sent as `Authorization: Bearer <key>` (the OpenAI SDK) or
`x-api-key` (the Anthropic SDK). While no key exists, an API bound to a loopback address serves the
one local tenant without a key; once any key exists (revoked ones count), every /v1 request needs one.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.deps import SessionDep
from api.errors import ApiError
from common.ids import now
from common.settings import Settings
from db import keys
from db.models import LOCAL_TENANT, ApiKey
from db.scoped import EveryTenant, TenantScope

LAST_USED_EVERY_S = 60  # last_used_at is written at most this often per key, not on every request
MAX_CACHED_KEYS = 10_000
CREATE_KEY_HINT = "create one with `diffbatch keys create --tenant NAME`"


@dataclass(frozen=True)
class Caller:
    tenant_id: str
    key_id: str | None  # None: the keyless local tenant
    admin: bool = False


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1); any other name or address is not."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key")


class KeyCheck:
    """Per app: authenticates callers. Keys already verified skip the slow hash (a cache of digests of
    presented keys), but the key's row is read on every request, so a revocation holds at once."""

    def __init__(self, settings: Settings) -> None:
        self.loopback = is_loopback_host(settings.api_host)
        self._keys_exist = False  # once true, always: keys are revoked, never deleted
        self._verified: dict[bytes, tuple[str, str]] = {}  # digest of a key -> (row id, its secret hash)

    def caller(self, session: Session, presented: str | None) -> Caller:
        if not self._any_keys(session):
            if self.loopback:
                return Caller(tenant_id=LOCAL_TENANT, key_id=None)
            raise unauthorized(f"This server has no API keys and is not bound to a loopback address; "
                               f"{CREATE_KEY_HINT}.")
        if not presented:
            raise unauthorized("You didn't provide an API key. Send it in an Authorization header "
                               "(Authorization: Bearer YOUR_KEY) or an x-api-key header.")
        row = self._verified_row(session, presented)
        if row is None:
            raise unauthorized("Incorrect API key provided.")
        if row.revoked_at is not None:
            raise unauthorized("This API key has been revoked.")
        if row.last_used_at is None or row.last_used_at <= now() - LAST_USED_EVERY_S:
            keys.touch_key(session, key_id=row.id, now=now(), every_s=LAST_USED_EVERY_S)
        return Caller(tenant_id=row.tenant_id, key_id=row.id, admin=row.admin)

    def _any_keys(self, session: Session) -> bool:
        if not self._keys_exist:
            self._keys_exist = keys.any_key_exists(session)
        return self._keys_exist

    def _verified_row(self, session: Session, presented: str) -> ApiKey | None:
        digest = hashlib.sha256(presented.encode()).digest()
        if (cached := self._verified.get(digest)) is not None:
            row = keys.get_key(session, key_id=cached[0])
            return row if row is not None and row.secret_hash == cached[1] else None
        parts = keys.split_key(presented)
        if parts is None:
            return None
        row = keys.get_key(session, key_id=parts[0])
        if row is None or not keys.secret_matches(row, parts[1]):
            return None
        if len(self._verified) >= MAX_CACHED_KEYS:
            self._verified.clear()
        self._verified[digest] = (row.id, row.secret_hash)
        return row


def presented_key(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.headers.get("x-api-key", "").strip() or None


def authenticate(request: Request, session: SessionDep) -> Caller:
    key_check: KeyCheck = request.app.state.key_check
    try:
        return key_check.caller(session, presented_key(request))
    finally:
        # End the transaction now: on SQLite it holds the write lock, and the route may stream an upload next.
        session.commit()


CurrentTenant = Annotated[Caller, Depends(authenticate)]


def tenant_scope(session: SessionDep, caller: CurrentTenant) -> TenantScope:
    return TenantScope(session, caller.tenant_id)


# Routes read files, batches and requests only through this: every query is the caller's tenant's.
ScopeDep = Annotated[TenantScope, Depends(tenant_scope)]


def batch_reader(session: SessionDep, caller: CurrentTenant) -> TenantScope | EveryTenant:
    """Whose batches a service-wide read (the status page) shows: an admin key's, every tenant's."""
    return EveryTenant(session) if caller.admin else TenantScope(session, caller.tenant_id)


ReaderDep = Annotated[TenantScope | EveryTenant, Depends(batch_reader)]
