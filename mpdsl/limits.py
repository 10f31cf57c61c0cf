"""Limits on the compile-time work a program may ask for.

Loops are unrolled and layers inlined when a program is checked, so the size of the IR is
not the size of the text: ``for t in 0..1000000000`` or a chain of layers each calling the
next one twice would otherwise run for ever. A program beyond a limit is refused with a
``CompileError`` at the text responsible, naming the limit and how to restructure.
"""

MAX_NESTING = 100
"""Expressions and loops nest at most this many levels deep: calls, unary minus, indexing,
``**``, the right operand of ``+ - * / @`` and ``for`` bodies each add a level, counted
through inlined layer calls. A flat chain ``a + b + c + ...`` is one level whatever its length."""

MAX_STEPS = 20_000
"""One model (or one layer, checked on its own) unrolls to at most this many steps: IR values
emitted, loop iterations and layer calls together."""

MAX_INT = 2**63 - 1
"""Largest integer literal used as an integer (dims, loop bounds, indices, axes, classes) and
largest dimension or per-row feature size (the product of a value's feature dims): int64."""
