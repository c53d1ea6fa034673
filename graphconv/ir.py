"""The graph IR: a wrapper around a networkx.MultiDiGraph whose edge key is the operand index.

Node keys are the user-facing names (`conv1`, `conv1.weight`); each node's data holds a `Node`.
Topological order breaks ties by creation index, so every dump and generated file is deterministic.
"""
from __future__ import annotations


import contextlib
import copy
import dataclasses
from dataclasses import dataclass, field

import networkx as nx
import sympy as sp

from .errors import GraphError, OpError, ShapeError
from .ops import OPS, TensorType, TupleType, as_float_dtype, lookup
from .shapes import fmt_shape


STAGES = ("forward", "backward", "update")


def same_type(a, b) -> bool:
    """Equal tensor (or tuple) types, dims compared as expressions."""
    if isinstance(a, TupleType) or isinstance(b, TupleType):
        return (isinstance(a, TupleType) and isinstance(b, TupleType) and len(a.parts) == len(b.parts)
                and all(same_type(x, y) for x, y in zip(a.parts, b.parts)))
    return a.dtype == b.dtype and len(a.shape) == len(b.shape) and all(
        sp.simplify(x - y) == 0 for x, y in zip(a.shape, b.shape))


@dataclass
class Node:
    name: str
    op: str
    attrs: dict
    type: TensorType
    layer: str                  # the user layer it belongs to: `conv1` for `conv1.weight`
    index: int                  # creation order
    provenance: dict = field(default_factory=dict)  # for display: the forward node a gradient came from, the rule
    stage: str = "forward"      # forward | backward | update: what part of a training step computes it
    replaces: tuple = ()        # a fused node: the nodes it stands for, as (name, op, attrs) records

    @property
    def is_tuple(self) -> bool:
        return isinstance(self.type, TupleType)

    @property
    def shape(self):
        if self.is_tuple:
            raise GraphError(f"{self.name} has {len(self.type.parts)} outputs {self.type}; read them through part nodes")
        return self.type.shape

    @property
    def dtype(self):
        if self.is_tuple:
            raise GraphError(f"{self.name} has {len(self.type.parts)} outputs {self.type}; read them through part nodes")
        return self.type.dtype

    @property
    def role(self) -> str:
        if self.op == "input":
            return "input"
        if self.op == "param":
            return "param" if self.attrs["trainable"] else "buffer"
        return "op"


def records(nodes) -> tuple:
    """What a node replacing `nodes` stands for, as (name, op, attrs) records: a node that is itself
    a replacement (a conv with its batch norm folded in) contributes what it replaced."""
    return tuple(r for n in nodes for r in (n.replaces or ((n.name, n.op, dict(n.attrs)),)))


class Tensor:
    """What builder calls return: a handle naming one node of one graph."""
    __slots__ = ("graph", "name")

    def __init__(self, graph, name):
        self.graph, self.name = graph, name

    @property
    def node(self) -> Node:
        return self.graph.node(self.name)

    @property
    def shape(self):
        return self.node.shape

    @property
    def dtype(self):
        return self.node.dtype

    def __add__(self, other):
        return self.graph.add(self, other)

    def __mul__(self, other):
        return self.graph.mul(self, other)

    def __sub__(self, other):
        return self.graph.sub(self, other)

    # a scalar on the left (1.0 - a) is refused as the right-hand one is: by the layer, in one line
    def __radd__(self, other):
        return self.graph.add(other, self)

    def __rsub__(self, other):
        return self.graph.sub(other, self)

    def __rmul__(self, other):
        return self.graph.mul(other, self)

    def _no_operator(self, what):
        from .errors import GraphError
        raise GraphError(f"{self.name}: {what} of a tensor is not a graphconv op; scale by a tensor with g.mul(x, s) "
                         f"(s a g.param of shape [] or [C]), or name the function: gc.define_activation('half', "
                         f"lambda v: v / 2), then g.activation(x, 'half')")

    def __neg__(self):
        self._no_operator("-x (negation)")

    def __truediv__(self, other):
        self._no_operator("x / y (division)")

    def __rtruediv__(self, other):
        self._no_operator("y / x (division)")

    def __repr__(self):
        return f"Tensor({self.name}: {self.node.type})"


