"""Text, DOT and JSON dumps of a graph. Deterministic: the same graph gives byte-identical output.

The text form follows JAX's jaxpr printout, one line per node, every attribute shown (the DOT form
shows only those that differ from the op's defaults):
    %conv1:f32[N,20,28,28] = conv2d[stride=(1,1), padding=(2,2)] %x %conv1.weight %conv1.bias
"""
from __future__ import annotations

import json

from .errors import OpError
from .ops import OPS, REQUIRED, TupleType
from .ops.window import fmt_padding
from .shapes import fmt_shape

SHORT = {"float32": "f32", "float64": "f64", "int64": "i64", "uint8": "u8"}


def fmt_type(t) -> str:
    if isinstance(t, TupleType):
        return "(" + ", ".join(fmt_type(p) for p in t.parts) + ")"
    return f"{SHORT[t.dtype]}{fmt_shape(t.shape)}"


def fmt_attr(key, value) -> str:
    if key == "padding":
        return fmt_padding(value)
    if key == "shape":
        return fmt_shape(value)
    if key == "init":
        kind, v = value
        return f"uniform(+-{v:.6g})" if kind == "uniform" else f"{v:g}"
    if key == "epilogue":     # (relu,add[$0]): the fused ops in order; $k reads extra operand k
        return "(" + ",".join(op + fmt_attrs(dict(items)) + "".join(f"[${r}]" for r in refs if r >= 0)
                              for op, items, refs in value) + ")"
    if key == "pool":             # the pool's attributes that differ from its defaults
        if not value:
            return "none"
        given = dict(value[1])
        defaults = OPS[value[0]].check_attrs({"kernel_size": given["kernel_size"]})
        return value[0] + fmt_attrs({k: v for k, v in given.items() if k == "kernel_size" or defaults.get(k) != v})
    if key == "save" and not value:
        return "none"
    if key == "act":
        return value[0] + fmt_attrs(dict(value[1]))
    if isinstance(value, tuple):
        return "(" + ",".join(str(v) for v in value) + ")"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def fmt_attrs(attrs, skip=()) -> str:
    items = [f"{k}={fmt_attr(k, v)}" for k, v in attrs.items() if k not in skip]
    return "[" + ", ".join(items) + "]" if items else ""


