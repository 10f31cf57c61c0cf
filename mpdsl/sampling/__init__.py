"""Sampled mini-batches of one large graph, for training models on graphs past memory.

Every loader yields ``MiniBatch`` objects (``mpdsl.sampling.batch``): a ``Graph`` ready for a compiled
model or its torch module, plus the global ids of its nodes and edges. Loaders:

* ``NeighborLoader`` (``neighbor``): GraphSAGE neighbour sampling with per-layer fanouts;
* ``ClusterLoader`` (``cluster``): Cluster-GCN, METIS partitions (``pymetis``) combined per batch;
* ``GraphSAINTNodeLoader``, ``GraphSAINTEdgeLoader``, ``GraphSAINTRandomWalkLoader`` (``saint``):
  GraphSAINT's samplers with their normalisation coefficients as node and edge arrays.

The sampler kernels are compiled with Numba (``mpdsl.sampling.kernels``).
"""

from mpdsl.sampling.cluster import ClusterLoader, ClusterPartition, cluster_partition
from mpdsl.sampling.saint import GraphSAINTEdgeLoader, GraphSAINTNodeLoader, GraphSAINTRandomWalkLoader

__all__ = [
    "ClusterLoader",
    "ClusterPartition",
    "GraphSAINTEdgeLoader",
    "GraphSAINTNodeLoader",
    "GraphSAINTRandomWalkLoader",
    "cluster_partition",
]
