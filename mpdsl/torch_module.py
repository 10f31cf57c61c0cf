"""Compiled models as trainable torch modules.

``to_torch(model)`` wraps a ``CompiledModel`` in a ``torch.nn.Module`` whose parameters are
``nn.Parameter``s named (and ordered) as in the .mp file. ``module(graph, **inputs)`` runs the model's
programs on its backend inside a ``torch.autograd.Function``, so ``loss.backward()`` fills
``param.grad`` and any torch optimizer trains the model. Float inputs given as tensors that require
grad get gradients too.

The programs, per (dims, dtype, training mode, inputs differentiated): the gradient program of the
reference IR (``mpdsl.autodiff.grad_program``, keeping the forward outputs), optimized by the model's
passes like any program (so the backward graph ops are fused too), then split where the output
cotangents come in (``split_program``): the forward part computes the outputs and the residuals the
backward part reads, the backward part the gradients. A training step computes each forward value
once. Without autograd (``torch.no_grad()``, or nothing requiring grad) the plain optimized forward
program runs.

* The module computes in the dtype of its parameters (float32 or float64): ``module.double()`` runs
  the float64 form of the program.
* ``train()`` / ``eval()`` switch dropout and batch norm, as for torch modules (a new module starts
  in training mode). In training, each dropout's mask is drawn from torch's generator
  (``torch.manual_seed`` makes runs repeatable) and is an input of both parts, so the backward pass
  uses the forward pass's mask; ``batch_norm`` normalises with the batch statistics (its gradient
  flows through them) and each call updates its running statistics, as torch.nn.BatchNorm1d. In
  eval mode ``batch_norm`` uses the running statistics.
* The running statistics of ``batch_norm`` (its second and third arguments) are buffers, not
  parameters: they get no gradients and optimizers leave them alone.
* ``state_dict()`` holds one tensor per .mp parameter (the running statistics included):
  ``CompiledModel.load_weights(state_dict)`` loads it back, and ``sync()`` writes the module's
  current weights into its compiled model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mpdsl.autodiff import batch_norm_statistics
from mpdsl.context import Programs
from mpdsl.diagnostics import InputError, MpdslError
from mpdsl.plan import GraphLayout, choose_layout
from mpdsl.runtime import CompiledModel, as_graph
from mpdsl.types import Domain, TensorType

TORCH_DTYPES = {torch.float32: ("f32", np.float32), torch.float64: ("f64", np.float64)}


@dataclass
class _Call:
    """One forward call, as its backward needs it."""

    module: MpdslModule
    programs: Programs
    graph: Any                          # the graph the programs run on (laid out)
    original: Any                       # the graph as given
    arrays: dict[str, np.ndarray]       # inputs (other than those differentiated) and masks, laid out
    dims: dict[str, int]
    layout: Any
    grad_inputs: list[str]
    dtype: np.dtype
    differentiable: bool                # run train_forward and keep the residuals
    residuals: dict[str, np.ndarray] = field(default_factory=dict)
    statistics: dict[str, np.ndarray] = field(default_factory=dict)     # running statistics as run
    state_updates: dict[str, np.ndarray] = field(default_factory=dict)  # their new values (training)


class _RunProgram(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: _Call, *tensors):
        module = call.module
        params, grad_values = module._numpy_tensors(call, tensors)
        program = call.programs.train_forward if call.differentiable else call.programs.forward
        backend = module.compiled.backend
        outputs = backend.run(program, call.graph, {**call.arrays, **grad_values}, params, call.dims, training=False)
        call.state_updates = dict(getattr(backend, "last_state_updates", {}))
        # The running statistics are updated in place after this call: not saved for backward (their
        # values as run are kept instead).
        call.statistics = {n: np.array(params[n]) for n in module._statistics}
        names = call.programs.output_names
        if call.differentiable:
            call.residuals = {name: outputs.pop(name) for name in call.programs.residuals}
        if call.layout is not None:
            outputs = call.layout.restore(outputs, {n: v.type for n, v in call.programs.forward.outputs})
        ctx.call = call
        params_in = list(module.compiled.param_types)
        ctx.save_for_backward(*(None if i < len(params_in) and params_in[i] in module._statistics else t
                                for i, t in enumerate(tensors)))
        result = tuple(torch.from_numpy(np.array(outputs[name])) for name in names)
        ctx.mark_non_differentiable(*(t for t in result if not t.is_floating_point()))
        return result

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[torch.Tensor | None, ...]:
        call: _Call = ctx.call
        if not call.differentiable:
            raise RuntimeError("mpdsl: this call ran without autograd; run it with a parameter or input "
                               "that requires grad")
        module = call.module
        params, grad_values = module._numpy_tensors(call, ctx.saved_tensors)
        rows: dict[str, np.ndarray] = {}
        per_param: dict[str, np.ndarray] = {}
        types: dict[str, TensorType] = {}
        for (name, value), grad in zip(call.programs.forward.outputs, grads):
            if not value.type.is_float:
                continue
            shape = module._concrete_shape(value.type, call.graph, call.dims)
            array = (np.zeros(shape, dtype=call.dtype) if grad is None
                     else np.ascontiguousarray(grad.detach().cpu().numpy(), dtype=call.dtype))
            (per_param if value.type.domain is Domain.PARAM else rows)[f"d_{name}"] = array
            types[f"d_{name}"] = value.type
        if call.layout is not None and rows:
            _, rows = call.layout.apply(call.original, rows, types)
        kinds = {v.name: v.op for v in call.programs.backward.values if v.name in call.residuals}
        residual_rows = {k: a for k, a in call.residuals.items() if kinds[k] == "input"}
        residual_params = {k: a for k, a in call.residuals.items() if kinds[k] == "param"}
        result = module.compiled.backend.run(
            call.programs.backward, call.graph, {**call.arrays, **grad_values, **rows, **residual_rows},
            {**params, **per_param, **residual_params}, call.dims, training=False)
        if call.layout is not None and call.grad_inputs:
            result.update(call.layout.restore(
                {f"d_{n}": result[f"d_{n}"] for n in call.grad_inputs},
                {f"d_{n}": module.compiled.input_types[n] for n in call.grad_inputs}))
        def gradient_of(name: str) -> torch.Tensor:
            return torch.from_numpy(np.array(result[f"d_{name}"], dtype=call.dtype))

        return ((None,) + tuple(None if n in module._statistics else gradient_of(n)
                                for n in module.compiled.param_types)
                + tuple(gradient_of(n) for n in call.grad_inputs))


class MpdslModule(torch.nn.Module):
    """A compiled mpdsl model as a torch module (see the module docstring)."""

    def __init__(self, model: CompiledModel, graph: Any = None, **dims: int):
        super().__init__()
        missing = set(model.param_types) - set(model.params)
        if missing:
            if graph is None and not dims:
                raise InputError(f"the parameters {', '.join(sorted(missing))} of '{model.name}' have shapes bound "
                                 "from the inputs", "pass a graph (to_torch(model, graph)) or the dims, or run "
                                 "the model once first")
            model.init(model.seed, graph=None if graph is None else as_graph(graph), **dims)
        self.compiled = model
        self._statistics = frozenset(batch_norm_statistics(model.ir))  # buffers: updated, not trained
        for name in model.param_types:
            if hasattr(self, name) and name not in self._parameters and name not in self._buffers:
                raise MpdslError(f"parameter name '{name}' clashes with an attribute of torch.nn.Module",
                                 "rename the parameter in the .mp file")
            value = torch.from_numpy(np.array(model.params[name]))
            if name in self._statistics:
                self.register_buffer(name, value)
            else:
                self.register_parameter(name, torch.nn.Parameter(value))
        self._programs: dict[tuple, Programs] = {}
        self.last_layout: GraphLayout | None = None  # the graph layout of the last call (as CompiledModel.last_layout)

    # ---- running -----------------------------------------------------------------------------

    def forward(self, graph: Any, **inputs: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """Run on ``graph`` (a Graph, an .npz path or a PyG Data); inputs not given as keywords are
        read from the graph. One output: a tensor; several: a dict by name."""
        model = self.compiled
        graph = as_graph(graph)
        torch_dtype = self._torch_dtype()
        dtype_name, dtype = TORCH_DTYPES[torch_dtype]
        grad_inputs = [n for n, value in inputs.items()
                       if isinstance(value, torch.Tensor) and value.requires_grad and n in model.input_types
                       and model.input_types[n].is_float]
        arrays, dims = model.bind(graph, inputs)
        arrays = {n: a.astype(dtype, copy=False) if a.dtype.kind == "f" else a for n, a in arrays.items()}
        for name, t in model.param_types.items():
            model._bind_shape(f"parameter '{name}'", t, tuple(getattr(self, name).shape), dims, InputError)
        key = (tuple(sorted(dims.items())), dtype_name, self.training, tuple(grad_inputs))
        if key not in self._programs:
            self._programs[key] = self._build(dims, dtype_name, self.training, grad_inputs)
        programs = self._programs[key]
        model.check_run_memory(programs.forward, graph, dims)  # the forward pass, before it allocates
        for name, t, p in programs.masks:
            arrays[name] = self._mask(t, p, graph, dims, dtype)
        layout = choose_layout(graph, programs.forward, model.layout) if model.optimize else None
        self.last_layout = layout
        original = graph
        if layout is not None:
            types = {**model.input_types, **{name: t for name, t, _ in programs.masks}}
            graph, arrays = layout.apply(graph, arrays, types)
        tensors = [getattr(self, n) for n in model.param_types]
        tensors += [inputs[n].to(dtype=torch_dtype) for n in grad_inputs]
        differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        call = _Call(self, programs, graph, original, {k: v for k, v in arrays.items() if k not in grad_inputs},
                     dims, layout, grad_inputs, np.dtype(dtype), differentiable)
        outputs = _RunProgram.apply(call, *tensors)
        if call.state_updates:
            with torch.no_grad():
                for name, value in call.state_updates.items():
                    getattr(self, name).copy_(torch.from_numpy(np.asarray(value)))
        if programs.output_names == ["out"]:
            return outputs[0]
        return dict(zip(programs.output_names, outputs))

    def _build(self, dims: dict[str, int], dtype: str, training: bool, grad_inputs: list[str]) -> Programs:
        wrt = [name for name in self.compiled.param_types if name not in self._statistics]
        return self.compiled.context.training_programs(dims, dtype, training, grad_inputs, wrt)

    def programs(self, graph: Any = None, training: bool | None = None, **dims: int) -> Programs:
        """The programs run for ``graph`` (or ``dims``), for inspection."""
        model = self.compiled
        if graph is not None:
            dims = {**model.bind(as_graph(graph), {})[1], **dims}
        dims = {**model.dims, **dims}
        training = self.training if training is None else training
        return self._build(dims, TORCH_DTYPES[self._torch_dtype()][0], training, [])

    # ---- helpers -----------------------------------------------------------------------------

    def _numpy_tensors(self, call: _Call, tensors) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(params, differentiated inputs laid out) as NumPy arrays."""
        names = list(self.compiled.param_types)
        params = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors) if t is not None}
        params.update({n: a for n, a in call.statistics.items() if n not in params})
        values = {n: t.detach().cpu().numpy() for n, t in zip(call.grad_inputs, tensors[len(names):])}
        if call.layout is not None and values:
            _, values = call.layout.apply(call.original, values,
                                          {n: self.compiled.input_types[n] for n in values})
        return params, values

    def _torch_dtype(self) -> torch.dtype:
        dtypes = ({p.dtype for p in self._parameters.values() if p is not None}
                  or {b.dtype for b in self._buffers.values() if b is not None})
        if not dtypes:
            return torch.float64 if self.compiled.float_dtype == np.float64 else torch.float32
        if len(dtypes) > 1 or next(iter(dtypes)) not in TORCH_DTYPES:
            raise InputError(f"the parameters have dtypes {sorted(map(str, dtypes))}",
                             "use one of float32 or float64 for all of them (module.float() / module.double())")
        return next(iter(dtypes))

    @staticmethod
    def _rows(t: TensorType, graph) -> tuple[int, ...]:
        return () if t.domain is Domain.PARAM else (graph.num_rows(t.domain),)

    def _concrete_shape(self, t: TensorType, graph, dims) -> tuple[int, ...]:
        return self._rows(t, graph) + tuple(d.substitute(dims).value for d in t.shape)

    def _mask(self, t: TensorType, p: float, graph, dims, dtype) -> np.ndarray:
        shape = self._concrete_shape(t, graph, dims)
        keep = (torch.rand(shape, dtype=torch.float64) >= p).numpy()
        return (keep * (1.0 / (1.0 - p) if p < 1 else 0.0)).astype(dtype)

    # ---- weights -----------------------------------------------------------------------------

    def weights(self) -> dict[str, np.ndarray]:
        """The current parameters and running statistics as NumPy arrays (copies), named and ordered as
        in the .mp file."""
        return {n: getattr(self, n).detach().cpu().numpy().copy() for n in self.compiled.param_types}

    def sync(self) -> CompiledModel:
        """Write the current parameters into the compiled model (in its dtype) and return it."""
        return self.compiled.load_weights(self.weights())

    def extra_repr(self) -> str:
        return f"model={self.compiled.name!r}, backend={self.compiled.backend.name!r}"


def to_torch(model: CompiledModel, graph: Any = None, **dims: int) -> MpdslModule:
    """A trainable torch module running ``model`` (see ``MpdslModule``). Parameters whose shapes are
    bound from the inputs need a ``graph`` (or the dims) unless the model has been run already."""
    return MpdslModule(model, graph, **dims)


__all__ = ["MpdslModule", "Programs", "to_torch"]
