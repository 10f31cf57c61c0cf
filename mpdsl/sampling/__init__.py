"""Sampled mini-batches of one large graph, for training models on graphs past memory.

Every loader yields ``MiniBatch`` objects (``mpdsl.sampling.batch``): a ``Graph`` ready for a compiled
model or its torch module, plus the global ids of its nodes and edges. Loaders:

* ``NeighborLoader`` (``neighbor``): GraphSAGE neighbour sampling with per-layer fanouts;
* ``ClusterLoader`` (``cluster``): Cluster-GCN, METIS partitions (``pymetis``) combined per batch;
* ``GraphSAINTNodeLoader``, ``GraphSAINTEdgeLoader``, ``GraphSAINTRandomWalkLoader`` (``saint``):
  GraphSAINT's samplers with their normalisation coefficients as node and edge arrays.

The sampler kernels are compiled with Numba (``mpdsl.sampling.kernels``, ``subgraph_kernels``; feature rows of
memory-mapped files are read by ``file_rows``).
"""

from importlib import import_module
from typing import Any

# Loaders are imported on first use: they bring in torch and the Numba kernels.
_EXPORTS = {
    "ClusterLoader": "mpdsl.sampling.cluster",
    "ClusterPartition": "mpdsl.sampling.cluster",
    "GraphSAINTEdgeLoader": "mpdsl.sampling.saint",
    "GraphSAINTNodeLoader": "mpdsl.sampling.saint",
    "GraphSAINTRandomWalkLoader": "mpdsl.sampling.saint",
    "MiniBatch": "mpdsl.sampling.batch",
    "NeighborLoader": "mpdsl.sampling.neighbor",
    "NeighborSampler": "mpdsl.sampling.neighbor",
    "SamplingError": "mpdsl.sampling.loader",
    "cluster_partition": "mpdsl.sampling.cluster",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
