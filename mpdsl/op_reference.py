"""The IR op reference (``docs/ops.md``), generated from the op table: ``python -m mpdsl.op_reference``."""

from __future__ import annotations

import itertools

from mpdsl.ops import OPS, OpDef


def _effect_text(opdef: OpDef) -> str:
    if not callable(opdef.effect):
        return opdef.effect.value
    effects = sorted({opdef.effect_of(dict(zip(opdef.closed_attrs(), values))).value
                      for values in _closed_combinations(opdef)})
    return " or ".join(effects) + " (by attribute)"


def _closed_combinations(opdef: OpDef):
    return itertools.product(*opdef.closed_attrs().values())


def reference() -> str:
    """The IR op reference in Markdown (``docs/ops.md`` is this text; a test keeps them equal)."""
    lines = ["# IR ops", "",
             "Generated from `mpdsl.ops.OPS` by `python -m mpdsl.op_reference > docs/ops.md`; do not edit by hand.",
             "Operands: how many an op takes (`n+`: at least n). Attribute values in braces are a closed set;",
             "a type name is an open value. Traits and effects are `mpdsl.ops.Trait` and `mpdsl.ops.Effect`.", ""]
    for name in sorted(OPS):
        d = OPS[name]
        arity = "1+" if d.arity is None else str(d.arity)
        attrs = ", ".join(f"`{k}` " + ("{" + ", ".join(map(str, v)) + "}" if isinstance(v, tuple) else v.__name__)
                          + (f" (default {d.defaults[k]!r}, not printed)" if k in d.defaults else "")
                          for k, v in d.attrs.items()) or "none"
        traits = ", ".join(sorted(t.value for t in d.traits)) or "none"
        gradient = f"none ({d.no_gradient})" if d.no_gradient else ("declared vjp" if d.vjp else "adjoint rule")
        contract = " ".join(d.doc.split())
        lines += [f"## `{name}`", "", f"- operands: {arity}; attributes: {attrs}",
                  f"- traits: {traits}; effect: {_effect_text(d)}; gradient: {gradient}",
                  f"- declared result type: {'yes' if d.declared else 'no'}", "", contract, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference(), end="")
