"""Rendering: a KernelSpec through its Jinja template to CUDA C text. Deterministic (the same spec
gives the same bytes); StrictUndefined, so a template asking for a value the lowering did not give
fails at once; files are written only when their content changes."""
from __future__ import annotations

import pathlib
import re

import jinja2

TEMPLATES = pathlib.Path(__file__).parent / "templates"

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                          trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)


def render(spec) -> str:
    signature = ", ".join(a.decl(spec.restrict) for a in spec.args)
    text = _env.get_template(spec.template).render(spec=spec, signature=signature, **spec.params)
    spec.source = drop_unused(text)
    return spec.source


_DECL = re.compile(r"^\s*const (?:long long|int|bool|float|double|unsigned char) (\w+) = [^;]*;\s*(?://.*)?$")


def drop_unused(text: str) -> str:
    """Remove `const` index declarations nothing reads. Lowerings decode every coordinate a family
    may need (image, position, window offset); a kernel that needs fewer would otherwise carry dead
    lines, and NVRTC warns about each one."""
    lines = text.split("\n")
    while True:
        words = re.findall(r"\w+", re.sub(r"//[^\n]*", "", text))     # code only, not comments
        counts: dict = {}
        for w in words:
            counts[w] = counts.get(w, 0) + 1
        keep = []
        for line in lines:
            m = _DECL.match(line)
            single = line.split("//")[0].count("=") == 1     # one declarator: `const T a = ..., b = ...` is kept
            if m and single and counts.get(m.group(1), 0) <= 1 and not line.lstrip().startswith("//"):
                continue
            keep.append(line)
        if len(keep) == len(lines):
            return text
        lines = keep
        text = "\n".join(lines)


def write_if_changed(path: pathlib.Path, text: str) -> bool:
    """Write `text` unless the file already holds it; True when written."""
    path = pathlib.Path(path)
    if path.exists() and path.read_bytes() == text.encode():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return True
