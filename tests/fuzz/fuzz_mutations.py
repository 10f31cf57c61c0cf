"""Mutations of .mp programs (the examples and generated programs): token deletions,
duplications, swaps and replacements, numbers replaced by huge, zero, negative and 5,000-digit
values, deep nesting (1,000 nested calls, unary minuses or parentheses, 1,000-term sums, nested
loops), unusual whitespace (form feed, vertical tab, U+0085, U+2028, lone carriage returns),
non-ASCII text, NUL bytes, truncation, splices of other programs and byte flips."""

from __future__ import annotations

import random
import re
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

TOKEN = re.compile(r'\s+|#[^\n]*|"[^"\n]*"|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+|[A-Za-z_][A-Za-z0-9_]*|->|\*\*|\.\.|.',
                   re.S)
VOCABULARY = ("model", "layer", "dim", "import", "for", "in", "return", "by", "node", "edge", "graph", "param",
              "any", "int", "float", "src", "dst", "batch", "sum", "mean", "max", "min", "std", "softmax", "relu",
              "concat", "reshape", "einsum", "one_hot", "in_degree", "mlp2", "gru_cell", "layer_norm",
              "batch_norm", "(", ")", "[", "]", "{", "}", ",", ":", "=", "+", "-", "*", "/", "@", "**", "->",
              "..", '"hd,hde->he"', '"lib.mp"', "0", "1", "-1", "x", "h", "W", "T", "F", "axis", "$", ";", "'")
NUMBERS = ("0", "00", "-1", "-0", "1", "2147483648", str(2**63 - 1), str(2**63), str(2**64), "1" + "0" * 30,
           "9" * 5000, "1" + "0" * 400, "1e400", "1e-400", "0.0", "1.5", ".5", "5.", "1e5", "1000000", "1000000000",
           "123456789012345678901234567890", "-9" * 3, "0x10", "1_000", "٣")
WHITESPACE = ("\f", "\v", "\x85", "\u2028", "\u2029", "\r", "\r\n", "\t", "\x00", "\u00a0", "\ufeff", "\u200b",
              "\x1b[2J", "\n\n\n")
NON_ASCII = ("é", "ñ", "Ω", "𝑥", "ä", "数", "\U0001F600", "а", "\u0301", "ß", "ǅ", "\U000E0041")
# Same-class replacements keep the program parseable, so the checker and the backends see it.
CLASSES = (
    ("node", "edge", "graph", "param", "any"),
    ("dst", "src", "graph", "batch"),
    ("+", "-", "*", "/", "@", "**"),
    ("sum", "mean", "max", "min", "std", "softmax"),
    ("relu", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "abs", "gelu", "silu", "softplus", "dropout",
     "leaky_relu", "elu", "in_degree", "out_degree"),
    ("concat", "maximum", "minimum", "einsum", "reshape", "one_hot", "mlp2", "layer_norm", "gru_cell"),
    ("glorot", "zeros", "ones", "normal", "uniform", "constant"),
)
WRAPPERS = ("relu({})", "-{}", "({})", "sum({}, -1)", "exp({})", "{}[src]", "{} + 1", "1 * {}", "{} ** 1")


def example_bases() -> list[tuple[str, dict]]:
    """(main file name, files) of every example; imports resolve to the unmutated siblings."""
    bases = []
    for path in sorted(EXAMPLES.glob("*.mp")):
        files = {path.name: path.read_text()}
        for imported in re.findall(r'^import "([^"]+)"', files[path.name], re.M):
            if (EXAMPLES / imported).is_file():
                files[imported] = (EXAMPLES / imported).read_text()
        bases.append((path.name, files))
    return bases


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


def _solid(toks: list[str]) -> list[int]:
    return [i for i, t in enumerate(toks) if t.strip() and not t.startswith("#")]


def _names(toks: list[str]) -> list[str]:
    return sorted({t for t in toks if t.isidentifier()}) or ["x"]


