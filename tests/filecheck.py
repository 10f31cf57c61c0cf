"""A small FileCheck: ``CHECK: text`` lines must match in order (substring per line),
``CHECK-NEXT: text`` on the line right after the previous match, ``CHECK-NOT: text`` nowhere between
the previous match and the next one (or the end)."""

from __future__ import annotations


def filecheck(text: str, checks: str) -> None:
    lines = text.splitlines()
    position = 0  # index of the next line to search
    pending_not: list[str] = []
    for raw in checks.splitlines():
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        kind, _, pattern = raw.partition(":")
        pattern = pattern.strip()
        if kind == "CHECK-NOT":
            pending_not.append(pattern)
            continue
        if kind == "CHECK-NEXT":
            if position >= len(lines) or pattern not in lines[position]:
                got = lines[position] if position < len(lines) else "<end>"
                raise AssertionError(f"CHECK-NEXT: {pattern!r} not on the next line: {got!r}")
            found = position
        elif kind == "CHECK":
            found = next((i for i in range(position, len(lines)) if pattern in lines[i]), None)
            if found is None:
                raise AssertionError(f"CHECK: {pattern!r} not found after line {position}:\n{text}")
        else:
            raise ValueError(f"unknown directive {kind!r}")
        for forbidden in pending_not:
            for i in range(position, found):
                if forbidden in lines[i]:
                    raise AssertionError(f"CHECK-NOT: {forbidden!r} found on line {i}: {lines[i]!r}")
        pending_not = []
        position = found + 1
    for forbidden in pending_not:
        for i in range(position, len(lines)):
            if forbidden in lines[i]:
                raise AssertionError(f"CHECK-NOT: {forbidden!r} found on line {i}: {lines[i]!r}")
