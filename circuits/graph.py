"""The computational graph that circuits are found in: senders write the residual stream, receivers read it.

Nodes (in topological order):

* ``input``: the token embeddings;
* per layer ``l``: every attention **query head** ``a{l}.h{h}`` (its output is head h's slice of the
  ``o_proj`` input times its ``o_proj`` columns), every **KV group** ``a{l}.kv{g}`` (GQA: the key and
  value projections shared by a group of query heads, no ungrouping; GPT-2: one per head; DeepSeek's
  latent attention: one per layer, the latent all heads read), then either the dense MLP
  ``m{l}`` or, in an MoE layer, the router ``m{l}.router``, every routed expert ``m{l}.e{e}`` (its
  routing-weighted output) and every shared expert ``m{l}.shared{i}`` (gated, where the family gates it);
* ``logits``.

Senders are the nodes that write into the residual stream: input, heads, MLPs, experts, shared experts.

Receivers are the inputs that read it, each with its own copy of the residual stream (as in EAP):
per layer one ``q`` receiver per query head, one ``k`` and one ``v`` receiver per KV group, then the
MLP input (dense) or the router, each routed expert and each shared expert input (MoE); finally the
logits (the final norm's input). A receiver's input is the sum of the outputs of every sender
upstream of it, before the receiver's layer norm, so edges are every (upstream sender, receiver) pair.

Receivers are grouped into *stages* that read the residual stream at the same point: stage ``2l`` is
layer l's attention input, ``2l + 1`` its MLP input, ``2L`` the logits. Every edge into a stage comes
from a sender written before that point, so the score matrix of a stage is one dense block
``[senders upstream, receivers of the stage]``. In a parallel block (GPT-NeoX, Phi, Cohere, Falcon)
the MLP reads the layer's input, so the layer's own heads are not upstream of its MLP.

A sender's output is what it adds to the residual stream (``circuits.blocks`` reads each layer's
wiring): times the block's residual multiplier (Granite), and through the block's output norm
(Gemma 2/3, OLMo 2) with the norm's per-token scale taken from the whole sublayer's output, so the
senders of a sublayer still sum to what it adds (they share that scale as experts share a router).

Internal edges (not scored, always present): KV group -> each of its query heads, router -> each
routed expert of its layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from workbench.adapters.base import Adapter
from workbench.circuits.attention import AttentionSpec, attention_spec
from workbench.circuits.blocks import BlockLayout, block_layouts
from workbench.errors import WorkbenchError

NODE_KINDS = ("input", "head", "kv", "mlp", "router", "expert", "shared", "logits")
PORTS = ("q", "k", "v", "in")  # where an edge enters its receiving node (a circuit file also has "internal" edges)


@dataclass(frozen=True)
class Node:
    name: str
    kind: str  # one of NODE_KINDS
    layer: int  # -1 for input, num_layers for logits
    index: int = -1  # head / KV group / expert / shared expert index; -1 where none

    def attrs(self) -> dict:
        """GraphML-safe attributes: kind, layer, index, and head / expert (-1 where not one)."""
        return {"kind": self.kind, "layer": self.layer, "index": self.index,
                "head": self.index if self.kind in ("head", "kv") else -1,
                "expert": self.index if self.kind in ("expert", "shared") else -1}


@dataclass(frozen=True)
class Receiver:
    name: str  # e.g. "a3.h2<q"
    node: str  # owning node
    port: str  # one of PORTS
    stage: int


@dataclass(frozen=True)
class Stage:
    """Receivers that read the residual stream at the same point."""

    index: int
    kind: str  # attn, mlp or logits
    layer: int
    start: int  # receivers [start, stop)
    stop: int
    n_up: int  # senders [0, n_up) are upstream

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class LayerPlan:
    """Where a layer's senders and receivers sit in the graph's orderings."""

    layer: int
    kind: str  # dense or moe
    n_heads: int
    n_kv: int
    head_dim: int  # per-head width of the output projection's input
    head_sender0: int  # senders [head_sender0, head_sender0 + n_heads)
    mlp_sender0: int  # dense: 1 sender; moe: experts then shared
    n_experts: int  # 0 for dense
    n_shared: int
    attn_stage: int
    mlp_stage: int
    layout: str = "dense"  # dense, fused or modulelist (the MoE experts' layout)
    attn_kind: str = "qkv"  # circuits.attention.KINDS
    block: BlockLayout = BlockLayout("input_layernorm", "", "post_attention_layernorm", "", False)
    attn_layout: str = ""  # a fused projection's row order (circuits.attention)


@dataclass
class Graph:
    nodes: list[Node]
    senders: list[str]  # node names, in residual-stream order
    receivers: list[Receiver]
    stages: list[Stage]
    layers: list[LayerPlan]
    internal: list[tuple[str, str]]  # (from node, to node), always present
    d_model: int
    sender_pos: torch.Tensor = field(repr=False)  # [S] stage index before which the sender is written
    embed_scale: float = 1.0  # what the embedding is multiplied by before the first layer (Granite)

    @property
    def n_senders(self) -> int:
        return len(self.senders)

    @property
    def n_receivers(self) -> int:
        return len(self.receivers)

    def valid(self) -> torch.Tensor:
        """[S, R] bool: which (sender, receiver) pairs are edges."""
        stage_of = torch.tensor([r.stage for r in self.receivers])
        return self.sender_pos[:, None] <= stage_of[None, :]

    @property
    def n_edges(self) -> int:
        return int(sum(st.n_up * st.size for st in self.stages))

    def edge_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sender, receiver) indices of every edge, in the canonical (row-major) order."""
        s, r = self.valid().nonzero(as_tuple=True)
        return s, r

    def node(self, name: str) -> Node:
        return self._by_name()[name]

    def _by_name(self) -> dict[str, Node]:
        if not hasattr(self, "_nodes_by_name"):
            self._nodes_by_name = {n.name: n for n in self.nodes}
        return self._nodes_by_name

    def edge_names(self, s: torch.Tensor, r: torch.Tensor) -> list[tuple[str, str, str]]:
        """(sender node, receiving node, port) per edge."""
        return [(self.senders[i], self.receivers[j].node, self.receivers[j].port) for i, j in zip(s.tolist(), r.tolist())]

    def summary(self) -> dict:
        kinds: dict[str, int] = {}
        for n in self.nodes:
            kinds[n.kind] = kinds.get(n.kind, 0) + 1
        return {"nodes": len(self.nodes), "senders": self.n_senders, "receivers": self.n_receivers,
                "edges": self.n_edges, "node_kinds": kinds}


