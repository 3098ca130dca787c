"""The handlers' pure parts: Kopf's peering rule as the resync loop applies it."""

from __future__ import annotations

import datetime as dt

import pytest
from jest_operator.handlers import peering_active
from jest_operator.status import format_time

NOW = dt.datetime(2026, 12, 2, 12, 0, 0, tzinfo=dt.UTC)
ME = "operator-a"


def peer(priority: int, *, seen_seconds_ago: float = 1, lifetime: int = 60) -> dict:
    return {"priority": priority, "lifetime": lifetime,
            "lastseen": format_time(NOW - dt.timedelta(seconds=seen_seconds_ago))}


@pytest.mark.parametrize(
    ("status", "active"),
    [
        ({ME: peer(0)}, True),  # alone
        ({ME: peer(10), "operator-b": peer(0)}, True),  # the highest priority acts
        ({ME: peer(0), "operator-b": peer(10)}, False),  # a standby
        ({ME: peer(5), "operator-b": peer(5)}, False),  # Kopf pauses both of a same-priority tie
        ({ME: peer(0), "operator-b": peer(10, seen_seconds_ago=120)}, True),  # the other one died
        ({ME: peer(0, seen_seconds_ago=120)}, False),  # our own keep-alive is stale
        ({"operator-b": peer(0)}, False),  # Kopf has not registered us yet
        ({ME: peer(0), "operator-b": "garbage"}, True),
        (None, False),
    ],
)
def test_peering_active_follows_kopfs_rule(status: dict | None, active: bool):
    body = None if status is None else {"metadata": {"name": "jest-operator"}, "status": status}
    assert peering_active(body, identity=ME, priority=int((status or {}).get(ME, {}).get("priority", 0)),
                          now=NOW) is active
