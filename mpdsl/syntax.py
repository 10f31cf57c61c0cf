"""Stage 1: .mp text -> AST. A lark LALR parser with positions kept; syntax errors become
``CompileError``s pointing at the offending token."""

from __future__ import annotations

import functools
import math
import os
import re
import stat
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import lark
from lark import Token, Tree

from mpdsl import ast
from mpdsl.diagnostics import CompileError, MpdslError, Source, Span, abbreviate, shown
from mpdsl.limits import MAX_BRACKET_DEPTH, MAX_INT, MAX_NESTING

_TOKEN_NAMES = {
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'",
    "RBRACE": "'}'", "COMMA": "','", "COLON": "':'", "EQUAL": "'='", "PLUS": "'+'",
    "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "AT": "'@'", "NAME": "a name",
    "NUMBER": "a number", "INT": "an integer", "DOMAIN": "a domain (node, edge, graph, param, any)",
    "DTYPE": "'int' or 'float'", "STRING": "a string", "RETURN": "'return'", "__ANON_0": "'->'", "$END": "end of file",
    "COMPARE_OP": "a comparison (< <= > >= == !=)", "AMPERSAND": "'&'", "VBAR": "'|'", "NOT": "'not'",
}
# The IR op of each comparison operator.
_COMPARISONS = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}


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


# Rules of the parse tree that nest: entering one is one level deeper (limits.MAX_NESTING), as
# the checker counts it; a left-associative operator adds a level for its right operand only
# (a + b + c is one level).
_NESTING = {"pow", "neg", "logical_not", "compare", "index", "call", "for_stmt"}
_LEFT_CHAIN = {"add", "sub", "mul", "div", "matmul", "logical_and", "logical_or"}


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