def attention_shape(adapter: Adapter, model: nn.Module, layer: nn.Module) -> AttentionSpec:
    """The attention layout of ``layer`` (see ``circuits.attention``), or a WorkbenchError."""
    return attention_spec(adapter.attention(layer), model.config, f"{type(model).__name__} ({adapter.name})")


def build_graph(model: nn.Module, adapter: Adapter) -> Graph:
    """The EAP graph of ``model`` (see the module docstring)."""
    layers = adapter.decoder_layers(model)
    mixers = [i for i, layer in enumerate(layers) if not adapter.has_attention(layer)]
    if mixers:
        kind = adapter.mixer_kind(layers[mixers[0]])
        raise WorkbenchError(f"circuits need softmax attention in every layer; {len(mixers)} of {len(layers)} layers of "
                             f"{type(model).__name__} ({adapter.name}) are {kind} (layers {', '.join(map(str, mixers[:8]))}"
                             f"{' ...' if len(mixers) > 8 else ''}), whose heads and edges the graph does not model yet")
    blocks, embed_scale = block_layouts(model, adapter)
    infos = adapter.layer_infos(model)
    d = int(model.config.hidden_size)
    nodes = [Node("input", "input", -1)]
    senders, sender_pos = ["input"], [0]
    receivers: list[Receiver] = []
    stages: list[Stage] = []
    plans: list[LayerPlan] = []
    internal: list[tuple[str, str]] = []
    n_layers = len(layers)
    for l, (layer, info, block) in enumerate(zip(layers, infos, blocks)):
        spec = attention_shape(adapter, model, layer)
        n_heads, n_kv, hd = spec.n_heads, spec.n_kv, spec.head_dim
        group = n_heads // n_kv
        a_stage, m_stage = 2 * l, 2 * l + 1
        # attention stage: q per head, k and v per KV group
        heads = [Node(f"a{l}.h{h}", "head", l, h) for h in range(n_heads)]
        kvs = [Node(f"a{l}.kv{g}", "kv", l, g) for g in range(n_kv)]
        nodes += kvs + heads
        internal += [(kvs[h // group].name, heads[h].name) for h in range(n_heads)]
        r0 = len(receivers)
        receivers += [Receiver(f"{n.name}<q", n.name, "q", a_stage) for n in heads]
        receivers += [Receiver(f"{n.name}<k", n.name, "k", a_stage) for n in kvs]
        receivers += [Receiver(f"{n.name}<v", n.name, "v", a_stage) for n in kvs]
        stages.append(Stage(a_stage, "attn", l, r0, len(receivers), len(senders)))
        head0 = len(senders)
        senders += [n.name for n in heads]
        sender_pos += [a_stage + (2 if block.parallel else 1)] * n_heads
        # MLP stage
        r0 = len(receivers)
        mlp0 = len(senders)
        if info.kind == "dense":
            node = Node(f"m{l}", "mlp", l)
            nodes.append(node)
            receivers.append(Receiver(f"{node.name}<in", node.name, "in", m_stage))
            n_exp, n_sh = 0, 0
            senders.append(node.name)
        else:
            if info.layout not in ("fused", "modulelist"):
                raise WorkbenchError(f"circuits support fused and ModuleList MoE experts; layer {l} of "
                                     f"{type(model).__name__} has the {info.layout} layout")
            if info.num_shared > 1:
                raise WorkbenchError(f"layer {l} has {info.num_shared} shared expert modules; circuits support one")
            n_exp, n_sh = info.num_experts, info.num_shared
            router = Node(f"m{l}.router", "router", l)
            experts = [Node(f"m{l}.e{e}", "expert", l, e) for e in range(n_exp)]
            shared = [Node(f"m{l}.shared{i}", "shared", l, i) for i in range(n_sh)]
            nodes += [router] + experts + shared
            internal += [(router.name, e.name) for e in experts]
            receivers += [Receiver(f"{n.name}<in", n.name, "in", m_stage) for n in [router] + experts + shared]
            senders += [n.name for n in experts + shared]
        sender_pos += [m_stage + 1] * (len(senders) - mlp0)
        stages.append(Stage(m_stage, "mlp", l, r0, len(receivers), head0 if block.parallel else mlp0))
        plans.append(LayerPlan(l, info.kind, n_heads, n_kv, hd, head0, mlp0, n_exp, n_sh, a_stage, m_stage, info.layout,
                               spec.kind, block, spec.layout))
    nodes.append(Node("logits", "logits", n_layers))
    r0 = len(receivers)
    receivers.append(Receiver("logits<in", "logits", "in", 2 * n_layers))
    stages.append(Stage(2 * n_layers, "logits", n_layers, r0, r0 + 1, len(senders)))
    return Graph(nodes, senders, receivers, stages, plans, internal, d, torch.tensor(sender_pos), embed_scale)
