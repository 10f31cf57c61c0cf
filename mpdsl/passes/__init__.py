"""Stage 3: IR -> IR passes.

A pass is a named class with a ``run(program, ctx) -> program`` method and a docstring stating its
contract; ``PASSES`` registers them by name. ``PassManager`` runs a list of passes, verifies the IR
after each when asked (always in tests), and names the pass that broke it. Passes record their
decisions (what they did and why) in ``ctx.notes`` for the plan report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from mpdsl.diagnostics import MpdslError
from mpdsl.ir import Program, VerificationError, verify


@dataclass
class PassContext:
    """What passes may consult and record: concrete dims (where bound) and notes per pass."""

    dims: dict[str, int] = field(default_factory=dict)
    notes: list[tuple[str, str]] = field(default_factory=list)
    target: str = "cpu"  # the kind of device the backend runs on: "cpu" or "gpu" (layout choices differ)

    def note(self, pass_name: str, text: str) -> None:
        self.notes.append((pass_name, text))


class Pass:
    """Base class: subclasses set ``name`` and implement ``run``."""

    name: ClassVar[str] = ""

    def run(self, program: Program, ctx: PassContext) -> Program:
        raise NotImplementedError


PASSES: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    PASSES[cls.name] = cls
    return cls


class PassError(Exception):
    """A pass produced invalid IR (a compiler bug); names the pass."""


class UnknownPassError(MpdslError):
    pass


class PassManager:
    """Runs passes in order; with ``verify_each`` the verifier runs after every pass."""

    def __init__(self, names: list[str], verify_each: bool = False):
        _load_passes()
        unknown = [n for n in names if n not in PASSES]
        if unknown:
            raise UnknownPassError(f"unknown pass(es): {', '.join(unknown)}",
                                   f"available passes: {', '.join(sorted(PASSES))}")
        self.passes = [PASSES[n]() for n in names]
        self.verify_each = verify_each

    def run(self, program: Program, ctx: PassContext | None = None) -> Program:
        ctx = ctx or PassContext()
        for p in self.passes:
            program = p.run(program, ctx)
            if self.verify_each:
                try:
                    verify(program)
                except VerificationError as err:
                    raise PassError(f"pass '{p.name}' produced invalid IR: {err}") from None
        return program


def _load_passes() -> None:
    from mpdsl.passes import algebra, cleanup, fusion, layout  # noqa: F401  (registration)


DEFAULT_PIPELINE = [
    "constant_folding", "canonicalize", "cse", "hoist_gathers", "reorder_linear", "hoist_gathers", "cse",
    "typed_matmul", "fuse_attention", "fuse_message_aggregate", "fuse_match_aggregate", "reuse_products", "cse", "dce",
    "select_layout",
]


# Run on a reference program before it is differentiated (when optimizing): fusions whose adjoint is
# itself fused (attention: a destination and a source pass over the saved log-sum-exp), which the
# passes could not recover from the unfused gradient. Only those in the pipeline in use run.
PRE_GRADIENT_PASSES = ["fuse_attention"]


def optimize(program: Program, passes: list[str] | None = None, dims: dict[str, int] | None = None,
             verify_each: bool = False, target: str = "cpu") -> tuple[Program, PassContext]:
    """Run ``passes`` (default: ``DEFAULT_PIPELINE``) on ``program`` for a ``target`` device kind."""
    ctx = PassContext(dims=dict(dims or {}), target=target)
    result = PassManager(list(DEFAULT_PIPELINE if passes is None else passes), verify_each).run(program, ctx)
    return result, ctx
