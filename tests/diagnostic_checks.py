"""The shape every located compile error must have, checked the same way by every test file."""

from __future__ import annotations

from mpdsl.diagnostics import CompileError


def assert_located(err: CompileError, source: str, line: int, col: int, message: str) -> None:
    """``err`` is reported at ``line``:``col`` with ``message`` and renders as four lines:
    ``FILE:LINE:COL: error: MESSAGE``, the source line in a numbered gutter, a caret under the
    column, and a one-line hint."""
    assert (err.line, err.col, err.message) == (line, col, message)
    rendered = err.render().splitlines()
    assert rendered[0].endswith(f":{line}:{col}: error: {message}"), rendered[0]
    source_line = source.splitlines()[line - 1]
    assert rendered[1].endswith(source_line) and rendered[1].lstrip().startswith(f"{line} |"), rendered[1]
    gutter = rendered[1].index("|") + 2
    assert rendered[2].index("^") - gutter == col - 1, "the caret must sit under the reported column"
    assert len(rendered) == 4 and rendered[3].startswith("  hint: ") and len(rendered[3]) > 10, rendered