def to_text(graph) -> str:
    ins = ", ".join(f"%{n.name}:{fmt_type(n.type)}" for n in graph.inputs)
    shown = graph.outputs if len(graph.outputs) <= 4 else graph.outputs[:2]
    outs = ", ".join(f"%{o}:{fmt_type(graph.node(o).type)}" for o in shown)
    if len(shown) < len(graph.outputs):  # the return line lists them all
        outs += f", ... {len(graph.outputs) - len(shown)} more"
    lines = [f"graph {graph.name}({ins}) -> ({outs}) {{"]
    for n in graph.topo():
        if n.op == "input":
            continue
        if n.op == "param":
            kind = "param" if n.attrs["trainable"] else "buffer"
            lines.append(f"  %{n.name}:{fmt_type(n.type)} = {kind}[init={fmt_attr('init', n.attrs['init'])}]")
            continue
        args = " ".join(f"%{o}" for o in graph.operands(n.name))
        notes = [f"{k}={v}" for k, v in sorted(n.provenance.items())]
        if n.replaces:
            notes.append("replaces=" + "+".join(r[0] for r in n.replaces))
        origin = "  # " + ", ".join(notes) if notes else ""
        lines.append(f"  %{n.name}:{fmt_type(n.type)} = {n.op}{fmt_attrs(n.attrs)} {args}{origin}")
    lines.append("  return " + " ".join(f"%{o}" for o in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"


def non_default_attrs(node) -> dict:
    """The attributes that differ from the op's defaults (required ones always count)."""
    op = OPS[node.op]
    required = {k: v for k, v in node.attrs.items() if op.attrs.get(k) is REQUIRED}
    try:
        defaults = op.check_attrs(required)
    except OpError:  # defaults that only make sense with other values: show everything
        return dict(node.attrs)
    return {k: v for k, v in node.attrs.items() if k in required or defaults.get(k) != v}


def _q(text) -> str:
    """A DOT double-quoted string (graphviz decodes entities in labels: & is written &amp;)."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("&", "&amp;") + '"'


ROLE_STYLE = {"input": ', style=filled, fillcolor="#dfe9f5"', "param": ", style=dashed", "buffer": ", style=dotted"}
STAGE_STYLE = {"backward": ', style=filled, fillcolor="#fbe3cf"', "update": ', style=filled, fillcolor="#ececec"'}
FUSED_STYLE = ', style="filled,bold", fillcolor="#d9f2d9"'


def to_dot(graph) -> str:
    """Graphviz: one cluster per user layer (its parameters and forward nodes), gradient nodes
    filled orange, updates grey, fused nodes green and bold with the nodes they replace; each edge
    labelled with the operand index and the tensor's type."""
    lines = [f"digraph {_q(graph.name)} {{", "  rankdir=TB; newrank=true;", '  node [shape=box, fontname="monospace"];',
             '  edge [fontname="monospace", fontsize=9];']
    by_layer: dict = {}
    for n in graph.topo():     # gradient nodes stay outside the clusters (dot cannot rank clusters that
        key = n.layer or n.name   # hold a layer's forward and backward nodes: its edges go both ways)
        by_layer.setdefault(key if n.stage == "forward" else f"{n.stage}:{n.name}", []).append(n)
    for layer, nodes in by_layer.items():
        fused = [n for n in nodes if n.replaces]
        cluster = len(nodes) > 1 or fused
        indent = "    " if cluster else "  "
        if cluster:
            title = layer + "".join(f" (fused: {' -> '.join(r[0] for r in f.replaces)})" for f in fused[:1])
            lines.append(f"  subgraph {_q('cluster_' + layer)} {{")
            lines.append(f"    label={_q(title)}; fontname=\"monospace\"; style=rounded; color=\"#9aa5b1\";")
        for n in nodes:
            style = FUSED_STYLE if n.replaces else ROLE_STYLE.get(n.role, "") or STAGE_STYLE.get(n.stage, "")
            attrs = fmt_attrs(non_default_attrs(n), skip=("init", "shape", "dtype", "trainable", "epilogue", "pool",
                                                          "act", "expr"))
            replaced = f"\n= {' -> '.join(r[0] for r in n.replaces)}" if n.replaces else ""
            kind = n.role if n.op == "param" else n.op       # a non-trainable param is a buffer
            label = _q(f"{n.name}\n{kind}{attrs}{replaced}\n{fmt_type(n.type)}").replace("\n", "\\n")
            lines.append(f"{indent}{_q(n.name)} [label={label}{style}];")
        if cluster:
            lines.append("  }")
    for src, dst, key in sorted(graph.nx.edges(keys=True), key=lambda e: (graph.node(e[1]).index, e[2])):
        lines.append(f"  {_q(src)} -> {_q(dst)} [label={_q(f'{key}: {fmt_type(graph.node(src).type)}')}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_json(graph) -> str:
    nodes = []
    for n in graph.topo():
        types = n.type.parts if n.is_tuple else (n.type,)
        nodes.append({"name": n.name, "op": n.op, "layer": n.layer, "stage": n.stage,
                      **({"dtype": n.dtype, "shape": [str(d) for d in n.shape]} if not n.is_tuple else
                         {"outputs": [{"dtype": t.dtype, "shape": [str(d) for d in t.shape]} for t in types]}),
                      "attrs": {k: fmt_attr(k, v) for k, v in n.attrs.items()},
                      "operands": graph.operands(n.name), "provenance": n.provenance,
                      **({"replaces": [r[0] for r in n.replaces]} if n.replaces else {})})
    return json.dumps({"graph": graph.name, "dtype": graph.dtype, "outputs": graph.outputs, "nodes": nodes},
                      indent=2) + "\n"


FORMATS = {"text": to_text, "dot": to_dot, "json": to_json}
PICTURES = ("svg", "png")


def to_picture(graph, fmt) -> bytes:
    """The DOT dump rendered by graphviz's `dot` (svg or png)."""
    import shutil
    import subprocess
    from .errors import GraphConvError
    dot = shutil.which("dot")
    if dot is None:
        raise GraphConvError(f"--format {fmt} needs graphviz's `dot`: apt-get install graphviz (or brew install "
                             f"graphviz), or use --format dot and render it elsewhere")
    done = subprocess.run([dot, f"-T{fmt}"], input=to_dot(graph).encode(), capture_output=True)
    if done.returncode:
        raise GraphConvError(f"graphviz could not draw {graph.name}: {done.stderr.decode().strip().splitlines()[0]}")
    return done.stdout
