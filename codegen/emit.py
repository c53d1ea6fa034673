"""`graphconv emit`: a program's kernels as .cu files plus a manifest.json (per kernel: name, source
nodes and layers, template, launch shape, typed arguments, content hash, NVRTC's resource usage;
per program: the launch order and the buffer plan's peak at a reference batch). Files are written
only when their content changes, and the .cu files the folder's previous manifest listed that the new
one does not are removed (nothing graphconv did not write there)."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

import sympy as sp

from graphconv.errors import GraphConvError

from .program import Program
from .render import write_if_changed

PLAN_BATCH = 64


def manifest_of(program: Program, resources: dict | None = None) -> dict:
    kernels = []
    for spec in program.kernels:
        row = {"name": spec.name, "file": f"{spec.name}.cu", "nodes": list(spec.nodes), "replaces": list(spec.replaces), "layers": list(spec.layers),
               "template": spec.template, "grid": spec.grid_text(), "block": list(spec.block),
               "barrier": spec.barrier,
               "arguments": [{"type": a.ctype, "name": a.name, "binds": a.value or "batch size",
                              **({"zeroed": True} if a.value in program.values and program.values[a.value].zeroed else {})}
                             for a in spec.args],
               "sha256": hashlib.sha256(spec.source.encode()).hexdigest()}
        if resources is not None:
            row["nvrtc_sm_90"] = resources[spec.name]
        kernels.append(row)
    # a graph whose batch is fixed (emit --dim N=3) has its plan at that batch, not PLAN_BATCH
    fixed = program.graph.batch_symbol() is None and program.graph.inputs and program.graph.inputs[0].shape
    batch = int(program.graph.inputs[0].shape[0]) if fixed and sp.sympify(program.graph.inputs[0].shape[0]).is_Integer \
        else PLAN_BATCH
    plan = program.plan(batch)
    from . import nvrtc
    version = ".".join(map(str, nvrtc.version())) if resources is not None else None
    return {"graph": program.name, "nvrtc": version, "kernels": kernels,
            "launches": [{"node": l.node, "kernel": l.spec.name} for l in program.launches],
            "buffer_plan": {"batch": batch, "buffers": len(plan.sizes), "allocated_bytes": sum(plan.sizes),
                            "peak_live_bytes": plan.peak_bytes}}


def emit(graph, out_dir, check_nvrtc=True, tf32=False, winograd=False) -> dict:
    """Write the kernels of `graph` under out_dir; returns the manifest. With check_nvrtc, every
    kernel is compiled for sm_90 first (an error, a warning or a spill raises CompileError)."""
    program = Program(graph, tf32=tf32, winograd=winograd)
    if not program.kernels:
        outputs = ", ".join(graph.outputs) or "none"
        raise GraphConvError(f"emit: {graph.name} computes nothing on a device (its outputs: {outputs}; each an input, "
                             f"a parameter or a view of one), so there is no kernel to write")
    resources = None
    if check_nvrtc:
        from . import nvrtc
        compiled = nvrtc.compile_many([(s.source, s.name) for s in program.kernels],
                                      where_of=lambda name: where_of(program, name))
        resources = {s.name: c.resources() for s, c in zip(program.kernels, compiled)}
    if not str(out_dir).strip():
        raise GraphConvError("emit: the output folder is empty (give a folder, e.g. -o kernels)")
    out = pathlib.Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise GraphConvError(f"emit: {out} is a file (or lies under one), not a folder to write the kernels into") from None
    except OSError as e:
        raise GraphConvError(f"emit: {out}: the folder cannot be made ({e.strerror or e})") from None
    manifest = manifest_of(program, resources)
    for target in [out / "manifest.json"] + [out / f"{spec.name}.cu" for spec in program.kernels]:
        _refuse_foreign(target)
    _keep_reported_resources(manifest, out / "manifest.json")
    wanted = {row["file"] for row in manifest["kernels"]}
    previous = _listed_files(out / "manifest.json")     # before the new manifest replaces it
    try:
        for spec in program.kernels:
            write_if_changed(out / f"{spec.name}.cu", spec.source)
        for name in sorted(previous - wanted):
            stale = out / name
            if stale.is_file() and not stale.is_symlink() and _generated(stale):
                stale.unlink()
        write_if_changed(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    except OSError as e:
        raise GraphConvError(f"emit: {e.filename or out}: cannot be written ({e.strerror or e})") from None
    return manifest


def _listed_files(path: pathlib.Path) -> set:
    """The .cu files an earlier emit's manifest.json in the folder lists (plain names in the folder);
    none where there is no manifest, or it is not graphconv's. Only these are removed when a new emit
    no longer lists them: a .cu file graphconv did not list there is never deleted."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    kernels = old.get("kernels") if isinstance(old, dict) and "graph" in old else None
    if not isinstance(kernels, list):
        return set()
    files = {row.get("file") for row in kernels if isinstance(row, dict) and isinstance(row.get("sha256"), str)}
    return {f for f in files if isinstance(f, str) and f.endswith(".cu") and pathlib.PurePath(f).name == f}


