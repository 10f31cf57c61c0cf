"""User-facing errors.

Every error a user can cause (bad program, bad graph, bad weights, bad inputs) is an
``MpdslError``. Errors tied to program text carry a ``Span`` and render as
``file:line:col: error: message``, the source line, a caret under the offending text and a
one-line hint, in the style of compilers users already know. Compiler bugs are never
reported through this class.
"""

from __future__ import annotations

from dataclasses import dataclass


def shown(text: str, quote: bool = False) -> str:
    """``text`` as it may be printed in a message: as it is (in single quotes with ``quote``) when
    every character is printable, else as a Python literal, so control characters never reach the
    terminal."""
    if text.isprintable():
        return f"'{text}'" if quote else text
    return repr(text)



EXCERPT_WIDTH = 120  # characters of a source line shown in an error; longer lines are cut around the caret


def abbreviate(text: str, limit: int = 24) -> str:
    """Literal text for a message: a long one (a 5,000-digit number) shortened, its length given."""
    if len(text) <= limit:
        return text
    unit = "digits" if text.isdigit() else "characters"
    return f"{text[:10]}...{text[-6:]} ({len(text)} {unit})"


@dataclass(frozen=True)
class Source:
    """A program text with the name it is reported under."""

    name: str
    text: str

    def line(self, lineno: int) -> str:
        """Line ``lineno`` (1-based) as the parser counts lines: only ``\n`` ends a line (a form
        feed, a vertical tab, U+0085, U+2028 or a lone ``\r`` does not)."""
        lines = self.text.split("\n")
        return lines[lineno - 1].removesuffix("\r") if 0 < lineno <= len(lines) else ""

    def end(self) -> tuple[int, int]:
        """(line, column) just past the last character; a final newline does not start a line."""
        text = self.text.removesuffix("\n")
        return text.count("\n") + 1, len(text.rsplit("\n", 1)[-1].removesuffix("\r")) + 1


@dataclass(frozen=True)
class Span:
    """A 1-based line/column range in a ``Source``; ``end_col`` is exclusive."""

    source: Source
    line: int
    col: int
    end_line: int
    end_col: int

    @property
    def location(self) -> str:
        return f"{self.source.name}:{self.line}:{self.col}"

    def excerpt(self) -> str:
        """The source line with a caret and tildes under the spanned text. Characters that would
        move the cursor or are invisible show as a space (so the caret stays under its column);
        a long line is cut to a window around the caret."""
        text = self.source.line(self.line)
        width = (self.end_col - self.col) if self.end_line == self.line else len(text) - self.col + 1
        width = max(1, width)
        start = self.col - 1
        if len(text) > EXCERPT_WIDTH:
            first = max(0, min(start - EXCERPT_WIDTH // 3, len(text) - EXCERPT_WIDTH))
            shown = text[first:first + EXCERPT_WIDTH]
            prefix = "..." if first else ""
            suffix = "..." if first + EXCERPT_WIDTH < len(text) else ""
            text = prefix + shown + suffix
            start = start - first + len(prefix)
            width = max(1, min(width, len(prefix) + len(shown) - start))
        text = "".join(c if c == "\t" or c.isprintable() else " " for c in text)
        gutter = f"{self.line:>4} | "
        pad = " " * (len(gutter) - 2) + "| "
        lead = "".join("\t" if c == "\t" else " " for c in text[:start]).ljust(start)
        underline = lead + "^" + "~" * (width - 1)
        return f"{gutter}{text}\n{pad}{underline}"


class MpdslError(Exception):
    """Base class of every error caused by user input; ``render()`` is what the user sees."""

    kind = "error"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        out = f"{self.kind}: {self.message}"
        if self.hint:
            out += f"\n  hint: {self.hint}"
        return out

    def __str__(self) -> str:
        return self.render()


class CompileError(MpdslError):
    """An error in a program's text, located by a span."""

    def __init__(self, message: str, span: Span | None, hint: str | None = None):
        super().__init__(message, hint)
        self.span = span

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def col(self) -> int | None:
        return self.span.col if self.span else None

    def render(self) -> str:
        if self.span is None:
            return super().render()
        out = f"{self.span.location}: {self.kind}: {self.message}\n{self.span.excerpt()}"
        if self.hint:
            out += f"\n  hint: {self.hint}"
        return out


class GraphError(MpdslError):
    """A graph (arrays, file) that does not satisfy the graph format."""


class WeightsError(MpdslError):
    """Weights that are missing, misnamed or misshapen for a model's parameters."""


class InputError(MpdslError):
    """Model inputs that are missing or do not match the model's declared input types."""