def _return_span(text: str, rng: random.Random) -> tuple[int, int] | None:
    """Start and end of the expression of one return statement (to its line's end)."""
    spots = [m for m in re.finditer(r"return (.+)$", text, re.M)]
    if not spots:
        return None
    m = rng.choice(spots)
    expr = m.group(1).split("#")[0].rstrip()
    return m.start(1), m.start(1) + len(expr)


def deep(text: str, rng: random.Random) -> str:
    """Deep nesting or a long flat chain at one return expression (or a deep loop nest)."""
    span = _return_span(text, rng)
    if span is None:
        return text
    start, end = span
    expr = text[start:end]
    n = rng.choice((100, 101, 150, 1000, 1000, 3000))
    kind = rng.randrange(7)
    if kind == 0:
        new = "relu(" * n + expr + ")" * n
    elif kind == 1:
        new = "-" * n + f"({expr})"
    elif kind == 2:
        new = "(" * n + expr + ")" * n
    elif kind == 3:
        new = " + ".join([f"({expr})"] * n)
    elif kind == 4:
        new = f"({expr})" + " * 1" * n
    elif kind == 5:
        new = rng.choice(WRAPPERS).format(f"({expr})")
        for _ in range(n - 1):
            new = rng.choice(WRAPPERS).format(new)
    else:
        loop_start = text.rfind("{", 0, start)  # wrap the statement in nested one-iteration loops
        stmt = text.rfind("\n", 0, start) + 1
        if loop_start < 0:
            return text
        m = min(n, 300)
        body = text[stmt:start].replace("return", "r_ =") + expr
        nested = "".join(f"for t{i} in 0..1 {{ " for i in range(m)) + body + " }" * m
        return text[:stmt] + nested + "\n    return " + expr + text[end:]
    return text[:start] + new + text[end:]


def mutate(text: str, rng: random.Random, others: list[str]) -> str:
    toks = tokens(text)
    solid = _solid(toks)
    if not solid:
        return text + rng.choice(VOCABULARY)
    op = rng.randrange(22)
    i = rng.choice(solid)
    if op >= 16:  # a token replaced by another of its class (a name by a name, a number by a number, ...)
        return "".join(_same_class(toks, solid, rng))
    if op == 0:  # delete a token
        del toks[i]
    elif op == 1:  # duplicate a token
        toks.insert(i, toks[i])
    elif op == 2:  # swap with the next solid token
        later = [j for j in solid if j > i]
        if later:
            j = later[0]
            toks[i], toks[j] = toks[j], toks[i]
    elif op == 3:  # replace by a vocabulary token or a name of the file
        toks[i] = rng.choice(VOCABULARY + tuple(_names(toks)))
    elif op == 4:  # replace a number
        numbers = [j for j in solid if toks[j][0].isdigit()]
        j = rng.choice(numbers) if numbers else i
        toks[j] = rng.choice(NUMBERS)
    elif op == 5:
        return deep(text, rng)
    elif op == 6:  # unusual whitespace: replace one, or insert one
        spaces = [j for j, t in enumerate(toks) if t.isspace()]
        if spaces and rng.random() < 0.5:
            toks[rng.choice(spaces)] = rng.choice(WHITESPACE)
        else:
            toks.insert(i, rng.choice(WHITESPACE))
    elif op == 7:  # non-ASCII in a name, a string or a comment
        j = rng.choice([k for k in solid if toks[k].isidentifier() or toks[k].startswith('"')] or [i])
        pos = rng.randrange(len(toks[j]) + 1)
        toks[j] = toks[j][:pos] + rng.choice(NON_ASCII) + toks[j][pos:]
    elif op == 8:  # a NUL byte
        toks.insert(i, "\x00")
    elif op == 9:  # truncate
        return text[: rng.randrange(len(text) + 1)]
    elif op == 10:  # splice a piece of another program
        other = rng.choice(others)
        a = rng.randrange(len(other) + 1)
        piece = other[a:a + rng.randrange(1, 200)]
        pos = rng.randrange(len(text) + 1)
        return text[:pos] + piece + text[pos:]
    elif op == 11:  # a huge loop or dim
        dims = [m for m in re.finditer(r"(dim \w+ = )(\d+)", text)] + [m for m in re.finditer(r"(\.\.)(\w+)", text)]
        if dims:
            m = rng.choice(dims)
            return text[:m.start(2)] + rng.choice(("1000000000", "100000", "20001", "5000", "0", str(2**63))) + text[m.end(2):]
        toks.insert(i, " for t in 0..1000000000 { } ")
    elif op == 12:  # duplicate a whole line
        lines = text.split("\n")
        k = rng.randrange(len(lines))
        lines.insert(k, lines[k])
        return "\n".join(lines)
    elif op == 13:  # einsum subscripts with other characters
        strings = [j for j in solid if toks[j].startswith('"')]
        if strings:
            j = rng.choice(strings)
            toks[j] = rng.choice(('"äd,hde->he"', '"hd,hde->hé"', '"HD,HDE->HE"', '"h d,hde->he"', '"hd,hde"',
                                  '"hd,hde->hee"', '"->"', '""', '"hd,,->he"', '"h\td,hde->he"', '"hd,hde->he->h"'))
        else:
            toks[i] = 'einsum("ä,äb->b", x, x)'
    elif op == 14:  # swap two lines
        lines = text.split("\n")
        a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[a], lines[b] = lines[b], lines[a]
        return "\n".join(lines)
    else:  # an initializer or a type changed
        toks[i] = rng.choice(("= constant", "= glorot", "= 1e400", "= -", "= zeros", "node[]", "param[0]",
                              "param[F, F, F, F, F, F]", "edge int", "graph[F] int", "any[D]", "node[F * F]",
                              f"param[{2**62}, {2**62}]", "node[9223372036854775807]"))
    return "".join(toks)


