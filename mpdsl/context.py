"""One compile object per model: the programs run for each configuration, and the graph layout.

``CompileContext`` holds a model's reference IR, its backend, the target device kind the
optimizer plans for and the optimizer settings. It specialises, retypes and optimizes the IR for
each configuration (dims, float dtype, batch-norm mode; for training, also the gradient and its
split), caches the result per configuration and counts how often the pass pipeline ran, so that
``CompiledModel``, the torch module and the command line compile the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mpdsl.autodiff import grad_program, mask_dropout, retype, set_batch_norm_mode, split_program
from mpdsl.diagnostics import MpdslError
from mpdsl.graph import Graph
from mpdsl.ir import Program
from mpdsl.passes import DEFAULT_PIPELINE, PRE_GRADIENT_PASSES, PassContext, optimize
from mpdsl.passes.rewrite import specialize
from mpdsl.plan import GraphLayout, choose_layout
from mpdsl.types import TensorType

TARGETS = ("cpu", "gpu")
MODES = ("eval", "train")


def check_target(target: Any) -> str:
    """``target`` after checking it is a device kind the optimizer plans for ("cpu" or "gpu")."""
    if target not in TARGETS:
        raise MpdslError(f"unknown target {target!r}",
                         "use target='cpu' or 'gpu' (--target cpu|gpu), or leave it out for the backend's own")
    return target


@dataclass
class Programs:
    """The programs of one configuration: ``forward`` (outputs only), ``train_forward`` (outputs, then
    the residuals named in ``residuals``), ``backward`` (``d_<param>`` then ``d_<input>`` from the
    inputs, params, masks, cotangents ``d_<output>`` and residuals), the dropout ``masks`` (name, type,
    p) and the ``gradient`` program before the split."""

    forward: Program
    train_forward: Program
    backward: Program
    residuals: list[str]
    masks: list[tuple[str, TensorType, float]]
    gradient: Program

    @property
    def output_names(self) -> list[str]:
        return [name for name, _ in self.forward.outputs]


def _dims_key(dims: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(dims.items()))


class CompileContext:
    """How one model is compiled, and the programs compiled so far.

    ``ir``: the verified reference IR (dims bound from the data still symbolic); ``backend``: the
    backend instance that runs the programs; ``target``: the device kind the passes plan layouts for,
    "cpu" or "gpu" (default: the backend's ``target`` attribute, else "cpu"; another value is an
    ``MpdslError``); ``optimize``: run the pass pipeline (False: the reference IR, specialised, is
    run); ``passes``: the pipeline (None: ``DEFAULT_PIPELINE``); ``layout``: the graph layout mode of
    ``mpdsl.plan`` ("auto", "reorder", "none").

    Every program is cached per configuration key; ``pipeline_runs`` counts, per key, how often the
    pass pipeline was run to build its entry (1 once built: a later request is answered from the
    cache). Keys are ``("program", dims, dtype, mode)`` and ``("training", dims, dtype, training,
    grad_inputs, wrt)``, dims as sorted (name, size) pairs and dtype resolved (None: the IR's).
    """

    def __init__(self, ir: Program, backend: Any, *, target: str | None = None, optimize: bool = True,
                 passes: Sequence[str] | None = None, layout: str = "auto"):
        self.ir = ir
        self.backend = backend
        self.target = check_target(getattr(backend, "target", "cpu") if target is None else target)
        self.optimize = optimize
        self.passes = None if passes is None else list(passes)
        self.layout = layout
        self.pipeline_runs: Counter[tuple] = Counter()
        self._optimized: dict[tuple, tuple[Program, PassContext]] = {}
        self._reference: dict[tuple, Program] = {}
        self._training: dict[tuple, Programs] = {}

    @property
    def total_pipeline_runs(self) -> int:
        """How often the pass pipeline ran, all keys together."""
        return sum(self.pipeline_runs.values())

    # ---- programs --------------------------------------------------------------------------

    def reference(self, dims: Mapping[str, int], dtype: str | None = None, mode: str | None = None) -> Program:
        """The reference IR specialised to ``dims``, in float ``dtype`` ("f32", "f64", "f16", "bf16";
        None: the IR's own), with its batch norms fixed to ``mode`` ("eval" / "train"; None: as
        written, so that the training flag of each run picks their form). Cached."""
        key = self._key(dims, dtype, mode)
        if key not in self._reference:
            program = specialize(self.ir, dict(dims))
            if key[2] != self.ir.float_dtype:
                program = retype(program, key[2])
            if mode is not None:
                program = set_batch_norm_mode(program, mode == "train")
            self._reference[key] = program
        return self._reference[key]

    def optimized(self, dims: Mapping[str, int], dtype: str | None = None,
                  mode: str | None = None) -> tuple[Program, PassContext]:
        """``reference(dims, dtype, mode)`` run through the pass pipeline for the target, with the
        pass context (its notes are the plan's decisions); the pipeline runs once per key, whatever
        ``optimize`` says (the command line prints optimized IR of models compiled either way)."""
        key = self._key(dims, dtype, mode)
        if key not in self._optimized:
            reference = self.reference(dims, dtype, mode)
            self.pipeline_runs[key] += 1
            self._optimized[key] = optimize(reference, self.passes, dict(dims), target=self.target)
        return self._optimized[key]

    def program(self, dims: Mapping[str, int], dtype: str | None = None, mode: str | None = "eval") -> Program:
        """The program run for these dims, float dtype (None: the IR's own) and batch-norm mode
        ("eval" / "train"; None: as written, chosen by each run's training flag): optimized for the
        target when ``optimize``, else the reference specialised. Cached per (dims, dtype, mode)."""
        if self.optimize:
            return self.optimized(dims, dtype, mode)[0]
        return self.reference(dims, dtype, mode)

    def training_programs(self, dims: Mapping[str, int], dtype: str, training: bool,
                          grad_inputs: Sequence[str], wrt: Sequence[str]) -> Programs:
        """The programs of a differentiable run (see ``Programs``): the reference IR specialised to
        ``dims``, retyped to ``dtype``, its batch norms fixed to the training or eval form, and in
        training its dropouts turned into mask inputs; its gradient program (of the reference after
        ``PRE_GRADIENT_PASSES`` when optimizing: fused attention gets its fused backward) with respect to the
        parameters ``wrt`` and the inputs ``grad_inputs`` (keeping the forward outputs); both
        optimized for the target when ``optimize``; the gradient split where the output cotangents
        come in. Cached per (dims, dtype, training, grad_inputs, wrt)."""
        key = ("training", _dims_key(dims), self._dtype(dtype), bool(training), tuple(grad_inputs), tuple(wrt))
        if key in self._training:
            return self._training[key]
        mode = "train" if training else "eval"
        reference = self.reference(dims, dtype, mode)
        masks: list = []
        if training:
            reference, masks = mask_dropout(reference)
        outputs = [name for name, _ in reference.outputs]
        pipeline = DEFAULT_PIPELINE if self.passes is None else self.passes
        early = [name for name in PRE_GRADIENT_PASSES if name in pipeline] if self.optimize else []
        differentiated = optimize(reference, early, dict(dims), target=self.target)[0] if early else reference
        gradient = grad_program(differentiated, wrt=list(wrt), inputs=list(grad_inputs), keep_outputs=True)
        forward = reference
        if self.optimize:
            # Without dropout masks the forward program is the one plain runs use (shared cache entry).
            forward = optimize(reference, self.passes, dict(dims), target=self.target)[0] if training \
                else self.optimized(dims, dtype, mode)[0]
            self.pipeline_runs[key] += 1
            gradient = optimize(gradient, self.passes, dict(dims), target=self.target)[0]
        cotangents: list[str] = []
        for v in gradient.values:
            name = v.name
            if v.op in ("input", "param") and name is not None and name.startswith("d_") and name[2:] in outputs:
                cotangents.append(name)
        train_forward, backward, residuals = split_program(gradient, outputs, cotangents)
        self._training[key] = Programs(forward, train_forward, backward, residuals, masks, gradient)
        return self._training[key]

    # ---- layout ----------------------------------------------------------------------------

    def choose_layout(self, graph: Graph, program: Program,
                      meanwhile: Callable[[], object] | None = None) -> GraphLayout | None:
        """The graph layout to run ``program`` on ``graph`` with (None: the graph as given). On the
        cpu target, when optimizing: ``mpdsl.plan.choose_layout`` in the context's layout mode (node
        reordering for locality, edges sorted by destination). The gpu target runs graphs in their
        given order (node reordering and edge sorting are CPU cache-locality choices), and so does
        an unoptimized model. ``meanwhile`` runs while a node order is computed, when one is."""
        return layout_for(graph, program, self.target, self.layout if self.optimize else "none", meanwhile)

    # ---- helpers ---------------------------------------------------------------------------

    def _dtype(self, dtype: str | None) -> str:
        return self.ir.float_dtype if dtype is None else dtype

    def _key(self, dims: Mapping[str, int], dtype: str | None, mode: str | None) -> tuple:
        if mode is not None and mode not in MODES:
            raise MpdslError(f"unknown mode {mode!r}", "use mode='eval' or 'train' (None: batch norms as written)")
        return ("program", _dims_key(dims), self._dtype(dtype), mode)

    def __repr__(self) -> str:
        return (f"CompileContext({self.ir.name!r}, backend={getattr(self.backend, 'name', '?')!r}, "
                f"target={self.target!r}, optimize={self.optimize}, layout={self.layout!r})")




def layout_for(graph: Graph, program: Program, target: str, mode: str,
               meanwhile: Callable[[], object] | None = None) -> GraphLayout | None:
    """The graph layout of a run for ``target`` in layout ``mode`` ("none" for an unoptimized model):
    ``mpdsl.plan.choose_layout`` on the cpu target, the graph as given on the gpu target."""
    if target != "cpu" or mode == "none":
        return None
    return choose_layout(graph, program, mode, meanwhile)


__all__ = ["MODES", "TARGETS", "CompileContext", "Programs", "check_target", "layout_for"]