def _binop(op: str):
    """The tree-to-AST rule of a binary operator rule named like the IR op ``op``."""
    def method(self: _Builder, meta, children) -> ast.BinOp:
        lhs, rhs = children
        return ast.BinOp(self._span(meta), op, lhs, rhs)
    return method


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
        # tokens from the parser always carry positions (propagate_positions=True)
        assert tok.line is not None and tok.column is not None and tok.end_line is not None \
            and tok.end_column is not None
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

    def edges_def(self, meta, children):
        name, kind, base, count = children
        return ast.EdgesDef(self._span(meta), str(name), self._tok_span(name),
                            None if kind is None else str(kind), None if base is None else str(base),
                            None if kind is None else self._tok_span(kind),
                            None if base is None else self._tok_span(base),
                            None if count is None else count[0], None if count is None else count[1])

    def hop_number(self, meta, children):
        """A hop count as written (``2``, ``-1``, ``2.5``), with its span: the checker reads it."""
        written = self.source.text[meta.start_pos:meta.end_pos]  # the "-" is no token of the tree
        return "".join(written.split()), self._span(meta)

    def hop_name(self, meta, children):
        return str(children[0]), self._span(meta)

    def typed_edges_def(self, meta, children):
        name, src, dst = children
        return ast.EdgesDef(self._span(meta), str(name), self._tok_span(name), src=str(src), dst=str(dst),
                            src_span=self._tok_span(src), dst_span=self._tok_span(dst))

    def nodes_def(self, meta, children):
        (name,) = children
        return ast.NodesDef(self._span(meta), str(name), self._tok_span(name))

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
        domain, rows, dims, dtype = children
        rowset, rowset_span = (None, None) if rows is None else rows
        return ast.TypeExpr(self._span(meta), str(domain), tuple(dims or ()),
                            str(dtype) if dtype is not None else "float", rowset, rowset_span)

    def type_set(self, meta, children):
        return str(children[0]), self._tok_span(children[0])

    def dim_list(self, meta, children):
        return list(children)

    def dim_name(self, meta, children):
        return ast.DimExpr(self._span(meta), "name", str(children[0]))

    def dim_int(self, meta, children):
        return ast.DimExpr(self._span(meta), "int", self._int(children[0], "dimension"))

    def _dim_combination(self, kind: str, meta, children) -> ast.DimExpr:
        """A sum or product of dims (the grammar gives a chain's terms flat), a parenthesised one of
        the same kind spliced in (``F + (G + H)`` is one sum of three)."""
        operands = tuple(o for c in children for o in (c.operands if c.kind == kind else (c,)))
        span = self._span(meta)
        depth = 1 + max(o.depth for o in operands)
        if depth > MAX_NESTING:
            raise CompileError(f"dimension nested more than {MAX_NESTING} levels deep", span,
                               "write the dimension with fewer parentheses, or declare parts of it with "
                               "`dim NAME = ...`")
        return ast.DimExpr(span, kind, None, operands, depth)

    def dim_add(self, meta, children):
        return self._dim_combination("sum", meta, children)

    def dim_mul(self, meta, children):
        return self._dim_combination("product", meta, children)

    def dim_plus(self, meta, children):
        return children[0]

    def dim_minus(self, meta, children):
        raise CompileError("subtraction is not supported in dimensions",
                           Span(self.source, meta.line, meta.column, meta.line, meta.column + 1),
                           "dims are sums and products of names and integers (2 * D + FE): name the smaller "
                           "dim and write the larger one as a sum")

    def bound_name(self, meta, children):
        return str(children[0])

    def bound_int(self, meta, children):
        return self._int(children[0], "loop bound")

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

    add = _binop("add")
    sub = _binop("sub")
    mul = _binop("mul")
    div = _binop("div")
    matmul = _binop("matmul")
    pow = _binop("pow")
    logical_and = _binop("logical_and")
    logical_or = _binop("logical_or")

    def neg(self, meta, children):
        return ast.Neg(self._span(meta), children[0])

    def logical_not(self, meta, children):
        return ast.Not(self._span(meta), children[0])

    def compare(self, meta, children):
        """``a < b``; comparisons do not chain (``a < b < c`` would read as Python's
        ``a < b and b < c`` to some and as ``(a < b) < c`` to others): refused at the second operator."""
        if len(children) > 3:
            first, second = children[1], children[3]
            raise CompileError(f"comparisons do not chain: '{first}' and then '{second}'", self._tok_span(second),
                               f"combine two comparisons with &, e.g. (a {first} b) & (b {second} c)")
        lhs, op, rhs = children
        return ast.BinOp(self._span(meta), _COMPARISONS[str(op)], lhs, rhs)

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

    def member(self, meta, children):
        base, attr = children
        return ast.Member(self._span(meta), str(base), str(attr), self._tok_span(base), self._tok_span(attr))

    def string(self, meta, children):
        return ast.String(self._span(meta), str(children[0])[1:-1])

    def shape_literal(self, meta, children):
        return ast.ShapeLiteral(self._span(meta), tuple(children[0]))

    def call(self, meta, children):
        name, args, by = children
        args = args or []
        positional = tuple(a for a in args if not isinstance(a, ast.Keyword))
        keywords = tuple(a for a in args if isinstance(a, ast.Keyword))
        by_name, by_span, by_set, by_set_span = (None, None, None, None) if by is None else by
        return ast.Call(self._span(meta), str(name), positional, keywords, by_name,
                        self._tok_span(name), by_span, by_set, by_set_span)

    def call_args(self, meta, children):
        return list(children)

    def keyword_arg(self, meta, children):
        name, value = children
        return ast.Keyword(self._span(meta), str(name), value)

    def by_clause(self, meta, children):
        if len(children) == 2:  # by looped.dst
            set_tok, tok = children
            return str(tok), self._tok_span(tok), str(set_tok), self._tok_span(set_tok)
        tok = children[0]
        return str(tok), self._tok_span(tok), None, None


_BRACKETS = re.compile(r'#[^\n]*|"[^"\n]*"|[(\[]|[)\]]')


def _check_bracket_depth(text: str, source: Source) -> None:
    """Refuse a text whose brackets nest deeper than ``MAX_BRACKET_DEPTH``, at the first bracket past
    it (comments and strings skipped), before the parser reads it."""
    depth = 0
    for match in _BRACKETS.finditer(text):
        token = match.group()
        if token in "([":
            depth += 1
            if depth > MAX_BRACKET_DEPTH:
                line = text.count("\n", 0, match.start()) + 1
                col = match.start() - (text.rfind("\n", 0, match.start()) + 1) + 1
                raise CompileError(f"brackets nested more than {MAX_BRACKET_DEPTH} levels deep",
                                   Span(source, line, col, line, col + 1),
                                   "assign inner results to names first (h1 = ..., then f(h1))")
        elif token in ")]":
            depth = max(0, depth - 1)


