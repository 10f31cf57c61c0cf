"""Stage 1: .mp text -> AST. A lark LALR parser with positions kept; syntax errors become
``CompileError``s pointing at the offending token."""

from __future__ import annotations

import functools
import math
from importlib import resources
from pathlib import Path

import lark
from lark import Token, Tree

from mpdsl import ast
from mpdsl.diagnostics import CompileError, Source, Span, abbreviate
from mpdsl.limits import MAX_INT, MAX_NESTING

_TOKEN_NAMES = {
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'",
    "RBRACE": "'}'", "COMMA": "','", "COLON": "':'", "EQUAL": "'='", "PLUS": "'+'",
    "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "AT": "'@'", "NAME": "a name",
    "NUMBER": "a number", "INT": "an integer", "DOMAIN": "a domain (node, edge, graph, param, any)",
    "DTYPE": "'int' or 'float'", "STRING": "a string", "RETURN": "'return'", "__ANON_0": "'->'", "$END": "end of file",
}


@functools.lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = resources.files("mpdsl.grammar").joinpath("mpdsl.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True, cache=True)


def _describe(token_type: str) -> str:
    if token_type in _TOKEN_NAMES:
        return _TOKEN_NAMES[token_type]
    try:
        pattern = _parser().get_terminal(token_type).pattern
        if isinstance(pattern, lark.lexer.PatternStr):
            return f"'{pattern.value}'"
    except KeyError:
        pass
    return token_type.lower()


# Rules of the parse tree that nest: entering one is one level deeper (limits.MAX_NESTING), as
# the checker counts it; a left-associative operator adds a level for its right operand only
# (a + b + c is one level).
_NESTING = {"pow", "neg", "index", "call", "for_stmt"}
_LEFT_CHAIN = {"add", "sub", "mul", "div", "matmul"}


def _check_nesting(tree: Tree, source: Source) -> None:
    """Refuse programs nested deeper than ``MAX_NESTING`` (walked without recursion, left to right),
    at the first construct past the limit."""

    def refuse(node: Tree) -> CompileError:
        meta = node.meta
        return CompileError(f"nested more than {MAX_NESTING} levels deep",
                            Span(source, meta.line, meta.column, meta.end_line, meta.end_column),
                            "assign inner results to names first (h1 = ..., then f(h1)); calls, loops, unary "
                            "minus, indexing, ** and right operands each add a level")

    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        children = [c for c in node.children if isinstance(c, Tree)]
        if node.data in _NESTING:
            if depth + 1 > MAX_NESTING:
                raise refuse(node)
            inner = [(c, depth + 1) for c in children]
        elif node.data in _LEFT_CHAIN:
            lhs, rhs = children
            if depth + 1 > MAX_NESTING:
                raise refuse(rhs)
            inner = [(lhs, depth), (rhs, depth + 1)]
        else:
            inner = [(c, depth) for c in children]
        stack.extend(reversed(inner))


class _Builder:
    """Parse tree -> AST; every node gets the span of its text. ``build`` walks the tree without
    recursion (bottom-up), so long chains and deep nesting cost no Python stack."""

    def __init__(self, source: Source):
        self.source = source

    def build(self, tree: Tree):
        order: list[Tree] = []
        stack = [tree]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(c for c in node.children if isinstance(c, Tree))
        built: dict[int, object] = {}
        for node in reversed(order):  # every child before its parent
            children = [built.pop(id(c)) if isinstance(c, Tree) else c for c in node.children]
            if node.data == "for_stmt":  # the span of `start..stop`
                lo, hi = node.children[1].meta, node.children[2].meta
                children.append(Span(self.source, lo.line, lo.column, hi.end_line, hi.end_column))
            built[id(node)] = getattr(self, node.data)(node.meta, children)
        return built[id(tree)]

    def _span(self, meta) -> Span:
        if getattr(meta, "empty", True):
            return Span(self.source, 1, 1, 1, 2)
        return Span(self.source, meta.line, meta.column, meta.end_line, meta.end_column)

    def _tok_span(self, tok: Token) -> Span:
        return Span(self.source, tok.line, tok.column, tok.end_line, tok.end_column)

    def _int(self, tok: Token, what: str) -> int:
        """An integer token used as an integer (a dim, a loop bound): at most ``MAX_INT``."""
        text = str(tok)
        if len(text) > len(str(MAX_INT)) or int(text) > MAX_INT:
            raise CompileError(f"{what} {abbreviate(text)} is too large", self._tok_span(tok),
                               f"{what}s go up to 2**63 - 1 = {MAX_INT}")
        return int(text)

    def _float(self, tok: Token) -> float:
        value = float(str(tok))
        if math.isinf(value):
            raise CompileError(f"number {abbreviate(str(tok))} is too large", self._tok_span(tok),
                               "floats go up to about 1.8e308")
        return value

    def start(self, meta, items):
        return ast.Module(self._span(meta), tuple(items))

    def import_def(self, meta, children):
        return ast.Import(self._span(meta), str(children[0])[1:-1])

    def dim_def(self, meta, children):
        name, value = children
        return ast.DimDef(self._span(meta), str(name), self._int(value, "dimension"))

    def _func(self, kind, meta, children):
        name, args, (results, parenthesised), body = children
        return ast.FuncDef(self._span(meta), kind, str(name), self._tok_span(name),
                           tuple(args or ()), results, parenthesised, body)

    def layer_def(self, meta, children):
        return self._func("layer", meta, children)

    def model_def(self, meta, children):
        return self._func("model", meta, children)

    def arg_list(self, meta, children):
        return list(children)

    def arg(self, meta, children):
        name, typ, init = children
        return ast.Arg(self._span(meta), str(name), typ, init)

    def init_name(self, meta, children):
        return str(children[0])

    def init_number(self, meta, children):
        return children[0]

    def signed_number(self, meta, children):
        minus, number = (None, children[0]) if len(children) == 1 else children
        value = self._float(number)
        return -value if minus is not None else value

    def single_result(self, meta, children):
        typ = children[0]
        return (ast.Result(typ.span, None, typ),), False

    def result_tuple(self, meta, children):
        return tuple(children), True

    def result(self, meta, children):
        name, typ = children
        return ast.Result(self._span(meta), str(name) if name is not None else None, typ)

    def type(self, meta, children):
        domain, dims, dtype = children
        return ast.TypeExpr(self._span(meta), str(domain), tuple(dims or ()),
                            str(dtype) if dtype is not None else "float")

    def dim_list(self, meta, children):
        return list(children)

    def dim_expr(self, meta, children):
        return ast.DimExpr(self._span(meta), tuple(children))

    def dim_name(self, meta, children):
        return str(children[0])

    def dim_int(self, meta, children):
        return self._int(children[0], "dimension")

    def block(self, meta, children):
        return tuple(children)

    def assign(self, meta, children):
        *targets, value = children
        return ast.Assign(self._span(meta), tuple(str(t) for t in targets), value,
                          tuple(self._tok_span(t) for t in targets))

    def return_stmt(self, meta, children):
        return ast.Return(self._span(meta), tuple(children))

    def for_stmt(self, meta, children):
        var, start, stop, body, bounds = children
        return ast.For(self._span(meta), str(var), start, stop, body, bounds)

    def _binop(op):  # noqa: N805 - builds methods
        def method(self, meta, children):
            lhs, rhs = children
            return ast.BinOp(self._span(meta), op, lhs, rhs)
        return method

    add = _binop("add")
    sub = _binop("sub")
    mul = _binop("mul")
    div = _binop("div")
    matmul = _binop("matmul")
    pow = _binop("pow")

    def neg(self, meta, children):
        return ast.Neg(self._span(meta), children[0])

    def index(self, meta, children):
        base, idx = children
        return ast.Index(self._span(meta), base, idx)

    def number(self, meta, children):
        tok = children[0]
        text = str(tok)
        is_int = text.isdigit()
        int_value = int(text) if is_int and len(text) <= len(str(MAX_INT)) and int(text) <= MAX_INT else None
        return ast.Number(self._span(meta), self._float(tok), is_int, int_value)

    def name(self, meta, children):
        return ast.Name(self._span(meta), str(children[0]))

    def string(self, meta, children):
        return ast.String(self._span(meta), str(children[0])[1:-1])

    def shape_literal(self, meta, children):
        return ast.ShapeLiteral(self._span(meta), tuple(children[0]))

    def call(self, meta, children):
        name, args, by = children
        args = args or []
        positional = tuple(a for a in args if not isinstance(a, ast.Keyword))
        keywords = tuple(a for a in args if isinstance(a, ast.Keyword))
        by_name, by_span = (None, None) if by is None else by
        return ast.Call(self._span(meta), str(name), positional, keywords, by_name,
                        self._tok_span(name), by_span)

    def call_args(self, meta, children):
        return list(children)

    def keyword_arg(self, meta, children):
        name, value = children
        return ast.Keyword(self._span(meta), str(name), value)

    def by_clause(self, meta, children):
        tok = children[0]
        return str(tok), self._tok_span(tok)


def parse(text: str, filename: str = "<string>") -> ast.Module:
    """Parse .mp source text into an AST; raise ``CompileError`` on a syntax error."""
    source = Source(filename, text)
    try:
        tree = _parser().parse(text)
    except lark.UnexpectedCharacters as err:
        span = Span(source, err.line, err.column, err.line, err.column + 1)
        char = text[err.pos_in_stream] if err.pos_in_stream < len(text) else "?"
        raise CompileError(f"syntax error: unexpected character {char!r}", span,
                           "identifiers, numbers and the operators + - * / @ ** are allowed here") from None
    except lark.UnexpectedToken as err:
        tok = err.token
        if tok.type == "$END":
            line, col = source.end()
            span = Span(source, line, col, line, col + 1)
            found = "end of file"
        else:
            span = Span(source, tok.line, tok.column, tok.end_line or tok.line,
                        tok.end_column or tok.column + 1)
            found = repr(str(tok))
        expected = sorted({_describe(t) for t in err.expected})
        hint = "expected " + (", ".join(expected[:8]) + (" ..." if len(expected) > 8 else ""))
        raise CompileError(f"syntax error: unexpected {found}", span, hint) from None
    except lark.UnexpectedEOF as err:  # pragma: no cover - LALR reports UnexpectedToken($END)
        line, col = source.end()
        raise CompileError("syntax error: unexpected end of file", Span(source, line, col, line, col + 1),
                           f"expected {', '.join(sorted(err.expected))}") from None
    _check_nesting(tree, source)
    return _Builder(source).build(tree)


@functools.lru_cache(maxsize=1)
def prelude() -> ast.Module:
    """The prelude: layers every program can call (GRU cell, norms, ...), shadowable by the user."""
    text = resources.files("mpdsl").joinpath("prelude.mp").read_text()
    return parse(text, "<prelude>")


def resolve_imports(module: ast.Module, base_dir: Path) -> list[ast.Module]:
    """The modules ``module`` imports, transitively, each once, in dependency order (the module
    itself excluded). Paths are relative to the importing file."""
    main_name = module.span.source.name
    seen: set[str] = {str(Path(main_name).resolve())} if main_name != "<string>" else set()
    ordered: list[ast.Module] = []

    def visit(mod: ast.Module, directory: Path) -> None:
        for imp in mod.imports:
            path = (directory / imp.path).resolve()
            if str(path) in seen:
                continue
            seen.add(str(path))
            try:
                text = path.read_text()
            except OSError:
                raise CompileError(f"cannot import '{imp.path}': no such file", imp.span,
                                   f"the path is relative to this file's folder ({directory})") from None
            imported = parse(text, str(Path(imp.path) if not Path(imp.path).is_absolute() else path))
            visit(imported, path.parent)
            ordered.append(imported)

    visit(module, base_dir)
    return ordered
