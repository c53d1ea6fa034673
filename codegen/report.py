"""`graphconv report`: one self-contained HTML page (no network: styles, script, data and the graph
picture inline) linking a model's layers, the nodes of a stage (forward, gradient, update), the
fusion decisions with their byte ledger, and the generated kernels with source, launch shape and
NVRTC's resource usage. Selecting a layer, a node or a kernel highlights everything that belongs to
it; every kernel links back to its nodes; sections start collapsed and a search box filters them."""
from __future__ import annotations

import base64
import html
import json

from graphconv.fusion import report as fusion_report
from graphconv.pipeline import build_unfused
from graphconv.summary import summarize

from .program import Program

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2733;display:flex}
nav{width:300px;height:100vh;overflow:auto;position:sticky;top:0;border-right:1px solid #d5dbe1;padding:12px;box-sizing:border-box;background:#f7f9fb}
main{flex:1;padding:16px 24px;min-width:0}
h1{font-size:20px;margin:0 0 8px}h2{font-size:16px;margin:18px 0 6px}
table{border-collapse:collapse;font:12px monospace}td,th{border:1px solid #d5dbe1;padding:2px 6px;text-align:right}
td:first-child,td:nth-child(2),th{text-align:left}tr.layer{cursor:pointer}tr.layer:hover{background:#eef3f8}
details{border:1px solid #d5dbe1;border-radius:6px;margin:8px 0;padding:4px 10px}summary{cursor:pointer;font-weight:600}
.node,.kernel-link,.node-link{font:12px monospace;cursor:pointer;padding:1px 4px;border-radius:3px;display:inline-block;margin:1px}
.forward{background:#eef3f8}.backward{background:#fbe3cf}.update{background:#ececec}
.hl{outline:2px solid #e8590c;background:#fff3bf!important}
pre{background:#0f1720;color:#e6edf3;padding:8px;overflow:auto;font:12px/1.35 monospace;max-height:480px}
.fired{color:#2b8a3e}.refused{color:#868e96}.graph{overflow:auto;max-height:70vh;border:1px solid #d5dbe1}
.graph svg{width:100%;height:auto}
#search{width:100%;box-sizing:border-box;padding:4px;margin-bottom:8px}.hidden{display:none}
nav a{display:block;font:12px monospace;color:#1d2733;text-decoration:none;padding:1px 0}
"""

SCRIPT = """
const DATA = JSON.parse(document.getElementById('data').textContent);
function clear(){document.querySelectorAll('.hl').forEach(e=>e.classList.remove('hl'));}
function mark(sel){document.querySelectorAll(sel).forEach(e=>e.classList.add('hl'));}
function showLayer(layer){
  clear();
  const sec=document.getElementById('layer-'+layer); if(!sec) return;
  sec.open=true; sec.querySelectorAll('details').forEach(d=>d.open=true);
  sec.classList.add('hl'); mark('[data-layer="'+CSS.escape(layer)+'"]');
  sec.scrollIntoView({block:'start'});
}
function showNode(node){
  clear(); mark('[data-node="'+CSS.escape(node)+'"]');
  (DATA.kernels_of[node]||[]).forEach(k=>{mark('[data-kernel="'+CSS.escape(k)+'"]');
    document.querySelectorAll('details[data-kernel="'+CSS.escape(k)+'"]').forEach(d=>{d.open=true;let p=d.parentElement.closest('details');if(p)p.open=true;});});
}
function showKernel(kernel){
  clear(); mark('[data-kernel="'+CSS.escape(kernel)+'"]');
  (DATA.nodes_of[kernel]||[]).forEach(n=>mark('[data-node="'+CSS.escape(n)+'"]'));
}
document.addEventListener('click',ev=>{
  const t=ev.target.closest('[data-click]'); if(!t) return;
  const kind=t.dataset.click;
  if(kind==='layer') showLayer(t.dataset.layer);
  if(kind==='node') showNode(t.dataset.node);
  if(kind==='kernel') showKernel(t.dataset.kernel);
});
document.getElementById('search').addEventListener('input',ev=>{
  const q=ev.target.value.toLowerCase();
  document.querySelectorAll('details.section').forEach(s=>{
    const hit=!q||s.dataset.text.includes(q); s.classList.toggle('hidden',!hit);
    if(q&&hit) s.open=true;});
  document.querySelectorAll('nav a').forEach(a=>a.classList.toggle('hidden',!!q&&!a.dataset.text.includes(q)));
});
"""


def e(text) -> str:
    return html.escape(str(text), quote=True)


def num(value) -> str:
    return f"{value:,}" if isinstance(value, int) else e(value)


def build_report(model, stage="fused-train", weights=None, loss=None, optimizer=None) -> str:
    """The HTML text of the report of `model` at `stage`."""
    from graphconv.pipeline import build
    from graphconv.printer import PICTURES, fmt_type, to_picture
    graph = build(model, stage, loss, optimizer)
    program = Program(graph)
    table = summarize(model)
    try:
        ledger = fusion_report(build_unfused(model, stage, loss, optimizer), graph, batch=64)["groups"]
    except Exception:  # noqa: BLE001 - a stage without fusion passes has no ledger
        ledger = []
    resources = {}
    from . import nvrtc
    if nvrtc.available():
        for spec, c in zip(program.kernels, nvrtc.compile_many([(s.source, s.name) for s in program.kernels])):
            resources[spec.name] = c.resources()
    layer_of = {n.name: (n.layer or n.name) for n in graph.topo()}
    kernels_of, nodes_of, launches_of = {}, {}, {}
    for launch in program.launches:
        for node in launch.computes:
            kernels_of.setdefault(node, []).append(launch.spec.name)
            nodes_of.setdefault(launch.spec.name, [])
            if node not in nodes_of[launch.spec.name]:
                nodes_of[launch.spec.name].append(node)
        launches_of.setdefault(launch.spec.name, launch.spec)
    layers = list(dict.fromkeys([r["name"] for r in table["layers"]] + [layer_of[n] for n in layer_of]))
    try:
        picture = to_picture(graph, PICTURES[0]).decode()
        picture = picture[picture.index("<svg"):]
    except Exception as ex:  # noqa: BLE001 - no graphviz: the page says so
        picture = f"<p>No graph picture: {e(ex)}</p>"

    rows = []
    for r in table["layers"]:
        rows.append(f'<tr class="layer" data-click="layer" data-layer="{e(r["name"])}"><td>{e(r["name"])}</td>'
                    f'<td>{e(r["op"])}</td><td>{e(" x ".join(map(str, r["output_shape"])))}</td>'
                    f'<td>{e(" x ".join(map(str, r["weight_shape"])) if r["weight_shape"] else "")}</td>'
                    f'<td>{r["params"] or ""}</td><td>{r["macs"] or ""}</td></tr>')
    sections, nav = [], []
    for layer in layers:
        nodes = [n for n in graph.topo() if layer_of[n.name] == layer and n.role == "op"]
        params = [n for n in graph.topo() if layer_of[n.name] == layer and n.role != "op"]
        decisions = [d for d in ledger if any(layer_of.get(x, x) == layer or x == layer for x in d["nodes"])]
        kernel_names = list(dict.fromkeys(k for n in nodes for k in kernels_of.get(n.name, [])))
        if not (nodes or params or decisions):
            continue
        parts = []
        for title, chosen in (("forward", [n for n in nodes if n.stage == "forward"]),
                              ("gradient", [n for n in nodes if n.stage == "backward"]),
                              ("update", [n for n in nodes if n.stage == "update"])):
            if chosen:
                items = "".join(f'<span class="node {n.stage}" data-click="node" data-node="{e(n.name)}" '
                                f'data-layer="{e(layer)}" title="{e(fmt_type(n.type))}">{e(n.name)} = {e(n.op)}'
                                f'{e(" [" + " -> ".join(x[0] for x in n.replaces) + "]") if n.replaces else ""}</span>'
                                for n in chosen)
                parts.append(f"<h3>{title} nodes</h3><div>{items}</div>")
        if params:
            parts.append("<h3>parameters</h3><div>" + " ".join(
                f'<span class="node forward" data-node="{e(p.name)}">{e(p.name)}: {e(fmt_type(p.type))}</span>'
                for p in params) + "</div>")
        for d in decisions:
            verdict = (f'<span class="fired">fused ({e(d["rule"])})</span> into {e(d["into"])}' if d["fired"] else
                       f'<span class="refused">not fused ({e(d["rule"])})</span>: {e(d["reason"])}')
            parts.append(f"<h3>fusion</h3><p>{e(' -> '.join(d['nodes']))}: {verdict}; bytes moved at batch 64: "
                         f"{num(d['bytes_before'])} -> {num(d['bytes_after'])}"
                         f"{('; ' + e(d['reason'])) if d['fired'] and d['reason'] else ''}</p>")
        for name in kernel_names:
            spec = launches_of[name]
            res = resources.get(name)
            usage = (f"; NVRTC sm_90: {res['registers']} registers, {res['shared_bytes']} B shared memory, "
                     f"{res['spill_stores']} B spilled" if res else "")
            links = " ".join(f'<span class="node-link" data-click="node" data-node="{e(n)}">{e(n)}</span>'
                             for n in nodes_of[name])
            parts.append(f'<details class="kernel" data-kernel="{e(name)}"><summary data-click="kernel" '
                         f'data-kernel="{e(name)}">kernel {e(name)}</summary><p>template {e(spec.template)}; launch '
                         f'grid {e(spec.grid_text())} x block {e(tuple(spec.block))}{e(usage)}</p>'
                         f'<p>computes: {links}</p><pre>{e(spec.source)}</pre></details>')
        text = " ".join([layer] + [n.name for n in nodes] + kernel_names).lower()
        sections.append(f'<details class="layer" id="layer-{e(layer)}" data-layer="{e(layer)}" '
                        f'data-text="{e(text)}"><summary data-click="layer" data-layer="{e(layer)}">{e(layer)} '
                        f'<small>({len(nodes)} nodes, {len(kernel_names)} kernels)</small></summary>'
                        f'{"".join(parts)}</details>')
        nav.append(f'<a href="#layer-{e(layer)}" data-click="layer" data-layer="{e(layer)}" data-text="{e(text)}">'
                   f'{e(layer)}</a>')
    sections = [s.replace('<details class="layer"', '<details class="layer section"', 1) for s in sections]
    filters = ""
    if weights is not None:
        from graphconv.pictures import conv_layers, filters_png
        if conv_layers(model):
            layer, png = filters_png(model, weights)
            filters = (f"<h2>What {e(layer)}'s filters learned</h2><img alt=\"filters\" "
                       f"src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">")
        else:
            filters = f"<h2>Filters</h2><p>{e(model.name)} has no 2-D convolution whose filters could be drawn.</p>"
    # every < as \u003c: no name can end the script (</script>) or open a comment in it (<!--)
    data = json.dumps({"kernels_of": kernels_of, "nodes_of": nodes_of}).replace("<", "\\u003c")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>graphconv report: {e(graph.name)}</title>"
            f"<style>{STYLE}</style></head><body>"
            f"<nav><input id=\"search\" placeholder=\"search layers, nodes, kernels\">{''.join(nav)}</nav><main>"
            f"<h1>{e(graph.name)} — stage {e(stage)}</h1><p>{len(program.launches)} launches of "
            f"{len(program.kernels)} kernels; click a layer, a node or a kernel.</p>"
            f"<h2>Layers</h2><table><tr><th>Layer</th><th>Op</th><th>Output</th><th>Weight</th><th>Params</th>"
            f"<th>MACs</th></tr>{''.join(rows)}</table>{filters}"
            f"<h2>Graph</h2><div class=\"graph\">{picture}</div>"
            f"<h2>Per layer</h2>{''.join(sections)}</main>"
            f"<script type=\"application/json\" id=\"data\">{data}</script><script>{SCRIPT}</script></body></html>")