class GraphCore:
    """Storage, ordering, error reporting and verification. The layer builders are in builder.py."""

    def __init__(self, name="graph", dtype="float32"):
        if not isinstance(name, str) or not name or not name.isprintable():
            raise GraphError(f"a graph's name is a non-empty string of printable characters, got {name!r}")
        self.name, self.dtype = name, as_float_dtype(dtype, "graph dtype")
        self.nx = nx.MultiDiGraph()
        self.outputs: list[str] = []
        self.meta: dict = {}            # what passes record: the loss, gradient names, state updates
        self._counter = 0

    @property
    def outputs(self) -> list:
        return self.__dict__.get("_outputs", [])

    @outputs.setter
    def outputs(self, names):
        """Assigning the outputs replaces them (and allows output() to mark them afresh)."""
        self.__dict__["_outputs"] = names
        self.__dict__["_marked"] = False
        self._prefix_counts: dict[str, int] = {}

    # ---- reading ----------------------------------------------------------------------------
    def node(self, name) -> Node:
        if name not in self.nx:
            raise GraphError(f"{self.name}: no node named {name!r}")
        return self.nx.nodes[name]["node"]

    def __contains__(self, name):
        return name in self.nx

    def operands(self, name) -> list[str]:
        edges = sorted((key, src) for src, _, key in self.nx.in_edges(name, keys=True))
        return [src for _, src in edges]

    def users(self, name) -> list[tuple[str, int]]:
        return sorted(((dst, key) for _, dst, key in self.nx.out_edges(name, keys=True)),
                      key=lambda uk: (self.node(uk[0]).index, uk[1]))

    def topo(self) -> list[Node]:
        order = nx.lexicographical_topological_sort(self.nx, key=lambda n: self.nx.nodes[n]["node"].index)
        return [self.nx.nodes[n]["node"] for n in order]

    def nodes_with_role(self, role) -> list[Node]:
        return [n for n in self.topo() if n.role == role]

    @property
    def inputs(self) -> list[Node]:
        return self.nodes_with_role("input")

    @property
    def params(self) -> list[Node]:
        """Trainable parameters and buffers (running statistics), in topological order."""
        return [n for n in self.topo() if n.op == "param"]

    def batch_symbol(self):
        """The symbol of the batch dim: dim 0 of the first input whose dim 0 is a symbol."""
        for node in self.inputs:
            if node.shape and node.shape[0].is_Symbol:
                return node.shape[0]
        return None

    def in_types(self, name) -> list[TensorType]:
        return [self.node(o).type for o in self.operands(name)]

    def chain(self, name, limit=8) -> str:
        """`pool1 <- relu1 <- conv1 <- x`: the layers that produced a tensor, along operand 0."""
        names = [name]
        while True:
            ops = self.operands(names[-1])
            if not ops or len(names) > limit:
                break
            names.append(ops[0])
        if self.operands(names[-1]):
            names.append("...")
        return " <- ".join(names)

    # ---- building ---------------------------------------------------------------------------
    def fresh_name(self, prefix: str) -> str:
        while True:
            self._prefix_counts[prefix] = self._prefix_counts.get(prefix, 0) + 1
            sep = "_" if str(prefix)[-1:].isdigit() else ""     # softsign2 -> softsign2_1, not softsign21
            candidate = f"{prefix}{sep}{self._prefix_counts[prefix]}"
            if candidate not in self.nx:
                return candidate

    def unique_name(self, base: str) -> str:
        """`base`, or `base.2`, `base.3`, ... whichever is free."""
        name, k = base, 1
        while name in self.nx:
            k += 1
            name = f"{base}.{k}"
        return name

    def add_node(self, op_name, operands=(), attrs=None, name=None, layer=None, provenance=None,
                 stage="forward", index=None, replaces=()) -> Tensor:
        """Add one node: validate op, operands and attributes, infer its type. Raises an error that
        names the layer, the op and the chain of layers behind the offending operand."""
        attrs = dict(attrs or {})
        if name is not None and (not isinstance(name, str) or not name):
            raise GraphError(f"node names must be non-empty strings, got {name!r}")
        if name is not None and not name.isprintable():   # a newline would end a generated kernel's comment
            raise GraphError(f"node names are printable characters (no newline, tab or control character), "
                             f"got {name!r}")
        if name is not None and name.startswith(("state/", "meta/")):   # the sections of a checkpoint file
            raise GraphError(f"{name}: names beginning with state/ or meta/ are reserved (a weights file holding "
                             f"{name} would read as a checkpoint); choose another name")
        if not isinstance(op_name, str):
            raise GraphError(f"an op is named by a string, got {op_name!r}")
        operand_names = [self._operand_name(o, name, op_name) for o in operands]
        name = name or self.fresh_name(op_name)
        if name in self.nx:
            raise GraphError(f"{name}: the name is already used by a {self.node(name).op} node in {self.name}")
        with self.layer_errors(name, op_name, operand_names):
            op = lookup(op_name)
            op.check_arity(len(operand_names))
            attrs = op.check_attrs(attrs)
            out_type = op.infer([self.node(o).type for o in operand_names], attrs)
        if stage not in STAGES:
            raise GraphError(f"{name}: stage must be one of {', '.join(STAGES)}, got {stage!r}")
        if index is None:
            index, self._counter = self._counter, self._counter + 1
        elif any(self.nx.nodes[n]["node"].index == index for n in self.nx.nodes):
            raise GraphError(f"{name}: creation index {index} is taken")
        node = Node(name, op_name, attrs, out_type, layer or name, index, dict(provenance or {}), stage,
                    tuple(replaces))
        self.nx.add_node(name, node=node)
        for key, src in enumerate(operand_names):
            self.nx.add_edge(src, name, key=key)
        return Tensor(self, name)

    def _operand_name(self, operand, layer, op_name):
        if isinstance(operand, Tensor):
            if operand.graph is not self:
                other = (f"another graph also named {self.name}" if operand.graph.name == self.name
                         else f"graph {operand.graph.name}, not {self.name}")
                raise GraphError(f"{layer or op_name}: operand {operand.name} belongs to {other}")
            return operand.name
        if isinstance(operand, str) and operand in self.nx:
            return operand
        if isinstance(operand, (list, tuple)):
            raise GraphError(f"{layer or op_name}: got a {type(operand).__name__} where one tensor belongs")
        raise GraphError(f"{layer or op_name}: operand {operand!r} is not a tensor of graph {self.name}")

    @contextlib.contextmanager
    def layer_errors(self, name, op_name, operand_names=()):
        """Turn an OpError raised by a rule into the user-facing error for layer `name`."""
        try:
            yield
        except OpError as e:
            where = ""
            if operand_names and e.operand < len(operand_names):
                src = operand_names[e.operand]
                role = OPS[op_name].operand_name(e.operand) if op_name in OPS else "operand"
                src_type = self.node(src).type
                shown = fmt_shape(src_type.shape) if isinstance(src_type, TensorType) else str(src_type)
                where = f" ({role} {shown} from {self.chain(src)})"
            raise e.kind(f"{name} [{op_name}]: {e.message}{where}") from None

    @contextlib.contextmanager
    def atomic(self):
        """Undo every node added inside the block if it raises: a failed layer leaves no params."""
        before, counts = set(self.nx.nodes), dict(self._prefix_counts)
        try:
            yield
        except BaseException:
            self.nx.remove_nodes_from([n for n in list(self.nx.nodes) if n not in before])
            self._prefix_counts = counts
            raise

    # ---- editing (what passes use) -------------------------------------------------------------
    def replace_uses(self, old: str, new: str):
        """Make every user of `old` (and the outputs) read `new` instead, at the same operand index."""
        for _, dst, key in list(self.nx.out_edges(old, keys=True)):
            self.nx.remove_edge(old, dst, key=key)
            self.nx.add_edge(new, dst, key=key)
        self.outputs = [new if o == old else o for o in self.outputs]

    def set_operand(self, name: str, index: int, new: str):
        """Make operand `index` of node `name` read `new`."""
        for src, _, key in list(self.nx.in_edges(name, keys=True)):
            if key == index:
                self.nx.remove_edge(src, name, key=key)
        self.nx.add_edge(new, name, key=index)

    def remove(self, names) -> dict:
        """Remove nodes; return, per removed node, its edges to nodes that stay ([(user, key)]) and
        its positions among the outputs, for a rewrite to reconnect."""
        names = set(names)
        kept = {n: [(dst, key) for _, dst, key in self.nx.out_edges(n, keys=True) if dst not in names] for n in names}
        outs = {n: [i for i, o in enumerate(self.outputs) if o == n] for n in names}
        self.nx.remove_nodes_from(names)
        return {n: (kept[n], outs[n]) for n in names}

    def reconnect(self, new, edges):
        """Make `new` feed the (user, key) edges and output positions that `remove` returned."""
        users, positions = edges
        for dst, key in users:
            self.nx.add_edge(new, dst, key=key)
        for i in positions:
            self.outputs[i] = new

    def replace(self, nodes, op_name, operands, attrs=None, name=None, stage=None, layer=None) -> Tensor:
        """Replace the connected nodes `nodes` (in order; the last one's value is the one used
        outside) by one node computing `op_name` over `operands`. The new node takes the last node's
        name, layer, creation index and stage unless told otherwise, records what it replaced, and
        every user of the last node reads it at the same operand index. Nothing else may use the
        inner nodes."""
        nodes = [self.node(n) if isinstance(n, str) else n for n in nodes]
        root, inner = nodes[-1], {n.name for n in nodes[:-1]}
        for n in nodes[:-1]:
            outside = [u for u, _ in self.users(n.name) if u not in inner and u != root.name]
            if outside or n.name in self.outputs:
                raise GraphError(f"replace: {n.name} is used outside the replaced nodes "
                                 f"({', '.join(outside) or 'a graph output'})")
        operand_names = [self._operand_name(o, root.name, op_name) for o in operands]
        if any(o in inner or o == root.name for o in operand_names):
            raise GraphError(f"replace: an operand of the new {op_name} node is one of the nodes it replaces")
        users = list(self.nx.out_edges(root.name, keys=True))
        was_output = [i for i, o in enumerate(self.outputs) if o == root.name]
        self.nx.remove_nodes_from([n.name for n in nodes])
        name = name or root.name
        with self.layer_errors(name, op_name, operand_names):
            op = lookup(op_name)
            op.check_arity(len(operand_names))
            attrs = op.check_attrs(dict(attrs or {}))
            out_type = op.infer([self.node(o).type for o in operand_names], attrs)
        node = Node(name, op_name, attrs, out_type, layer or root.layer, root.index, dict(root.provenance),
                    stage or root.stage, records(nodes))
        self.nx.add_node(name, node=node)
        for key, src in enumerate(operand_names):
            self.nx.add_edge(src, name, key=key)
        for _, dst, key in users:
            self.nx.add_edge(name, dst, key=key)
        for i in was_output:
            self.outputs[i] = name
        return Tensor(self, name)

    def output(self, *tensors):
        """Mark the graph's outputs, in order (all of them in one call)."""
        if not tensors:
            raise GraphError(f"{self.name}: output() needs at least one tensor")
        names = [self._operand_name(t, "output", "output") for t in tensors]
        dropped = [o for o in self.outputs if o not in names]
        if self.__dict__.get("_marked") and dropped:   # a second call on this graph object (a copy may re-mark)
            raise GraphError(f"{self.name}: output() again would drop the outputs already marked "
                             f"({', '.join(dropped)}); mark every output in one call, g.output(a, b), or assign "
                             f"g.outputs = [...] to replace them")
        self.outputs = names
        self._marked = True
        return tensors[0] if len(tensors) == 1 else tensors

    # ---- copying and checking ---------------------------------------------------------------
    def copy(self, name=None):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.name = name or self.name
        new.nx = nx.MultiDiGraph()
        for n in self.topo():
            new.nx.add_node(n.name, node=dataclasses.replace(n, attrs=dict(n.attrs), provenance=dict(n.provenance)))
        new.nx.add_edges_from(self.nx.edges(keys=True))
        new.outputs = list(self.outputs)
        new.meta = copy.deepcopy(self.meta)
        new._prefix_counts = dict(self._prefix_counts)
        return new

    def verify(self):
        """Check the IR's invariants; raise GraphError naming the first broken one."""
        def fail(msg):
            raise GraphError(f"verify {self.name}: {msg}")

        if not nx.is_directed_acyclic_graph(self.nx):
            fail(f"the graph has a cycle: {nx.find_cycle(self.nx)}")
        seen_index = set()
        for name in self.nx.nodes:
            node = self.nx.nodes[name].get("node")
            if not isinstance(node, Node) or node.name != name:
                fail(f"node {name!r} has no Node record under its own name")
            if node.index in seen_index:
                fail(f"{name}: creation index {node.index} is not unique")
            seen_index.add(node.index)
            if node.op not in OPS:
                fail(f"{name}: unknown op {node.op!r}")
            keys = sorted(k for _, _, k in self.nx.in_edges(name, keys=True))
            if keys != list(range(len(keys))):
                fail(f"{name}: operand keys {keys} are not 0..{len(keys) - 1}")
            op = OPS[node.op]
            try:
                with self.layer_errors(name, node.op, self.operands(name)):
                    op.check_arity(len(keys))
                    normalised = op.check_attrs(node.attrs)
            except GraphError as e:
                fail(str(e))
            if normalised != node.attrs:
                fail(f"{name}: attributes {node.attrs} are not normalised (expected {normalised})")
            try:
                with self.layer_errors(name, node.op, self.operands(name)):
                    again = op.infer(self.in_types(name), node.attrs)
            except (ShapeError, GraphError) as e:
                fail(str(e))
            if not same_type(again, node.type):
                fail(f"{name}: stored type {node.type} but its rule gives {again}")
        for out in self.outputs:
            if out not in self.nx:
                fail(f"output {out!r} is not a node")
        return self

    def __repr__(self):
        return f"<Graph {self.name}: {self.nx.number_of_nodes()} nodes, outputs {self.outputs}>"
