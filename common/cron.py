"""Cron expressions in an IANA time zone: checking them, and the next due time after an instant.

Five fields (minute hour day month weekday) or an alias such as @daily, evaluated on the zone's wall
clock: `0 9 * * *` in Europe/Berlin is 08:00 UTC in winter and 07:00 UTC in summer.
"""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, CroniterError, croniter


class CronError(ValueError):
    """A cron expression or time zone that cannot be used; the message says why."""


def zone(name: str) -> ZoneInfo:
    """The IANA zone called ``name`` (e.g. "UTC", "Europe/Berlin"), or a CronError."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:  # ValueError: a key such as "../x" or ""
        raise CronError(f"unknown time zone {name!r}; use an IANA name such as 'UTC' or 'Europe/Berlin'") from exc


def check_cron(expression: str) -> None:
    """Raise a CronError unless ``expression`` is five cron fields or an @alias that ever matches."""
    fields = expression.split()
    if not expression.startswith("@") and len(fields) != 5:
        # croniter also takes a seconds and a year field; a schedule is checked every few seconds only.
        raise CronError(f"{expression!r} has {len(fields)} fields; a cron expression has 5: minute hour "
                        "day-of-month month day-of-week (e.g. '0 9 * * *'), or is an alias such as '@daily'")
    next_run(expression, "UTC", after=0)


def next_run(expression: str, time_zone: str, *, after: int) -> int:
    """The first time strictly after ``after`` (epoch seconds) that ``expression`` matches on the wall clock
    of ``time_zone``, in epoch seconds."""
    start = datetime.fromtimestamp(after, tz=timezone.utc).astimezone(zone(time_zone))
    try:
        due: datetime = croniter(expression, start).get_next(datetime)
    except CroniterBadDateError as exc:  # valid fields that name no real date, e.g. 30 February
        raise CronError(f"{expression!r} never matches a date") from exc
    except (CroniterBadCronError, CroniterError, ValueError) as exc:
        raise CronError(f"{expression!r} is not a valid cron expression: {exc}") from exc
    return int(due.timestamp())
