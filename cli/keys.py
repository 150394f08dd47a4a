"""`diffbatch keys` and `diffbatch tenants`: API keys and per-tenant quotas, on the configured database
(brought to the current schema first), whether or not a server is running."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.ids import now
from common.settings import Settings

if TYPE_CHECKING:  # the database packages load only when a command uses them
    from sqlalchemy.orm import Session

    from db.models import ApiKey, Tenant

API_KEY_VARIABLE = "DIFFBATCH_API_KEY"
EXIT_NOT_FOUND, EXIT_USAGE = 1, 2

# A subcommand's handler, and cli.main's ``command(name, handler, help)`` that adds one.
Handler = Callable[[Settings, argparse.Namespace], int]
Command = Callable[[str, Handler, str], argparse.ArgumentParser]


def register(command: Command) -> None:
    """Add the `keys` and `tenants` commands through cli.main's ``command(name, handler, help)``."""
    keys_parser = command("keys", _keys, "API keys: create, import, list, revoke (each bound to a tenant)")
    actions = _actions(keys_parser)
    create = actions.add_parser("create", help="create a key; it is printed once, alone on the last line")
    create.add_argument("--tenant", required=True, help="the tenant that owns what the key creates")
    create.add_argument("--admin", action="store_true", help="may see every tenant's batches on the status page")
    imported = actions.add_parser("import", help=f"store the key in {API_KEY_VARIABLE} (idempotent; for compose)")
    imported.add_argument("--tenant", required=True)
    imported.add_argument("--admin", action="store_true")
    listed = actions.add_parser("list", help="list keys (never their secrets)")
    listed.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    revoke = actions.add_parser("revoke", help="revoke a key: its next request is a 401")
    revoke.add_argument("key_or_id", metavar="KEY_OR_ID")

    tenants_parser = command("tenants", _tenants, "tenants and their quotas")
    actions = _actions(tenants_parser)
    limits = actions.add_parser("set", help="set a tenant's quotas ('default': the server's DIFFBATCH_MAX_*)")
    limits.add_argument("name")
    for flag in ("--max-queued-requests", "--max-queued-tokens"):
        limits.add_argument(flag, type=_limit, metavar="N|default")
    listed = actions.add_parser("list", help="list tenants and their quotas")
    listed.add_argument("--json", action="store_true")


if TYPE_CHECKING:  # generic in typeshed only
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    _SubParsers = argparse._SubParsersAction


