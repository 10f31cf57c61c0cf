"""Graph.from_networkx and Graph.from_pyg keep every attribute (PyG's conventions), or refuse by
name what they cannot keep; nothing is dropped silently."""

import numpy as np
import pytest

from mpdsl import Graph, GraphError

nx = pytest.importorskip("networkx")


def attributed_graph():
    G = nx.Graph(name_id=7)
    G.add_node("a", mass=1.0, vel=[0.5, 0.25], y=1, train_mask=True)
    G.add_node("b", mass=2.0, vel=[1.0, 2.0], y=0, train_mask=False)
    G.add_edge("a", "b", weight=3.0, kind=2, edge_attr=[1.0, 0.0])
    return G


def test_every_attribute_is_kept_by_name():
    g = Graph.from_networkx(attributed_graph())
    assert set(g.node_data) == {"mass", "vel", "y", "train_mask"}
    assert set(g.edge_data) == {"edge_weight", "edge_kind", "edge_attr"}
    assert set(g.graph_data) == {"graph_name_id"}
    np.testing.assert_array_equal(g["vel"], [[0.5, 0.25], [1.0, 2.0]])
    np.testing.assert_array_equal(g["edge_weight"], [3.0, 3.0])  # both directions of the undirected edge
    np.testing.assert_array_equal(g["edge_attr"], [[1.0, 0.0], [1.0, 0.0]])
    assert g["train_mask"].dtype == bool and g["y"].dtype.kind == "i"
    np.testing.assert_array_equal(g["graph_name_id"], [7])


def test_kept_attributes_survive_save_and_load(tmp_path):
    g = Graph.from_networkx(attributed_graph())
    g.save(tmp_path / "g.npz")
    back = Graph.load(tmp_path / "g.npz")
    assert back.node_data.keys() == g.node_data.keys() and back.edge_data.keys() == g.edge_data.keys()
    assert back.graph_data.keys() == g.graph_data.keys()


def test_names_that_would_read_back_as_another_kind_are_prefixed():
    G = nx.DiGraph()
    G.add_node(0, edge_count=2, graph_id=1)
    G.add_node(1, edge_count=1, graph_id=1)
    G.add_edge(0, 1, batch=0, x=1.5)
    g = Graph.from_networkx(G)
    assert set(g.node_data) == {"node_edge_count", "node_graph_id"}
    assert set(g.edge_data) == {"edge_batch", "edge_x"}


def test_node_attribute_names_match_pygs_from_networkx():
    pytest.importorskip("torch_geometric")
    from torch_geometric.utils import from_networkx

    G = attributed_graph()
    del G.graph["name_id"]
    for u, v in G.edges:
        del G.edges[u, v]["weight"], G.edges[u, v]["kind"]
    data = from_networkx(G)
    g = Graph.from_networkx(G)
    assert set(g.node_data) | set(g.edge_data) == set(data.keys()) - {"edge_index", "num_nodes"}
    for key in g.keys():
        np.testing.assert_array_equal(g[key], data[key].numpy(), err_msg=key)


def test_grouped_attributes_are_concatenated_as_pyg_does():
    pytest.importorskip("torch_geometric")
    from torch_geometric.utils import from_networkx

    G = attributed_graph()
    g = Graph.from_networkx(G, group_node_attrs=["mass", "vel"], group_edge_attrs="all")
    data = from_networkx(G, group_node_attrs=["mass", "vel"], group_edge_attrs="all")
    assert g["x"].dtype == np.float32 and g["edge_attr"].dtype == np.float32
    np.testing.assert_array_equal(g["x"], data.x.numpy())
    np.testing.assert_array_equal(g["edge_attr"], data.edge_attr.numpy())
    assert set(g.node_data) == {"x", "y", "train_mask"} and set(g.edge_data) == {"edge_attr"}
    assert set(Graph.from_networkx(G, "all").node_data) == {"x"}


def test_weight_becomes_edge_weight_unless_grouped():
    G = nx.les_miserables_graph()
    g = Graph.from_networkx(G)
    assert set(g.edge_data) == {"edge_weight"} and g["edge_weight"].shape == (508,)
    grouped = Graph.from_networkx(G, group_edge_attrs=["weight"])
    assert set(grouped.edge_data) == {"edge_attr"} and grouped["edge_attr"].shape == (508, 1)


def test_non_numeric_attributes_are_refused_by_name_unless_excluded():
    G = nx.karate_club_graph()  # node attribute 'club' (a string), graph attribute 'name'
    with pytest.raises(GraphError, match="node 0 attribute 'club' = 'Mr. Hi' is not numeric") as info:
        Graph.from_networkx(G)
    assert "exclude=['club']" in info.value.hint
    with pytest.raises(GraphError, match="graph attribute 'name' .* is not numeric") as info:
        Graph.from_networkx(G, exclude="club")
    g = Graph.from_networkx(G, exclude=["club", "name"])
    assert set(g.keys()) == {"edge_weight"} and g.num_edges == 156


def test_attributes_must_be_the_same_on_every_node_and_edge():
    G = attributed_graph()
    del G.nodes["b"]["mass"]
    with pytest.raises(GraphError, match="node 'b' lacks 'mass', unlike node 'a'"):
        Graph.from_networkx(G)
    assert "mass" not in Graph.from_networkx(G, exclude=["mass"])
    G.nodes["b"]["mass"] = 1.0
    G.nodes["b"]["vel"] = [1.0]
    with pytest.raises(GraphError, match="node attribute 'vel' has different shapes across nodes"):
        Graph.from_networkx(G)
    with pytest.raises(GraphError, match="no attribute 'charge' to group"):
        Graph.from_networkx(G, group_node_attrs=["charge"])


def test_x_given_directly_conflicts_with_an_attribute_x():
    G = nx.path_graph(3)
    assert Graph.from_networkx(G, x=np.ones((3, 2)))["x"].shape == (3, 2)
    nx.set_node_attributes(G, 1.0, "x")
    with pytest.raises(GraphError, match="x is given, and the nodes also have an attribute 'x'"):
        Graph.from_networkx(G, x=np.ones((3, 2)))


def test_pyg_scalars_become_graph_arrays_and_other_values_are_refused():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torch_geometric")
    from torch_geometric.data import Data

    data = Data(x=torch.randn(3, 2), edge_index=torch.tensor([[0, 1], [1, 2]]), num_classes=4,
                temperature=torch.tensor(2.5), graph_label=1, flag=True)
    g = Graph.from_pyg(data)
    assert set(g.graph_data) == {"graph_num_classes", "graph_temperature", "graph_label", "graph_flag"}
    np.testing.assert_array_equal(g["graph_num_classes"], [4])
    np.testing.assert_array_equal(g["graph_temperature"], np.array([2.5], np.float32))
    data.smiles = "CCO"
    with pytest.raises(GraphError, match=r"attribute smiles \(str\) is not a tensor or a number") as info:
        Graph.from_pyg(data)
    assert "exclude=['smiles']" in info.value.hint
    assert "smiles" not in Graph.from_pyg(data, exclude=["smiles"])
    clash = Data(x=torch.randn(3, 2), edge_index=torch.tensor([[0], [1]]), label=1,
                 graph_label=torch.tensor([0]))
    with pytest.raises(GraphError, match="would become the graph array 'graph_label'"):
        Graph.from_pyg(clash)
