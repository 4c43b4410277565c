"""How often one client may ask for images the registry has not served: a token bucket each.

A pull of a new image name costs a Nix evaluation and build, seconds of a
core and gigabytes; a cached answer costs microseconds. :mod:`nixeryd.nixslots`
bounds the Nix work of all clients together, so one client asking for many
new names could still take every slot and make everyone else's new images
wait or be refused. :class:`ClientBuckets` gives each client (an
authenticated user by name, else its remote address) a bucket of ``burst``
requests for names not yet served, refilled at ``rate`` per second; past it
the client is answered ``429 TOOMANYREQUESTS`` with ``Retry-After`` (the
seconds until its next token), before anything is evaluated.

Requests for what the registry has served (a tag it answered, any manifest or
blob by digest, the in-memory answers) take no token: cached answers are not
limited. The buckets are kept for the most recent :data:`CLIENTS_KEPT`
clients, least recently seen dropped first, so memory stays bounded however
many addresses a flood comes from; a dropped client starts again with a full
bucket, which is the most it could have had.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from nixeryd.errors import TooManyRequests

#: Clients whose buckets are kept (about 100 bytes each).
CLIENTS_KEPT = 10_000

_UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
_RATE = re.compile(
    r"\s*(\d+(?:\.\d+)?)\s*/\s*(second|minute|hour)\s*(?:,\s*(?:burst\s*)?(\d+))?\s*"
)


@dataclass(frozen=True)
class Rate:
    """``count`` requests per ``seconds``, ``burst`` at once (a bucket's size)."""

    count: float
    seconds: float
    burst: int

    @property
    def per_second(self) -> float:
        return self.count / self.seconds

    def __str__(self) -> str:
        unit = next(name for name, seconds in _UNITS.items() if seconds == self.seconds)
        return f"{self.count:g}/{unit}, burst {self.burst}"


def parse_rate(text: str) -> Rate | None:
    """``"N/second|minute|hour"``, optionally ``", burst B"`` (default: N rounded up);
    ``"0"`` or ``""``: no limit (None). ValueError for anything else."""
    if text.strip() in ("", "0"):
        return None
    match = _RATE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a rate: write N/second, N/minute or N/hour, optionally "
            "followed by ', burst B' (e.g. '20/minute, burst 10'), or 0 for no limit"
        )
    count = float(match.group(1))
    burst = int(match.group(3)) if match.group(3) else max(1, math.ceil(count))
    if count <= 0 or burst < 1:
        raise ValueError(f"{text!r}: the rate and the burst must be positive")
    return Rate(count, _UNITS[match.group(2)], burst)


class ClientBuckets:
    """A token bucket per client, for the most recently seen :data:`CLIENTS_KEPT`."""

    def __init__(self, rate: Rate, clock: Any, kept: int = CLIENTS_KEPT) -> None:
        self.rate = rate
        self._clock = clock
        self._kept = kept
        #: client -> (tokens, when they were counted); least recently seen first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str, what: str) -> None:
        """Take a token of ``client``'s, or raise :class:`TooManyRequests` for ``what``."""
        now: float = self._clock.seconds()
        tokens, then = self._buckets.pop(client, (float(self.rate.burst), now))
        tokens = min(float(self.rate.burst), tokens + (now - then) * self.rate.per_second)
        if tokens < 1.0:
            self._keep(client, tokens, now)
            retry_after = max(1, math.ceil((1.0 - tokens) / self.rate.per_second))
            raise TooManyRequests(
                f"{what}: this client asked for more images the registry has not served "
                f"than it may ({self.rate}: NIXERYD_BUILD_RATE); try again in "
                f"{retry_after} s",
                retry_after=retry_after,
                detail={"rate": str(self.rate)},
            )
        self._keep(client, tokens - 1.0, now)

    def _keep(self, client: str, tokens: float, now: float) -> None:
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self._kept:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
