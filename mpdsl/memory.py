"""The memory budget: how many bytes one step (reading a file, initialising parameters, a run)
may allocate, checked from declared sizes before anything is allocated.

The budget is, in order of precedence:

1. an explicit limit: ``memory_limit=`` of ``mpdsl.compile`` / ``Graph.load`` (or
   ``CompiledModel.memory_limit``), the CLI's ``--memory-limit``;
2. the ``MPDSL_MEMORY_LIMIT`` environment variable;
3. the memory this process can still get when the check is made: the machine's available memory
   (``MemAvailable`` of ``/proc/meminfo``, else the free physical pages from ``os.sysconf``), or
   less where the process is limited: its address-space limit (``ulimit -v``, ``RLIMIT_AS``) less
   the address space it holds, or its cgroup's memory limit (``memory.max``, as in a container or
   a batch job) less the memory the cgroup uses; where none can be read there is no limit. A check
   that states what it needs (``budget(needed=...)``) and needs under 1/``SMALL_SHARE`` of a reading
   taken less than ``RECENT_SECONDS`` ago is answered from that reading: a loop of small runs does
   not read ``/proc`` at every call, and no run that could come near the budget is checked against
   an old figure.

A limit is a number of bytes or a size with a binary unit: ``4G``, ``512M``, ``1.5GiB``,
``2048K`` (``K`` = 1024 bytes, ``M``, ``G``, ``T``, ``P``; a trailing ``B`` / ``iB`` is
accepted), or ``none`` for no limit.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

from mpdsl.diagnostics import MpdslError

ENV_VAR = "MPDSL_MEMORY_LIMIT"
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
NO_LIMIT = "none"
AVAILABLE = "the machine's available memory"
ADDRESS_SPACE = "the process's address-space limit (ulimit -v) less what it holds"
CGROUP = "the cgroup's memory limit less its use"
DEFAULT_SOURCES = (AVAILABLE, ADDRESS_SPACE, CGROUP)  # budgets measured when the check is made
RECENT_SECONDS = 1.0  # a reading of the machine's bounds this recent answers a small check
SMALL_SHARE = 16      # a small check needs less than 1/SMALL_SHARE of that reading

Limit = int | str | None
"""What a caller passes: bytes, a size string such as "4G", "none", or None (the default)."""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGTPE]?)(?:I?B)?\s*$", re.IGNORECASE | re.ASCII)
_process_limit: contextvars.ContextVar[Limit] = contextvars.ContextVar("mpdsl_memory_limit", default=None)

RAISE = f"raise the budget with --memory-limit SIZE (memory_limit= in Python, or {ENV_VAR})"
HINT = f"use smaller data or dims, or {RAISE}"


def parse_size(text: str) -> int | None:
    """Bytes for a size such as "4G", "512M", "1.5GiB" or "1024"; None for "none". Raises
    ValueError for anything else."""
    if text.strip().lower() == NO_LIMIT:
        return None
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (bytes, or a number with K, M, G, T or P; or 'none')")
    number, unit = match.groups()
    return int(float(number) * UNITS[unit.upper()])


def available_memory() -> int | None:
    """Bytes the machine can still give this process without swapping, or None if unknown (the
    smallest of the bounds that ``available_bounds`` finds)."""
    bounds = available_bounds()
    return min(bounds.values()) if bounds else None


def available_bounds() -> dict[str, int]:
    """What limits the memory this process can still get: the machine's available memory, the
    process's address-space limit less its address space, the cgroup's limit less its use; each
    as {description: bytes}, those that can be read."""
    bounds: dict[str, int] = {}
    machine = _read_kib("/proc/meminfo", "MemAvailable:")
    if machine is None:
        try:
            machine = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            machine = None
    if machine is not None:
        bounds[AVAILABLE] = machine
    soft = _address_space_limit()
    held = _read_kib("/proc/self/status", "VmSize:")
    if soft is not None and held is not None:
        bounds[ADDRESS_SPACE] = max(0, soft - held)
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        bounds[CGROUP] = max(0, limit - used)
    return bounds


def _address_space_limit() -> int | None:
    """The soft ``RLIMIT_AS`` in bytes; None where there is none (or no ``resource`` module)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        return None if soft == resource.RLIM_INFINITY or soft < 0 else soft
    except (ImportError, OSError, ValueError):
        return None


