"""mpdsl: a compiler for message-passing graph neural networks.

``mpdsl.compile(path_or_source)`` parses a .mp model, checks it, lowers it to IR and returns a
callable ``CompiledModel``; ``mpdsl.Graph`` holds the graphs it runs on.
"""

from mpdsl.api import compile, lower, read_source
from mpdsl.diagnostics import CompileError, GraphError, InputError, MpdslError, WeightsError
from mpdsl.graph import Graph
from mpdsl.runtime import CompiledModel

__all__ = [
           "CompileError",
           "CompiledModel",
           "Graph",
           "GraphError",
           "InputError",
           "MpdslError",
           "WeightsError",
           "compile",
           "lower",
           "read_source",
]
__version__ = "0.1.0"
