"""`automask keys ...`: create, list, update and revoke API keys (click commands only; the database loads inside)."""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import click

from automask.cli_io import check_stdout, root_settings
from automask.server.commands import CREDITS, PER_MINUTE, NoLimit, store_of

if TYPE_CHECKING:
    from automask.server.keys import ApiKey

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
"""Control characters (C0, DEL, C1): shown escaped in the `keys list` table."""


def _keystore() -> Any:
    from automask.errors import require

    require("sqlalchemy", "server")
    from automask.server import keys as keystore

    return keystore


@click.group()
def keys() -> None:
    """Create, list, update and revoke API keys (stored as hashes in the data folder)."""


@keys.command("create")
@click.option("--name", default="", help="A label for the key.")
@click.option("--credits", type=CREDITS, help="Requests the key may make, or none [default: none: unlimited].")
@click.option("--rate-limit", type=PER_MINUTE, help="Requests per minute, or none [default: none: unlimited].")
@click.pass_context
def keys_create(ctx: click.Context, name: str, credits: int | NoLimit | None, rate_limit: int | NoLimit | None) -> None:
    """Create a key and print it (on stdout, once: only its hash is stored)."""
    check_stdout()  # closed (`>&-`): exit 8 before a key is made whose token would be lost
    credits, rate_limit = _unlimited_as(None, credits), _unlimited_as(None, rate_limit)
    key, token = _keystore().create_key(store_of(ctx), name=name, credits=credits, rate_limit=rate_limit)
    click.echo(token)
    click.echo(
        f"Created key {key.id} (credits: {_or_unlimited(key.credits)}, requests per minute: "
        f"{_or_unlimited(key.rate_limit)}). Save it now: it cannot be shown again.",
        err=True,
    )


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def keys_list(ctx: click.Context, as_json: bool) -> None:
    """Every key: id, name, credits, rate limit, created, revoked (never the secret)."""
    check_stdout()
    found = _keystore().list_keys(store_of(ctx))
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(k) for k in found]))
        return
    rows = [_key_row(k) for k in found]
    if not rows:
        click.echo("No keys yet. Create one with: automask keys create", err=True)
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    for r in [{c: c for c in columns}, *rows]:
        click.echo("  ".join(str(r[c]).ljust(widths[c]) for c in columns).rstrip())


@keys.command("revoke")
@click.argument("key_id")
@click.pass_context
def keys_revoke(ctx: click.Context, key_id: str) -> None:
    """Revoke KEY_ID for good: its requests get 403."""
    key = _key_id(key_id)
    if not _keystore().revoke_key(store_of(ctx), key):
        raise click.BadParameter(f"no key {key_id!r} (see: automask keys list)", param_hint="KEY_ID")
    click.echo(f"Revoked key {key}.", err=True)
    redis_url = root_settings(ctx).redis_url
    if redis_url:
        _forget_known(redis_url, key)


def _forget_known(redis_url: str, key_id: str) -> None:
    """Tell the fleet (Redis) that revoked `key_id` is no longer known to be good; a warning if Redis is not there."""
    from automask.errors import ServiceConfigError, require

    require("redis", "scale")
    from redis.exceptions import RedisError

    from automask.server.known_keys import forget_everywhere

    try:
        forget_everywhere(redis_url, key_id)
    except (RedisError, ServiceConfigError) as exc:  # the key is revoked all the same: say what is left undone
        why = f"was not told: {exc.message}" if isinstance(exc, ServiceConfigError) else f"did not answer ({exc})."
        click.echo(
            f"warning: Redis (AUTOMASK_REDIS_URL) {why} Until each API node has refused the key once (403), it may "
            "still let it past a failed-authentication lock-out.",
            err=True,
        )


@keys.command("update")
@click.argument("key_id")
@click.option("--credits", type=CREDITS, help="Set the credit balance, or none: unlimited.")
@click.option("--rate-limit", type=PER_MINUTE, help="Set the requests per minute, or none: unlimited.")
@click.pass_context
def keys_update(
    ctx: click.Context, key_id: str, credits: int | NoLimit | None, rate_limit: int | NoLimit | None
) -> None:
    """Set the credits or rate limit of KEY_ID (`none`: unlimited)."""
    if credits is None and rate_limit is None:
        raise click.UsageError("give --credits and/or --rate-limit")
    keystore = _keystore()
    credits, rate_limit = _unlimited_as(keystore.UNLIMITED, credits), _unlimited_as(keystore.UNLIMITED, rate_limit)
    key = _key_id(key_id)
    if not keystore.update_key(store_of(ctx), key, credits=credits, rate_limit=rate_limit):
        raise click.BadParameter(f"no key {key_id!r} (see: automask keys list)", param_hint="KEY_ID")
    click.echo(f"Updated key {key}.", err=True)


def _unlimited_as(unlimited: Any, value: int | NoLimit | None) -> Any:
    """A key's credits or rate limit flag for the key store: `none` as `unlimited`, else as given (None: not given)."""
    return unlimited if isinstance(value, NoLimit) else value


def _key_id(text: str) -> str:
    """Accept a key id, or a whole key `am_<id>_<secret>` (its id is used)."""
    parts = _keystore().split_token(text)
    return parts[0] if parts is not None else text


def _or_unlimited(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


def _key_row(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": _CONTROL.sub(lambda m: repr(m.group())[1:-1], key.name),  # no escape sequence reaches the terminal
        "credits": _or_unlimited(key.credits),
        "rate_limit": _or_unlimited(key.rate_limit),
        "created": _utc(key.created_at),
        "revoked": _utc(key.disabled_at) if key.disabled_at else "no",
    }


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
