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

MAX_BRACKET_DEPTH = 100 * MAX_NESTING
"""Brackets ``(`` and ``[`` nest at most this deep in the text. Checked before parsing, so that a
text nested tens of thousands of levels deep (which the parser would take seconds to read) is
refused at once. It is far past anything ``MAX_NESTING`` lets through (plain parentheses add no
level there), so programs that nest too deep but not absurdly are refused after parsing, at the
first construct past ``MAX_NESTING``."""

MAX_STEPS = 20_000
"""One model (or one layer, checked on its own) unrolls to at most this many steps: IR values
emitted, loop iterations and layer calls together."""

MAX_INT = 2**63 - 1
"""Largest integer literal used as an integer (dims, loop bounds, indices, axes, classes) and
largest dimension or per-row feature size (the product of a value's feature dims): int64."""