def _same_class(toks: list[str], solid: list[int], rng: random.Random) -> list[str]:
    names = [n for n in _names(toks) if n not in {w for c in CLASSES for w in c}]
    for _ in range(20):
        i = rng.choice(solid)
        tok = toks[i]
        group = next((c for c in CLASSES if tok in c), None)
        if group is not None:
            toks[i] = rng.choice(group)
            return toks
        if tok[0].isdigit():
            toks[i] = rng.choice(("0", "1", "2", "3", "4", "8", "16", "0.5", "1.0"))
            return toks
        if tok.isidentifier() and names:
            toks[i] = rng.choice(names)
            return toks
    return toks


def mutated_case(rng: random.Random, bases: list[tuple[str, dict]]) -> dict:
    """One case: a base program with one to three mutations, sometimes written as broken bytes."""
    main, files = rng.choice(bases)
    files = dict(files)
    text = files[main]
    others = [t for _, fs in bases[:20] for t in fs.values()]
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        text = mutate(text, rng, others)
    data: str | bytes = text
    if rng.random() < 0.04:  # a byte flipped or a stray byte: possibly invalid UTF-8
        raw = bytearray(text.encode("utf-8", "surrogatepass"))
        if raw:
            k = rng.randrange(len(raw))
            raw[k] = rng.choice((0xFF, 0xC3, 0x80, raw[k] ^ 0x40))
        data = bytes(raw)
    files[main] = data
    sizes = {"F": rng.randint(1, 5), "Fe": rng.randint(1, 4), "FE": rng.randint(1, 4)}
    n = rng.choice((1, 5, 12, 34))
    graph = {"components": [[n, rng.randint(0, 3 * n), rng.random() < 0.5]]
             + ([[rng.randint(1, 6), rng.randint(0, 10), False]] if rng.random() < 0.3 else []),
             "seed": rng.randrange(2**16), "sizes": sizes, "float64": rng.random() < 0.3}
    options = {"dtype": rng.choice(("float32", "float32", "float64")), "optimize": rng.random() < 0.8,
               "emit": rng.random() < 0.2, "train_mode": rng.random() < 0.1}
    if rng.random() < 0.05:
        options["dims"] = rng.choice(({"H": 3}, {"H": 0}, {"C": 1}, {"T": 0}, {"T": 50}, {"HID": 2**40}))
    if rng.random() < 0.03:
        options["model"] = rng.choice(("m", "nope", ""))
    return {"kind": "program", "origin": "mutated", "files": files, "main": main, "options": options,
            "graph": graph}
