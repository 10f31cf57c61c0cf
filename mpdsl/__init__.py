"""mpdsl: a compiler for message-passing graph neural networks.

``mpdsl.compile(path_or_source)`` parses a .mp model, checks it, lowers it to IR and returns a
callable ``CompiledModel``; ``mpdsl.Graph`` holds the graphs it runs on.
"""

import os as _os
import sys as _sys

# torch's OpenMP threads spin for several milliseconds after each parallel torch op (GNU OpenMP's
# default wait policy), taking a core from the NumPy backend's kernels that follow in a training
# step; passive threads sleep instead. OpenMP reads the policy once, when torch loads it: this sets
# the default for a torch imported after mpdsl and leaves a value the user set alone.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mpdsl.api import compile, lower, read_source
from mpdsl.diagnostics import CompileError, GraphError, InputError, MpdslError, WeightsError
from mpdsl.graph import Graph
from mpdsl.malloc_settings import keep_freed_memory as _keep_freed_memory
from mpdsl.runtime import CompiledModel

_keep_freed_memory()  # a training step's freed blocks stay in the heap for the next step

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