def _refuse_foreign(path: pathlib.Path) -> None:
    """emit replaces only what it wrote: a file of the same name that is a link, not a regular file,
    or not graphconv's (a .cu without its header, a manifest.json that is not a kernel manifest) is
    refused, not overwritten (nor written through)."""
    if not os.path.lexists(path):
        return
    ours = path.is_file() and not path.is_symlink() and (
        _generated(path) if path.suffix == ".cu" else _is_manifest(path))
    if not ours:
        what = "a link" if path.is_symlink() else "not a regular file" if not path.is_file() else "not graphconv's"
        raise GraphConvError(f"emit: {path} exists and is {what}; emit writes only over the kernels and manifest it "
                             f"wrote: move it or choose another -o")


def _is_manifest(path: pathlib.Path) -> bool:
    try:
        old = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(old, dict) and "graph" in old and isinstance(old.get("kernels"), list)


def _generated(path) -> bool:
    """Whether a .cu file is one this generator wrote (its header says so); a file of the user's,
    in any encoding, is left alone."""
    with open(path, "rb") as f:
        return b"generated by graphconv" in f.read(400)


def _keep_reported_resources(manifest: dict, path: pathlib.Path) -> None:
    """Keep the resource figures an existing manifest reports for a kernel whose source is unchanged
    (same sha256, same NVRTC version). ptxas does not always allocate registers alike for one source:
    seen 110 and 128 registers for one weight-gradient kernel from one NVRTC 13.5 in different
    processes, about one compile in a few hundred. The sources and everything else in the manifest are
    deterministic; without this, re-emitting unchanged kernels could rewrite their figures."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if manifest["nvrtc"] is None or old.get("nvrtc") != manifest["nvrtc"]:
        return
    before = {row.get("sha256"): row.get("nvrtc_sm_90") for row in old.get("kernels", [])}
    for row in manifest["kernels"]:
        if before.get(row["sha256"]):
            row["nvrtc_sm_90"] = before[row["sha256"]]


def where_of(program, kernel_name) -> str:
    """The prefix of a compile error: the node, its layer and the template."""
    for launch in program.launches:
        if launch.spec.name == kernel_name:
            s = launch.spec
            return f"{', '.join(s.layers)}: {launch.node} [{program.graph.node(launch.node).op}] template {s.template}: "
    return ""


BUNDLED = {"lenet5": ("fused", "fused-train"), "vgg_small": ("fused", "fused-train"),
           "resnet8": ("fused", "fused-train")}


def regenerate_bundled(root) -> list:
    """kernels_generated/<model>/<stage>/ for the bundled models; returns the folders written."""
    from graphconv.models import MODELS
    from graphconv.pipeline import build
    folders = []
    for model, stages in BUNDLED.items():
        for stage in stages:
            folder = pathlib.Path(root) / model / stage
            emit(build(MODELS[model](), stage), folder)
            folders.append(folder)
    return folders


if __name__ == "__main__":     # python -m codegen.emit: rewrite kernels_generated/
    for f in regenerate_bundled(pathlib.Path(__file__).resolve().parent.parent / "kernels_generated"):
        print("wrote", f)
