"""Stage 1: .mp text -> AST. A lark LALR parser with positions kept; syntax errors become
``CompileError``s pointing at the offending token."""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import lark
from lark import Token, Transformer, v_args

from mpdsl import ast
from mpdsl.diagnostics import CompileError, Source, Span

_TOKEN_NAMES = {
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'",
    "RBRACE": "'}'", "COMMA": "','", "COLON": "':'", "EQUAL": "'='", "PLUS": "'+'",
    "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "AT": "'@'", "NAME": "a name",
    "NUMBER": "a number", "INT": "an integer", "DOMAIN": "a domain (node, edge, graph, param, any)",
    "DTYPE": "'int' or 'float'", "STRING": "a string", "RETURN": "'return'", "__ANON_0": "'->'", "$END": "end of file",
}


@functools.lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    """The parser, built once per process (about 30 ms). Never from lark's on-disk cache: that is a
    pickle under a predictable name in the shared temp folder, so whoever can write there could plant
    one and run code as the next user of the compiler."""
    grammar = resources.files("mpdsl.grammar").joinpath("mpdsl.lark").read_text(encoding="utf-8")
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True, cache=False)


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


class _Builder(Transformer):
    """Parse tree -> AST; every node gets the span of its text."""

    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    def _span(self, meta) -> Span:
        if getattr(meta, "empty", True):
            return Span(self.source, 1, 1, 1, 2)
        return Span(self.source, meta.line, meta.column, meta.end_line, meta.end_column)

    def _tok_span(self, tok: Token) -> Span:
        return Span(self.source, tok.line, tok.column, tok.end_line, tok.end_column)

    @v_args(meta=True)
    def start(self, meta, items):
        return ast.Module(self._span(meta), tuple(items))

    @v_args(meta=True)
    def import_def(self, meta, children):
        return ast.Import(self._span(meta), str(children[0])[1:-1])

    @v_args(meta=True)
    def dim_def(self, meta, children):
        name, value = children
        return ast.DimDef(self._span(meta), str(name), int(value))

    def _func(self, kind, meta, children):
        name, args, (results, parenthesised), body = children
        return ast.FuncDef(self._span(meta), kind, str(name), self._tok_span(name),
                           tuple(args or ()), results, parenthesised, body)

    @v_args(meta=True)
    def layer_def(self, meta, children):
        return self._func("layer", meta, children)

    @v_args(meta=True)
    def model_def(self, meta, children):
        return self._func("model", meta, children)

    def arg_list(self, children):
        return list(children)

    @v_args(meta=True)
    def arg(self, meta, children):
        name, typ, init = children
        return ast.Arg(self._span(meta), str(name), typ, init)

    def init_name(self, children):
        return str(children[0])

    def init_number(self, children):
        return children[0]

    def signed_number(self, children):
        minus, number = (None, children[0]) if len(children) == 1 else children
        value = float(number)
        return -value if minus is not None else value

    def single_result(self, children):
        typ = children[0]
        return (ast.Result(typ.span, None, typ),), False

    def result_tuple(self, children):
        return tuple(children), True

    @v_args(meta=True)
    def result(self, meta, children):
        name, typ = children
        return ast.Result(self._span(meta), str(name) if name is not None else None, typ)

    @v_args(meta=True)
    def type(self, meta, children):
        domain, dims, dtype = children
        return ast.TypeExpr(self._span(meta), str(domain), tuple(dims or ()),
                            str(dtype) if dtype is not None else "float")

    def dim_list(self, children):
        return list(children)

    @v_args(meta=True)
    def dim_expr(self, meta, children):
        return ast.DimExpr(self._span(meta), tuple(children))

    def dim_name(self, children):
        return str(children[0])

    def dim_int(self, children):
        return int(children[0])

    def block(self, children):
        return tuple(children)

    @v_args(meta=True)
    def assign(self, meta, children):
        *targets, value = children
        return ast.Assign(self._span(meta), tuple(str(t) for t in targets), value,
                          tuple(self._tok_span(t) for t in targets))

    @v_args(meta=True)
    def return_stmt(self, meta, children):
        return ast.Return(self._span(meta), tuple(children))

    @v_args(meta=True)
    def for_stmt(self, meta, children):
        var, start, stop, body = children
        return ast.For(self._span(meta), str(var), start, stop, body)

    def _binop(op):  # noqa: N805 - builds methods
        @v_args(meta=True)
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

    @v_args(meta=True)
    def neg(self, meta, children):
        return ast.Neg(self._span(meta), children[0])

    @v_args(meta=True)
    def index(self, meta, children):
        base, idx = children
        return ast.Index(self._span(meta), base, idx)

    @v_args(meta=True)
    def number(self, meta, children):
        text = str(children[0])
        is_int = text.isdigit()
        return ast.Number(self._span(meta), float(text), is_int)

    @v_args(meta=True)
    def name(self, meta, children):
        return ast.Name(self._span(meta), str(children[0]))

    @v_args(meta=True)
    def string(self, meta, children):
        return ast.String(self._span(meta), str(children[0])[1:-1])

    @v_args(meta=True)
    def shape_literal(self, meta, children):
        return ast.ShapeLiteral(self._span(meta), tuple(children[0]))

    @v_args(meta=True)
    def call(self, meta, children):
        name, args, by = children
        args = args or []
        positional = tuple(a for a in args if not isinstance(a, ast.Keyword))
        keywords = tuple(a for a in args if isinstance(a, ast.Keyword))
        by_name, by_span = (None, None) if by is None else by
        return ast.Call(self._span(meta), str(name), positional, keywords, by_name,
                        self._tok_span(name), by_span)

    def call_args(self, children):
        return list(children)

    @v_args(meta=True)
    def keyword_arg(self, meta, children):
        name, value = children
        return ast.Keyword(self._span(meta), str(name), value)

    def by_clause(self, children):
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
            lines = text.splitlines() or [""]
            line = len(lines)
            span = Span(source, line, len(lines[-1]) + 1, line, len(lines[-1]) + 2)
            found = "end of file"
        else:
            span = Span(source, tok.line, tok.column, tok.end_line or tok.line,
                        tok.end_column or tok.column + 1)
            found = repr(str(tok))
        expected = sorted({_describe(t) for t in err.expected})
        hint = "expected " + (", ".join(expected[:8]) + (" ..." if len(expected) > 8 else ""))
        raise CompileError(f"syntax error: unexpected {found}", span, hint) from None
    except lark.UnexpectedEOF as err:  # pragma: no cover - LALR reports UnexpectedToken($END)
        raise CompileError("syntax error: unexpected end of file", None,
                           f"expected {', '.join(sorted(err.expected))}") from None
    return _Builder(source).transform(tree)


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