def parse(text: str, filename: str = "<string>") -> ast.Module:
    """Parse .mp source text into an AST; raise ``CompileError`` on a syntax error."""
    source = Source(filename, text)
    if len(text) > MAX_SOURCE_BYTES:
        raise CompileError(f"{shown(filename)}: the program text is larger than {MAX_SOURCE_SIZE}", None,
                           f"a program holds at most {MAX_SOURCE_SIZE} of text: split it into files that import "
                           "each other")
    _check_bracket_depth(text, source)
    try:
        tree = _parser().parse(text)
    except lark.UnexpectedCharacters as err:
        span = Span(source, err.line, err.column, err.line, err.column + 1)
        pos = err.pos_in_stream
        char = text[pos] if pos is not None and pos < len(text) else "?"
        raise CompileError(f"syntax error: unexpected character {char!r}", span,
                           "identifiers, numbers and the operators + - * / @ ** < <= > >= == != & | are "
                           "allowed here") from None
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


# ---- reading program files and resolving imports ------------------------------------------------

MAX_SOURCE_BYTES = 256 << 10  # the most a program (a file, main or imported, or text) may hold: parsing
MAX_SOURCE_SIZE = "256 KiB"  # it takes about 2 s on one core, 50 times the largest example
MAX_IMPORT_DEPTH = 64       # the longest chain of nested imports


def decode_source(data: bytes, name: str) -> str:
    """The text of a program file's bytes (UTF-8); undecodable bytes are a ``CompileError`` located at
    the first of them."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        col = len(data[line_start:err.start].decode("utf-8", errors="replace")) + 1
        span = Span(Source(name, data.decode("utf-8", errors="replace")), line, col, line, col + 1)
        raise CompileError(f"the file is not UTF-8 text: byte 0x{data[err.start]:02x} cannot be decoded", span,
                           "mpdsl programs are UTF-8 text; save the file as UTF-8") from None


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


class _Refused(Exception):
    """Why an import's file is not read (a reason to show after its path)."""