class _Actions(_SubParsers):
    """Sub-commands that also take --data-dir after their name (`keys create --tenant X --data-dir D`)."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        action = super().add_parser(name, **kwargs)
        # SUPPRESS: left out, it keeps a --data-dir given before the action instead of resetting it
        action.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS, help="data folder")
        return action


def _actions(parser: argparse.ArgumentParser) -> _SubParsers:
    return parser.add_subparsers(action=_Actions, dest="action", required=True, metavar="ACTION")


DEFAULT = "default"


def _limit(text: str) -> int | str:
    if text == DEFAULT:
        return DEFAULT
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number or 'default': {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {value}")
    return value


@contextlib.contextmanager
def _database(settings: Settings) -> Iterator[Session]:
    """A session on the configured database, migrated to head first (as `diffbatch db upgrade` does)."""
    from db.migrate import upgrade
    from db.session import make_engine, make_session_factory

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_session_factory(engine)() as session, session.begin():
            yield session
    finally:
        engine.dispose()


def keys_exist(settings: Settings) -> bool:
    """Whether the configured database holds any API key; False for a database not created yet."""
    from sqlalchemy import inspect

    from db import keys
    from db.session import make_engine, make_session_factory

    engine = make_engine(settings.resolved_database_url)
    try:
        if not inspect(engine).has_table("api_keys"):
            return False
        with make_session_factory(engine)() as session:
            return keys.any_key_exists(session)
    finally:
        engine.dispose()


def _keys(settings: Settings, args: argparse.Namespace) -> int:
    from db import keys

    try:
        with _database(settings) as session:
            if args.action == "create":
                row, key = keys.create_key(session, tenant_id=args.tenant, now=now(), admin=args.admin)
                print(f"created key {row.id} for tenant {row.tenant_id}; it is shown only now, store it:")
                print(key)
                return 0
            if args.action == "import":
                return _import(session, args)
            if args.action == "list":
                _print_rows([_key_fields(row) for row in keys.list_keys(session)], args.json)
                return 0
            return _revoke(session, args.key_or_id)
    except keys.KeyStoreError as error:
        print(f"diffbatch keys {args.action}: {error}", file=sys.stderr)
        return EXIT_USAGE


def _import(session: Session, args: argparse.Namespace) -> int:
    from db import keys

    key = os.environ.get(API_KEY_VARIABLE, "").strip()
    if not key:
        print(f"diffbatch keys import: set {API_KEY_VARIABLE} to the key to store", file=sys.stderr)
        return EXIT_USAGE
    row, stored = keys.import_key(session, tenant_id=args.tenant, key=key, now=now(), admin=args.admin)
    print(f"{'stored' if stored else 'already stored:'} key {row.id} for tenant {row.tenant_id}")
    return 0


def _revoke(session: Session, key_or_id: str) -> int:
    from db import keys

    row = keys.find_key(session, key_or_id=key_or_id)
    if row is None:
        print("diffbatch keys revoke: no such key (give its id, as `diffbatch keys list` shows, or the key)",
              file=sys.stderr)
        return EXIT_NOT_FOUND
    if keys.revoke_key(session, key_id=row.id, now=now()):
        print(f"revoked key {row.id} of tenant {row.tenant_id}")
    else:
        print(f"key {row.id} of tenant {row.tenant_id} was already revoked at {_time(row.revoked_at)}")
    return 0


def _tenants(settings: Settings, args: argparse.Namespace) -> int:
    from db import keys

    try:
        with _database(settings) as session:
            if args.action == "set":
                limits = {name: None if value == DEFAULT else value
                          for name in ("max_queued_requests", "max_queued_tokens")
                          if (value := getattr(args, name)) is not None}
                rows = [keys.set_quotas(session, tenant_id=args.name, now=now(), **limits)]
            else:
                rows = keys.list_tenants(session)
            as_json = getattr(args, "json", False)
            _print_rows([_tenant_fields(row, settings, as_json=as_json) for row in rows], as_json)
            return 0
    except keys.KeyStoreError as error:
        print(f"diffbatch tenants {args.action}: {error}", file=sys.stderr)
        return EXIT_USAGE


def _key_fields(row: ApiKey) -> dict[str, Any]:
    return {"id": row.id, "tenant": row.tenant_id, "admin": row.admin, "created": _time(row.created_at),
            "last_used": _time(row.last_used_at), "revoked": _time(row.revoked_at)}


def _tenant_fields(row: Tenant, settings: Settings, *, as_json: bool) -> dict[str, Any]:
    """The limits in force; the table marks the server's defaults, JSON lists them under "defaulted"."""
    fields: dict[str, Any] = {"tenant": row.id, "created": _time(row.created_at)}
    defaulted: list[str] = []
    for name in ("max_queued_requests", "max_queued_tokens"):
        override = getattr(row, name)
        fields[name] = getattr(settings, name) if override is None else override
        if override is None:
            defaulted.append(name)
            fields[name] = fields[name] if as_json else f"{fields[name]} (default)"
    return {**fields, "defaulted": defaulted} if as_json else fields


def _time(stamp: int | None) -> str | None:
    if stamp is None:
        return None
    return datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _print_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("(none)")
        return
    cells = [list(rows[0])] + [["-" if v is None else str(v) for v in row.values()] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    for line in cells:
        print("  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)).rstrip())
