"""The one clock every stage uses: timezone-aware UTC, and the conversions SQLite needs."""

from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> datetime:
    """Timezone-aware now, the one clock every table uses."""
    return datetime.now(timezone.utc)


def aware(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return dt.replace(tzinfo=timezone.utc) if dt is not None and dt.tzinfo is None else dt


def iso(dt: datetime | None) -> str | None:
    """UTC ISO time with milliseconds, or None."""
    dt = aware(dt)
    return dt.isoformat(timespec="milliseconds") if dt is not None else None


def seconds_between(later: datetime | None, earlier: datetime | None) -> float | None:
    """later - earlier in seconds (3 decimals), or None when either is missing."""
    if later is None or earlier is None:
        return None
    return round((aware(later) - aware(earlier)).total_seconds(), 3)
