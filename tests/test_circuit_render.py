"""circuit.svg / circuit.png: one SVG group per node and scored edge, layered layout, sign colours, atomic files."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET

import pytest

from workbench.circuits.export import Circuit
from workbench.circuits.render import KIND_COLOURS, NEGATIVE, POSITIVE, circuit_svg, write_png, write_svg


def _node(kind, layer, index=-1):
    return {"kind": kind, "layer": layer, "index": index, "head": index if kind in ("head", "kv") else -1,
            "expert": index if kind in ("expert", "shared") else -1}


@pytest.fixture
def circuit() -> Circuit:
    """Two layers: GQA attention (2 heads, 1 KV group) and a dense MLP, then an MoE layer."""
    nodes = {"input": _node("input", -1), "a0.kv0": _node("kv", 0, 0), "a0.h0": _node("head", 0, 0),
             "a0.h1": _node("head", 0, 1), "m0": _node("mlp", 0), "a1.kv0": _node("kv", 1, 0),
             "a1.h1": _node("head", 1, 1), "m1.router": _node("router", 1), "m1.e3": _node("expert", 1, 3),
             "m1.shared0": _node("shared", 1, 0), "logits": _node("logits", 2)}
    scored = [("input", "a0.kv0", "k", 0.9), ("input", "a0.kv0", "v", -0.2), ("a0.h0", "m0", "in", 0.5),
              ("a0.h1", "logits", "in", -0.7), ("m0", "m1.e3", "in", 0.3), ("m0", "m1.router", "in", 0.05),
              ("m1.e3", "logits", "in", 1.2), ("input", "m1.shared0", "in", 0.1),
              ("m1.shared0", "logits", "in", -0.4), ("input", "a1.h1", "q", 0.02)]
    internal = [("a0.kv0", "a0.h0"), ("a0.kv0", "a0.h1"), ("m1.router", "m1.e3")]
    edges = [{"source": s, "target": t, "port": p, "score": w} for s, t, p, w in scored]
    edges += [{"source": s, "target": t, "port": "internal", "score": 0.0} for s, t in internal]
    meta = {"model": "test", "method": "eap-ig", "steps": 5, "n_edges_total": 1000,
            "graph": {"node_kinds": {"head": 4, "kv": 2}}, "metrics": {"faithfulness": 0.9, "hit_at_10_circuit": 1.0}}
    return Circuit(nodes, edges, meta)


def _groups(svg: str, prefix: str) -> dict[str, ET.Element]:
    root = ET.fromstring(svg)
    return {e.get("id"): e for e in root.iter() if (e.get("id") or "").startswith(prefix)}


def _styles(el: ET.Element) -> str:
    return " ".join(e.get("style", "") for e in el.iter())


def _text_y(el: ET.Element) -> float:
    (t,) = [e for e in el.iter() if e.tag.endswith("text")]
    return float(t.get("y"))


def test_svg_has_one_group_per_node_and_scored_edge(circuit):
    svg = circuit_svg(circuit)
    nodes, edges = _groups(svg, "node-"), _groups(svg, "edge-")
    assert set(nodes) == {f"node-{n}" for n in circuit.nodes}
    assert len(edges) == circuit.n_edges == 10
    texts = {"".join(t.itertext()) for g in nodes.values() for t in g.iter() if t.tag.endswith("text")}
    assert texts == {"input", "logits", "kv0", "h0", "h1", "MLP", "router", "e3", "shared"}
    # edge-k is the k-th strongest: sign gives the colour, |score| the width
    strongest = max((e for e in circuit.edges if e["port"] != "internal"), key=lambda e: abs(e["score"]))
    assert strongest["score"] > 0 and POSITIVE in _styles(edges["edge-0"])
    assert NEGATIVE in _styles(edges["edge-2"]) and NEGATIVE not in _styles(edges["edge-1"])  # -0.7, 0.9
    width = lambda g: float(_styles(g).split("stroke-width: ")[1].split(";")[0])  # noqa: E731
    assert width(edges["edge-0"]) > width(edges["edge-9"])
    # experts, heads and MLPs are told apart by colour
    fill = lambda n: KIND_COLOURS[circuit.nodes[n]["kind"]]  # noqa: E731
    assert len({fill("m1.e3"), fill("a0.h0"), fill("m0"), fill("m1.shared0")}) == 4
    for n in ("m1.e3", "a0.h0", "m0"):
        assert fill(n) in _styles(nodes[f"node-{n}"])
    # layered: input at the bottom, logits at the top (SVG y grows downward), layer 0 below layer 1
    y = {n: _text_y(g) for n, g in ((k[5:], v) for k, v in nodes.items())}
    assert y["input"] > y["a0.h0"] > y["m0"] > y["a1.h1"] > y["m1.e3"] > y["logits"]
    assert y["a0.h0"] == y["a0.kv0"] == y["a0.h1"] and y["m1.e3"] == y["m1.router"]
    assert "test, eap-ig(5), 10 edges" in svg and "faithfulness 0.900" in svg


def test_svg_max_edges_keeps_the_strongest(circuit):
    svg = circuit_svg(circuit, max_edges=2)
    assert len(_groups(svg, "edge-")) == 2
    assert set(_groups(svg, "node-")) == {"node-m1.e3", "node-logits", "node-input", "node-a0.kv0"}
    assert "2 of 10 circuit edges" in svg
    assert circuit_svg(circuit, max_edges=2) == svg  # deterministic
    empty = circuit_svg(circuit, max_edges=0)
    assert not _groups(empty, "edge-") and not _groups(empty, "node-")
    with pytest.raises(ValueError):
        circuit_svg(circuit, max_edges=-1)


def test_write_svg_and_png_are_atomic_and_sane(circuit, tmp_path):
    svg = write_svg(circuit, tmp_path / "c.svg")
    png = write_png(circuit, tmp_path / "c.png")
    assert ET.parse(svg).getroot().tag.endswith("svg")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert 600 <= w <= 4000 and 300 <= h <= 6000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "c.svg"]  # no temporary files left
    with pytest.raises(Exception):
        write_png(circuit, tmp_path / "c.png" / "x.png")  # a file in the way: nothing half-written
    assert png.read_bytes() == data
