"""Faults the fuzz campaign may tolerate while their fix is in flight elsewhere (none now). Each
entry is temporary and removed with its fix (the summary lists entries no case reached); the
campaign fails on every fault that matches no entry here.

A fault is keyed by its signature: the outcome (internal, hang, oom, or a user-error ``quality``
issue), the exception type, ``where`` (``file:function`` of the innermost frame in mpdsl/ or
backends/) and a regular expression on the message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownFault:
    name: str
    outcome: str  # internal | hang | oom | quality
    exception: str | None = None  # exception type (quality: the error class)
    where: str | None = None  # file:function (quality: the issue, e.g. "no hint")
    message: str | None = None  # regular expression searched in the message
    reproducer: str = ""

    def matches(self, result: dict, issue: str | None = None) -> bool:
        if self.outcome == "quality":
            return (issue == self.where and (self.exception is None or result.get("error") == self.exception)
                    and (self.message is None or re.search(self.message, result.get("message", "")) is not None))
        return (result["outcome"] == self.outcome
                and (self.exception is None or result.get("exception") == self.exception)
                and (self.where is None or result.get("where") == self.where)
                and (self.message is None or re.search(self.message, result.get("message", "")) is not None))


# Empty: every fault the campaign found has been fixed. An entry here is only ever a stopgap for a
# fault whose fix belongs to another change in flight, with its reproducer, and is removed with that fix.
KNOWN_FAULTS: tuple[KnownFault, ...] = ()


def known(result: dict, issue: str | None = None) -> KnownFault | None:
    return next((f for f in KNOWN_FAULTS if f.matches(result, issue)), None)
