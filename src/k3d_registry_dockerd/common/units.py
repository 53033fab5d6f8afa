"""Sizes and durations as people read them: binary units (KiB, MiB, GiB) everywhere, as `--cache-max-size`
takes them, so a figure in the log, `cache ls` and the status page is the same figure."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def size(count: float) -> str:
    """``512 B``, ``1.0 MiB``, ``20 GiB``: three significant digits, no trailing ``.0`` for whole units."""
    value, unit = float(count), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    if unit == 0:
        return f"{int(value)} B"
    if value == int(value):
        return f"{int(value)} {_UNITS[unit]}"
    return f"{value:.1f} {_UNITS[unit]}" if abs(value) < 100 else f"{value:.0f} {_UNITS[unit]}"


def rate(count: float, seconds: float) -> str:
    return f"{size(count / seconds)}/s" if seconds > 0 else "?/s"


def duration(seconds: float) -> str:
    """``4.2s``, ``3m05s``, ``1h02m``, ``7d``, ``2d03h``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h" if hours else f"{days}d"