def _read_kib(path: str, key: str) -> int | None:
    """A ``key: N kB`` line of a /proc file, in bytes."""
    try:
        with open(path, encoding="ascii") as lines:
            for line in lines:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: str) -> int | None:
    """A file holding one integer (``max`` and unreadable files: None)."""
    try:
        with open(path, encoding="ascii") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Budget:
    """``limit`` bytes (None: unlimited) and where that figure comes from, for messages."""

    limit: int | None
    source: str

    def describe(self) -> str:
        return f"the memory budget of {format_bytes(self.limit)} ({self.source})"

    def allows(self, nbytes: int) -> bool:
        return self.limit is None or nbytes <= self.limit


def _coerce(limit: Limit, what: str) -> tuple[bool, int | None]:
    """(given, bytes) for an explicit limit; ``given`` is False for None."""
    if limit is None:
        return False, None
    if isinstance(limit, bool) or not isinstance(limit, (int, str)):
        raise MpdslError(f"{what} must be a number of bytes or a size such as '4G', got {limit!r}",
                         "pass e.g. memory_limit='16G', or 'none' for no limit")
    if isinstance(limit, int):
        if limit < 0:
            raise MpdslError(f"{what} must not be negative, got {limit}", "pass a number of bytes >= 0")
        return True, limit
    try:
        return True, parse_size(limit)
    except ValueError as err:
        raise MpdslError(f"{what}: {err}", "pass e.g. '16G', '512M', or 'none' for no limit") from None


def check_limit(limit: Limit, what: str = "memory_limit") -> Limit:
    """``limit`` itself after checking that it is a valid limit (for early errors)."""
    _coerce(limit, what)
    return limit


_recent_bounds: tuple[float, dict[str, int]] | None = None  # (monotonic time, available_bounds()) of the last reading


def _measured_bounds(needed: int | None) -> dict[str, int]:
    """``available_bounds()``, or the last reading when it is recent and ``needed`` bytes are a small
    share of it (see the module docstring)."""
    global _recent_bounds
    now = time.monotonic()
    recent = _recent_bounds
    if needed is not None and recent is not None and recent[1] and now - recent[0] < RECENT_SECONDS \
            and needed * SMALL_SHARE < min(recent[1].values()):
        return recent[1]
    bounds = available_bounds()
    _recent_bounds = (now, bounds)
    return bounds


def budget(limit: Limit = None, needed: int | None = None) -> Budget:
    """The budget in force for an explicit ``limit`` (see the module docstring); ``needed``, the bytes
    the caller is about to check, lets a small check reuse a recent reading of the machine."""
    given, value = _coerce(limit, "memory_limit")
    if given:
        return Budget(value, "memory_limit" if value is not None else "no limit")
    given, value = _coerce(_process_limit.get(), "--memory-limit")
    if given:
        return Budget(value, "--memory-limit" if value is not None else "no limit")
    env = os.environ.get(ENV_VAR)
    if env is not None and env.strip():
        given, value = _coerce(env, ENV_VAR)
        return Budget(value, ENV_VAR if value is not None else "no limit")
    bounds = _measured_bounds(needed)
    if not bounds:
        return Budget(None, "no limit")
    source = min(bounds, key=bounds.__getitem__)
    return Budget(bounds[source], source)


@contextlib.contextmanager
def limited(limit: Limit) -> Iterator[None]:
    """Within the block, ``limit`` is the default of every check without an explicit limit
    (the CLI's ``--memory-limit``)."""
    check_limit(limit, "--memory-limit")
    token = _process_limit.set(limit)
    try:
        yield
    finally:
        _process_limit.reset(token)


def format_bytes(n: int | None) -> str:
    """``n`` bytes with a binary unit (``1.5 GiB``); None is "no limit"."""
    if n is None:
        return "no limit"
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024
        if value < 1024 or unit == "EiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def array_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes of an array of ``shape`` (exact Python integers: no overflow)."""
    count = 1
    for size in shape:
        count *= int(size)
    return count * int(itemsize)


def shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"