def _read_regular_file(path: str) -> bytes:
    """The bytes of the regular file at the real path ``path``, at most ``MAX_SOURCE_BYTES``. Anything else (a folder,
    FIFO, device, socket) is refused from its ``stat``, before it is opened; the open file is checked
    again, in case the path changed in between."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise _Refused("no such file") from None
    except PermissionError:
        raise _Refused("permission denied") from None
    except OSError as err:
        raise _Refused(f"cannot read it ({err.strerror or err})") from None
    if not stat.S_ISREG(info.st_mode):
        raise _Refused(f"it is {_file_kind(info.st_mode)}, not a regular file")
    too_large = _Refused(f"it is larger than {MAX_SOURCE_SIZE}")
    if info.st_size > MAX_SOURCE_BYTES:
        raise too_large
    # ``path`` is a real path: a link put in its place after it was resolved is refused too
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except PermissionError:
        raise _Refused("permission denied") from None
    except OSError as err:
        raise _Refused(f"cannot read it ({err.strerror or err})") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _Refused(f"it is {_file_kind(info.st_mode)}, not a regular file")
        data = handle.read(MAX_SOURCE_BYTES + 1)
    if len(data) > MAX_SOURCE_BYTES:
        raise too_large
    return data


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def import_roots(base_dir: str | Path, import_paths: Iterable[str | Path] = ()) -> tuple[str, list[str]]:
    """(the program's folder, the ``import_paths`` folders), each as a real path; a path that is not an
    existing folder is an ``MpdslError``."""
    if isinstance(import_paths, (str, os.PathLike)):
        import_paths = [import_paths]
    extra = []
    for folder in import_paths:
        try:
            real = os.path.realpath(os.fspath(folder))
        except (TypeError, ValueError):
            raise MpdslError(f"import path {shown(str(folder), quote=True)} is not a folder path",
                             "pass folders to import_paths / --import-path") from None
        if not os.path.isdir(real):
            raise MpdslError(f"import path {shown(str(folder), quote=True)} is not a folder",
                             "pass existing folders to import_paths / --import-path") from None
        extra.append(real)
    return os.path.realpath(os.fspath(base_dir)), extra


class Imports(NamedTuple):
    """What a program imports: ``modules``, transitively, each once, in dependency order (the
    program itself excluded), and ``direct``: by ``id`` of a module (the program's included), the
    modules its own imports name (a file's layers see the dims of the files it imports)."""

    modules: list[ast.Module]
    direct: dict[int, list[ast.Module]]


def resolve_imports(module: ast.Module, base_dir: str | Path,
                    import_paths: Iterable[str | Path] = ()) -> list[ast.Module]:
    """The modules ``module`` imports, transitively, each once, in dependency order (see
    ``resolve_import_graph``)."""
    return resolve_import_graph(module, base_dir, import_paths).modules


def resolve_import_graph(module: ast.Module, base_dir: str | Path,
                         import_paths: Iterable[str | Path] = ()) -> Imports:
    """The modules ``module`` imports, transitively, each once, in dependency order (the module
    itself excluded), and which module imports which, under the import policy (README, Imports):

    - an import names a ``.mp`` file by a relative path, looked up first from the importing file's
      folder, then from each of ``import_paths`` in order;
    - the file found must lie (after following links) inside the main program's folder
      ``base_dir`` or one of ``import_paths``; a path leading elsewhere, and an absolute path outside
      ``import_paths``, is refused before anything there is read;
    - it must be a regular file of at most ``MAX_SOURCE_BYTES`` bytes, in UTF-8; a folder, FIFO or
      device is refused without being opened;
    - a refusal quotes the import statement, never the file it names."""
    program_root, extra_roots = import_roots(base_dir, import_paths)
    roots = [program_root] + extra_roots
    main_name = module.span.source.name
    seen: set[str] = {os.path.realpath(main_name)} if main_name != "<string>" else set()
    by_path: dict[str, ast.Module] = {path: module for path in seen}
    ordered: list[ast.Module] = []
    direct: dict[int, list[ast.Module]] = {}

    def refuse(imp: ast.Import, reason: str, hint: str) -> CompileError:
        return CompileError(f"cannot import {shown(imp.path, quote=True)}: {reason}", imp.span, hint)

    allow_hint = "allow another folder with --import-path DIR (Python: import_paths=[DIR])"

    def locate(imp: ast.Import, directory: str) -> str:
        path = imp.path
        bad = next((c for c in path if ord(c) < 32 or ord(c) == 127), None)
        if bad is not None:
            raise CompileError(f"import path contains the control character {bad!r}", imp.span,
                               'an import names a .mp file by its path, e.g. import "lib/layers.mp"')
        if not path.endswith(".mp"):
            raise refuse(imp, "only .mp files can be imported", 'name a .mp file, e.g. import "lib/layers.mp"')
        if os.path.isabs(path):
            candidates = [os.path.normpath(path)]
            if not any(_inside(candidates[0], root) for root in extra_roots):
                raise refuse(imp, "an absolute import path must lie inside an --import-path folder",
                             "import relative to this file, or " + allow_hint)
        else:
            candidates = [os.path.normpath(os.path.join(folder, path)) for folder in [directory] + extra_roots]
            candidates = [c for c in candidates if any(_inside(c, root) for root in roots)]
            if not candidates:
                raise refuse(imp, "the path leads outside the program's folder",
                             "imports stay inside the main program's folder and the --import-path folders; "
                             + allow_hint)
        for candidate in candidates:
            if os.path.lexists(candidate):
                real = os.path.realpath(candidate)
                if not any(_inside(real, root) for root in roots):
                    raise refuse(imp, "it is a link to a file outside the program's folder", allow_hint)
                if not real.endswith(".mp"):
                    raise refuse(imp, "it is a link to a file that is not a .mp program",
                                 "import the .mp file itself")
                return real
        searched = ", ".join([directory] + extra_roots)
        raise refuse(imp, "no such file", f"the path is relative to this file's folder ({searched})"
                     if not extra_roots else f"searched: {searched}")

    def visit(mod: ast.Module, directory: str, depth: int) -> None:
        names = direct.setdefault(id(mod), [])
        for imp in mod.imports:
            if depth >= MAX_IMPORT_DEPTH:
                raise refuse(imp, f"imports nest more than {MAX_IMPORT_DEPTH} files deep",
                             "import the shared files from fewer levels")
            path = locate(imp, directory)
            if path in seen:
                if path in by_path and by_path[path] not in names:
                    names.append(by_path[path])
                continue
            seen.add(path)
            try:
                data = _read_regular_file(path)
            except _Refused as why:
                raise refuse(imp, str(why), "an import names a regular .mp file of at most "
                             f"{MAX_SOURCE_SIZE}") from None
            name = imp.path if not os.path.isabs(imp.path) else path
            imported = parse(decode_source(data, name), name)
            by_path[path] = imported
            names.append(imported)
            visit(imported, os.path.dirname(path), depth + 1)
            ordered.append(imported)

    visit(module, program_root, 0)
    return Imports(ordered, direct)
