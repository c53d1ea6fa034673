"""The `graphconv` command line."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

from .progressbar import progress
from .checkpoint import write_file
from .errors import CheckpointError, GraphConvError


def cmd_models(args):
    from .models import MODELS
    width = max(map(len, MODELS))
    for name, fn in MODELS.items():
        print(f"{name.ljust(width)}  {fn.__doc__.strip().splitlines()[0]}")


def cmd_summary(args):
    from .summary import format_json, format_table, format_training, summarize, summarize_training
    from .pipeline import build
    from .training import Optimizer
    graph = build(load_model(args, need_sizes=False), args.stage, args.loss, Optimizer(args.optimizer),
                  collapse=collapse_of(args))
    if args.batch is not None and graph.batch_symbol() is None:
        raise GraphConvError(f"--batch {args.batch}: {graph.name} has no batch dim to size (its inputs' sizes are "
                             f"fixed, {', '.join(f'{n.name} {list(n.shape)}' for n in graph.inputs[:2])}); drop --batch")
    if args.stage in ("train", "fused-train"):
        t = summarize_training(graph, args.batch)
        print(format_json(t) if args.format == "json" else format_training(t))
        return
    s = summarize(graph, batch=args.batch)
    print(format_json(s) if args.format == "json" else format_table(s))


def cmd_dump(args):
    from .autodiff import saved_bytes, saved_tensors
    from .pipeline import build
    from .printer import FORMATS, PICTURES, to_picture
    from .training import Optimizer
    graph = build(load_model(args, need_sizes=False), args.stage, args.loss, Optimizer(args.optimizer), args.after,
                  collapse=collapse_of(args))
    if args.format in PICTURES:
        picture = to_picture(graph, args.format)
        if args.output:
            refuse_clobber(args, args.output, suffix=f".{args.format}")
            write_file(args.output, picture)
            print(f"wrote {args.output} ({len(picture):,} bytes, {graph.name} --stage {args.stage})")
        elif args.format == "png" and sys.stdout.isatty():
            raise GraphConvError("--format png is binary: write it to a file with -o FILE.png")
        else:
            sys.stdout.buffer.write(picture)
        return 0
    text = FORMATS[args.format](graph)
    if args.output:
        refuse_clobber(args, args.output)
        write_file(args.output, text)
        print(f"wrote {args.output} ({len(text.encode()):,} bytes, {graph.name} --stage {args.stage}, "
              f"{args.format})")
    else:
        sys.stdout.write(text)
    if any(n.stage == "backward" for n in graph.topo()) and args.format == "text":
        saved = saved_tensors(graph)
        size = int(saved_bytes(graph, args.batch or 1))
        per = f"at batch {args.batch}" if args.batch else "per example"
        print(f"# saved for the backward pass: {len(saved)} tensors, {size:,} bytes {per} "
              f"({', '.join(n.name for n in saved)})")


def cmd_fuse(args):
    from .fusion import format_report, report
    from .pipeline import build, build_unfused
    from .training import Optimizer
    model = load_model(args, need_sizes=False)
    opt = Optimizer(args.optimizer)
    r = report(build_unfused(model, args.stage, args.loss, opt),
               build(model, args.stage, args.loss, opt, collapse=args.collapse_convs), args.batch)
    print(json.dumps(r, indent=2) if args.format == "json" else format_report(r))


def _in_bounded_child() -> bool:
    """This process is check --bounds's child: its kernels are built with AddressSanitizer, whose
    runtime is loaded (GC_HOST_ASAN=1 set by hand in a plain shell is not enough: the child is started)."""
    from codegen.host import _asan_loaded, asan_build
    return asan_build() and _asan_loaded()


def check_bounded(args):
    """check --bounds: the same command in a child process whose host kernels are built with
    AddressSanitizer; its output is passed through, and a kernel that reads or writes outside an array
    becomes one line naming the kernel and its layer."""
    import subprocess
    from codegen.host import asan_env, asan_report
    done = subprocess.run([sys.executable, "-m", "graphconv.cli", *args.argv], env=asan_env(), capture_output=True,
                          text=True)
    sys.stdout.write(done.stdout)
    report = asan_report(done.stderr)
    if report is None:
        if done.returncode not in (0, 1):
            sys.stderr.write(done.stderr)
        else:
            print("bounds: every kernel ran under AddressSanitizer; no read or write outside an array it was given "
                  "or one of its shared arrays")
        return done.returncode
    what, access, size, kernel, shared = report
    outside = f"its shared array {shared}" if shared else "the arrays it was given"
    raise GraphConvError(f"kernel {kernel}{where_of_kernel(args, kernel)} {'reads' if access == 'read' else 'writes'} "
                         f"{size} bytes outside {outside} (AddressSanitizer: {what}, the first such access stops "
                         f"the check)")


def where_of_kernel(args, kernel) -> str:
    """ " (layer L, node N)" of a kernel of the checked program, found by rendering it again."""
    from codegen.program import Program
    from .pipeline import build
    from .training import Optimizer
    graph = build(load_model(args), args.stage, args.loss, Optimizer(args.optimizer), collapse=args.collapse_convs)
    program = Program(graph, tf32=args.tf32, winograd=args.winograd)
    spec = next((s for s in program.kernels if s.name == kernel), None)
    return f" (layer {', '.join(spec.layers)}, node {', '.join(spec.nodes)})" if spec else ""


def cmd_check(args):
    """The fused graph against the unfused one on the same random data, in float64."""
    from . import compile as gc_compile
    from .data import random_inputs
    from .params import init_params
    from .pipeline import build, build_unfused
    from .training import Optimizer
    if args.bounds and args.backend != "host":
        raise GraphConvError("--bounds runs the kernels on the host backend under AddressSanitizer: add --backend host "
                             "(on a GPU, `bash benchmarks/gpu_suite.sh sanitizer` runs compute-sanitizer's memcheck)")
    if args.backend == "host":
        from codegen.host import current_schedule
        current_schedule()      # a misspelt GC_HOST_SCHEDULE is refused before any work, not after the table
    if args.bounds and not _in_bounded_child():
        return check_bounded(args)
    model = load_model(args)
    if args.tf32 and args.backend == "numpy":
        raise GraphConvError("--tf32 is for the kernel backends: add --backend host (or cuda)")
    if args.winograd and args.backend == "numpy":
        raise GraphConvError("--winograd is for the kernel backends: add --backend host (or cuda)")
    if args.races and args.backend != "host":
        raise GraphConvError("--races runs the kernels on the host backend under its four schedules: add --backend "
                             "host (on a GPU, `bash benchmarks/gpu_suite.sh sanitizer` runs compute-sanitizer's racecheck)")
    # with --tf32 the training step's gradients and updates are reported, not judged: batch norm's
    # backward at a small batch and Adam's first step (m / sqrt(v)) amplify TF32's rounding past any
    # fixed tolerance; every kernel is still judged against NumPy on the same inputs
    judge = not (args.tf32 and args.stage == "fused-train" and args.rtol is None)
    if args.rtol is None:
        args.rtol = 1e-9 if model.dtype == "float64" else (TF32_RTOL if args.tf32 else 1e-4)
    opt = Optimizer(args.optimizer)
    unfused = build_unfused(model, args.stage, args.loss, opt)
    fused = build(model, args.stage, args.loss, opt, collapse=args.collapse_convs)
    params = init_params(unfused, seed=args.seed)
    inputs = random_inputs(unfused, args.batch, args.seed)
    fused_params = {n.name: params[n.name] for n in fused.params}
    kernel_failures = 0
    if args.backend in ("host", "cuda"):
        from codegen.check import check_kernels, check_races, format_checks
        from codegen.program import variant_layers
        if args.races:
            results = check_races(fused, inputs, fused_params, tf32=args.tf32, winograd=args.winograd)
        else:
            results = check_kernels(fused, inputs, fused_params, backend=args.backend, tf32=args.tf32,
                                    winograd=args.winograd)
        kernel_failures = sum(not r.ok for r in results)
        print(f"check {model.name} --stage {args.stage}: every kernel against the NumPy reference of its node "
              f"({args.backend} backend"
              f"{variant_words(args, variant_layers((k, r.layers) for r in results for k in r.kernels))}"
              f", outputs poisoned with NaN first"
              f"{'; under each schedule: threads in both orders, copies landing late and early, the same bits required' if args.races else ''}), "
              f"{fused.dtype}, batch {args.batch}, "
              f"seed {args.seed}")
        print(format_checks(results))
        nodes = sum(r.node.count(",") + 1 for r in results)
        print(f"{sum(len(r.kernels) for r in results)} kernels for {nodes} nodes, {kernel_failures} mismatched\n")
    want = gc_compile(unfused).run(inputs, params)
    got = gc_compile(fused, backend=args.backend, tf32=args.tf32, winograd=args.winograd).run(inputs, fused_params)
    print(f"check {model.name} --stage {args.stage}: {args.backend} backend against the unfused graph, "
          f"{unfused.dtype}, batch {args.batch}, seed {args.seed}")
    width = max(len(o) for o in want)
    print(f"  {'output'.ljust(width)}  {'max abs diff':>12}  {'max rel diff':>12}  status")
    failed, conditioned, noise, carried = 0, [], [], []
    for name, a in want.items():
        b = got[name]
        diff = float(np.abs(a - b).max()) if a.size else 0.0
        rel = diff / max(float(np.abs(a).max()) if a.size else 0.0, 1e-30)
        ok = close(b, a, args.rtol, kind_scale(name, want))
        status = "ok" if close(b, a, args.rtol) else "ok+" if ok else "MISMATCH"
        if status == "ok+":
            noise.append(name)
        if judge and not ok and adam_step_of_its_moments(unfused, name, params, want, got, args.rtol):
            ok, status = True, "ok*"
            conditioned.append(name)
        if judge and not ok and sgd_step_of_its_velocity(unfused, name, params, want, got, args.rtol):
            ok, status = True, "ok~"
            carried.append(name)
        failed += judge and not ok
        print(f"  {name.ljust(width)}  {diff:12.3e}  {rel:12.3e}  {status if judge else '-'}")
    if noise:
        its = "their" if len(noise) > 1 else "its"
        print(f"+ {len(noise)} optimizer moment{'s' if len(noise) > 1 else ''} within rtol of the largest moment of "
              f"{its} kind over every parameter, not of {its} own: the moments of a gradient that is zero in exact "
              f"arithmetic (a conv's bias before a batch norm) are rounding noise, which two correct computations "
              f"round differently")
    if conditioned:
        print(f"* {len(conditioned)} Adam update{'s' if len(conditioned) > 1 else ''} past rtol: each equals (within rtol) Adam's step of "
              f"the moments this backend computed, those match the unfused graph's, and every element past rtol "
              f"has a gradient at float32 rounding noise (<= 64 eps of the largest first moment); Adam divides a "
              f"gradient by its own size (m / (sqrt(v) + eps)), so there rounding moves the step by up to the learning rate "
              f"(a float32 graph's first steps, not an error of the fused graph)")
    if carried:
        print(f"~ {len(carried)} SGD update{'s' if len(carried) > 1 else ''} past rtol: p' = p - lr * v', and each "
              f"element past rtol differs from the unfused graph's by no more than lr times its velocity's difference "
              f"(plus the rounding of p'), with that velocity accepted above (ok or ok+): the update of a gradient "
              f"that is rounding noise (a parameter at 0, such as a batch norm's bias, whose gradient cancels) "
              f"carries its velocity's noise, not an error of the fused graph")
    kinks = near_kinks(unfused, inputs, params) if failed and unfused.dtype == "float32" else {}
    if kinks:
        print(f"^ {sum(kinks.values())} ReLU input element{'s' if sum(kinks.values()) > 1 else ''} within float32 "
              f"rounding of the kink at 0 ({', '.join(f'{k}: {n}' for k, n in kinks.items())}): two correct "
              f"computations can round such an element to opposite sides, which changes its gradient by its whole "
              f"size and everything computed from it; the mismatches above may be that (check in float64, the "
              f"default, to judge the graphs exactly)")
    if judge:
        print(f"{len(want)} outputs, {failed} mismatched (rtol {args.rtol:g})")
    else:
        print(f"{len(want)} outputs, reported, not judged: a TF32 training step's gradients and updates drift "
              f"past any fixed tolerance (pass --rtol to judge them); every kernel was judged above")
    return 1 if failed or kernel_failures else 0


def near_kinks(graph, inputs, params) -> dict:
    """{node: count} of the elements of each ReLU's (or leaky ReLU's) input, in the reference run, within
    a few float32 roundings of 0 (16 eps of the input's largest magnitude)."""
    from . import compile as gc_compile
    values = gc_compile(graph).run(inputs, params, keep=True)
    counts = {}
    for node in graph.topo():
        if node.op in ("relu", "leaky_relu"):
            source = graph.operands(node.name)[0]
            x = np.asarray(values[source])
            near = int(np.count_nonzero(np.abs(x) <= 16 * np.finfo(np.float32).eps * float(np.abs(x).max(initial=0))))
            if near:
                counts[source] = near
    return counts


def within(got, want, rtol, scale=0.0):
    """check's criterion per element: within rtol of the value, or of the output's largest magnitude
    (or `scale`, where larger: see kind_scale)."""
    want, got = np.asarray(want), np.asarray(got)
    largest = float(np.abs(want).max()) if want.size else 0.0
    return np.isclose(got, want, rtol=rtol, atol=rtol * max(largest, scale, 1e-12))


def close(got, want, rtol, scale=0.0) -> bool:
    return bool(np.all(within(got, want, rtol, scale)))


def kind_scale(name, want) -> float:
    """For an optimizer moment (`conv1.bias.adam_m.next`): the largest magnitude of that moment over
    every parameter. A gradient that is zero in exact arithmetic (a conv's bias before a batch norm)
    has moments of pure rounding noise, which two correct backends round differently: judged against
    its own largest value they differ by 100%; against the network's moments, by nothing."""
    from .weights import OPTIMIZER_SUFFIXES
    parts = name.split(".")
    if len(parts) < 3 or parts[-1] != "next" or f".{parts[-2]}" not in OPTIMIZER_SUFFIXES:
        return 0.0
    kind = f".{parts[-2]}.next"
    return max((float(np.abs(v).max()) for k, v in want.items() if k.endswith(kind) and np.size(v)), default=0.0)


def adam_step_of_its_moments(graph, name, params, want, got, rtol) -> bool:
    """Whether float32 output `name` is an Adam parameter update that equals, within rtol, Adam's step
    of the moments this run computed (recomputed in float64), with those moments matching the
    reference's and every element past rtol coming from a first moment at rounding-noise level (at
    most 64 float32 epsilons of the largest first moment of any parameter): its difference from the
    reference is then Adam's conditioning (a gradient divided by its own size), not an error of the
    graph being checked. A
    gradient wrong by more than rounding, however small against the largest, is not excused."""
    from .ops import OPS
    if name not in graph or graph.node(name).op != "adam_param" or np.asarray(got.get(name)).dtype != np.float32:
        return False
    operands = graph.operands(name)
    values = [got.get(k, params.get(k)) for k in operands]
    if any(v is None for v in values):
        return False
    step = OPS["adam_param"].reference([np.asarray(v, dtype=np.float64) for v in values], graph.node(name).attrs)
    m, v = operands[1:3]
    if not (close(got[name], step, rtol) and all(k in want and k in got and close(got[k], want[k], rtol,
                                                                                      kind_scale(k, want))
                                                 for k in (m, v))):
        return False
    past = ~within(np.asarray(got[name], np.float64), np.asarray(want[name], np.float64), rtol)
    noise = 64 * float(np.finfo(np.float32).eps) * max(float(np.abs(want[m]).max()), kind_scale(m, want))
    return bool(np.all(np.abs(want[m])[past] <= noise) and np.all(np.abs(got[m])[past] <= noise))


def sgd_step_of_its_velocity(graph, name, params, want, got, rtol) -> bool:
    """Whether output `name` is an SGD parameter update (p' = p - lr * v') whose difference from the
    reference is its velocity's: the velocity v' is accepted (within rtol of its own values or of its
    kind's largest, see kind_scale), and every element of p' past rtol differs by at most
    lr * |got v' - want v'| plus the rounding of p - lr * v' (4 epsilons of the dtype on |p| + lr |v'|
    + |p'|). A velocity that is rounding noise (the gradient of a batch norm's bias that cancels in
    exact arithmetic) then makes a parameter at 0 differ by 100% of itself, which is no error; an
    update that is not p - lr * v' of an accepted velocity is not excused."""
    if name not in graph or graph.node(name).op != "sgd_param" or name not in got:
        return False
    p_name, v_name, lr_name = graph.operands(name)
    p, lr = (got.get(k, params.get(k)) for k in (p_name, lr_name))
    if p is None or lr is None or v_name not in want or v_name not in got:
        return False
    if not close(got[v_name], want[v_name], rtol, kind_scale(v_name, want)):
        return False
    f64 = lambda a: np.asarray(a, np.float64)
    p, lr, dv = f64(p), float(f64(lr)), np.abs(f64(got[v_name]) - f64(want[v_name]))
    new, ref = f64(got[name]), f64(want[name])
    eps = float(np.finfo(np.asarray(got[name]).dtype if np.asarray(got[name]).dtype.kind == "f" else np.float64).eps)
    allowed = lr * dv + 4 * eps * (np.abs(p) + lr * np.abs(f64(got[v_name])) + np.abs(ref))
    past = ~within(new, ref, rtol)
    return bool(np.all(np.abs(new - ref)[past] <= allowed[past]))


def cmd_emit(args):
    """The generated kernels of a stage as .cu files and a manifest, each compiled by NVRTC for sm_90."""
    from codegen.emit import emit
    from .pipeline import build
    from .training import Optimizer
    graph = build(load_model(args), args.stage, args.loss, Optimizer(args.optimizer), collapse=collapse_of(args))
    manifest = emit(graph, args.output, check_nvrtc=not args.no_nvrtc, tf32=args.tf32, winograd=args.winograd)
    rows = manifest["kernels"]
    from codegen.program import variant_layers
    variants = variant_words(args, variant_layers((r["name"], r["layers"]) for r in rows))
    print(f"{graph.name} --stage {args.stage}{variants}: {len(rows)} kernels, {len(manifest['launches'])} launches "
          f"-> {args.output}/")
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        res = r.get("nvrtc_sm_90")
        usage = (f"{res['registers']:3d} regs {res['shared_bytes']:6d} B smem {res['spill_stores']} spills"
                 if res else "")
        print(f"  {r['name'].ljust(width)}  {', '.join(r['nodes'])[:28]:<28}  {usage}")
    plan = manifest["buffer_plan"]
    print(f"buffer plan at batch {plan['batch']}: {plan['buffers']} buffers, {plan['allocated_bytes']:,} bytes "
          f"allocated, peak {plan['peak_live_bytes']:,} bytes live")
    return 0


def collapse_of(args) -> bool:
    """--collapse-convs, refused where the stage has no fusion passes (it would change nothing)."""
    if args.collapse_convs and not args.stage.startswith("fused"):
        raise GraphConvError(f"--collapse-convs is a fusion pass: it applies to --stage fused or fused-train, not "
                             f"--stage {args.stage}")
    return args.collapse_convs


def cmd_filters(args):
    """The learned filters of a conv layer as a picture."""
    from .pictures import filters_png
    from .training import read_checkpoint
    from .weights import load_weights
    graph = load_model(args, need_sizes=False)
    params = load_weights(args.weights, graph)          # a checkpoint or a weights file (export, save_weights)
    try:
        epochs = read_checkpoint(args.weights).epoch
        trained = f"after {epochs} epoch{'' if epochs == 1 else 's'}"
    except CheckpointError:
        trained = f"from {args.weights}"
    layer, png = filters_png(graph, params, args.layer)
    output = args.output or default_file(graph.name, layer, "filters", suffix=".png")
    if not str(output).lower().endswith(".png"):
        raise GraphConvError(f"-o {output}: the picture is a PNG; name the file with .png")
    refuse_clobber(args, output)
    write_file(output, png)
    print(f"wrote {output}: the filters of {layer} {trained} ({len(png):,} bytes)")
    return 0


PICTURE_SUFFIXES = {".svg": "svg", ".png": "png", ".dot": "dot"}
INPUT_SUFFIXES = (".npz", ".npy", ".py")


def refuse_clobber(args, output, suffix=None):
    """dump, report and filters -o write over an earlier output of theirs, never over the command's own
    inputs (the model file, --weights) or a file of a kind they never write (.npz, .npy, .py); a picture
    format goes to a file named for it (--format svg -o pic.png was SVG text in a .png)."""
    path = os.fspath(output)
    if suffix is not None and os.path.splitext(path)[1].lower() in PICTURE_SUFFIXES and \
            os.path.splitext(path)[1].lower() != suffix:
        raise GraphConvError(f"-o {path}: --format {suffix[1:]} writes {suffix[1:].upper()}, not "
                             f"{os.path.splitext(path)[1][1:].upper()}; name the file with {suffix}")
    if not os.path.exists(path):
        return
    inputs = [args.model.rsplit(":", 1)[0] if ":" in args.model else None, getattr(args, "weights", None)]
    for given in filter(None, inputs):
        if os.path.exists(given) and os.path.samefile(given, path):
            raise GraphConvError(f"-o {path}: is this command's own input ({'--weights' if given == inputs[1] else 'the model file'}); "
                                 f"choose another -o")
    if path.lower().endswith(INPUT_SUFFIXES):
        raise GraphConvError(f"-o {path}: exists and is a {os.path.splitext(path)[1]} file, which this command never "
                             f"writes; choose another -o")


def default_file(*parts, suffix) -> str:
    """A file in the current folder named after the model (and layer): a graph named "a/b" or ".."
    gives "a_b.npz" or "model.npz", not a path into another folder."""
    return "-".join(re.sub(r"[^\w.-]+", "_", part).strip("._") or "model" for part in parts) + suffix


def cmd_demo(args):
    from .demo import run_demo
    return run_demo(args.output, args.epochs, args.backend, args.seed, args.progress)


def cmd_report(args):
    """One self-contained HTML page linking layers, nodes, fusion decisions and kernels."""
    from codegen.report import build_report
    from .training import Optimizer
    from .weights import load_weights
    model = load_model(args)
    weights = load_weights(args.weights, model) if args.weights else None     # a checkpoint or a weights file
    page = build_report(model, args.stage, weights, args.loss, Optimizer(args.optimizer))
    output = args.output or default_file(model.name, "report", suffix=".html")
    refuse_clobber(args, output)
    write_file(output, page)
    print(f"wrote {output} ({len(page):,} bytes; open it in a browser, no network needed)")
    return 0


def cmd_gradcheck(args):
    from .gradcheck import check_graph, format_table
    from .training import attach_loss
    results = check_graph(attach_loss(load_model(args), args.loss), seed=args.seed, batch=args.batch)
    print(f"gradcheck {args.model}: every gradient rule of its backward graph, float64, batch {args.batch}, "
          f"seed {args.seed}")
    print(format_table(results))
    return 0 if all(r.ok for r in results) else 1


def cmd_predict(args):
    """Classify a data set split or an .npy file of inputs with trained weights."""
    from . import data
    from .weights import confusion, load_weights, predict
    graph = sizes_from_weights(args, sizes_from_input(args, load_model(args, need_sizes=False)))
    params = load_weights(args.weights, graph)
    shape = tuple(int(d) for d in graph.inputs[0].shape[1:])
    if args.input:
        if args.data or args.split:
            raise GraphConvError("--input classifies the arrays in a file; --data and --split choose a data set "
                                 "instead: give one or the other")
        x = read_inputs(args.input, shape, graph)
        labels, source = None, f"{args.input} ({len(x)} example{'s' if len(x) != 1 else ''})"
    else:
        args.split = args.split or "test"
        dataset = args.data or data.default_dataset(graph.inputs[0].shape)
        x_tr, y_tr, x_te, y_te = data.load(dataset, graph.inputs[0].shape, graph.name, graph.dtype)
        x, labels = (x_te, y_te) if args.split == "test" else (x_tr, y_tr)
        source = f"{dataset}, {args.split} split ({len(x)} examples)"
    predicted, scores = predict(graph, params, x, backend=args.backend, batch=args.batch)
    classes = scores.shape[1]
    if labels is not None and int(labels.max()) >= classes:
        raise GraphConvError(f"{graph.name} outputs {classes} scores per example; {dataset} has "
                             f"{int(labels.max()) + 1} classes")
    print(f"predict {graph.name} with {args.weights} on {source}, {args.backend} backend")
    if labels is None:
        counts = np.bincount(predicted, minlength=classes)
        print("predicted classes: " + " ".join(str(int(c)) for c in predicted[:40]) + (" ..." if len(x) > 40 else ""))
        print("count per class:   " + "  ".join(f"{c}: {int(n)}" for c, n in enumerate(counts)))
        return 0
    right = int((predicted == labels).sum())
    print(f"accuracy {right / len(x):.2%} ({right} of {len(x)})")
    counts = confusion(labels, predicted, classes)
    width = max(4, len(str(int(counts.max()))) + 1)
    print("confusion (rows: true class, columns: predicted)")
    print("     " + "".join(f"{c:>{width}}" for c in range(classes)))
    for c in range(classes):
        print(f"{c:>4} " + "".join(f"{int(n):>{width}}" for n in counts[c]))
    return 0


def sizes_from_input(args, graph):
    """With --input, a symbolic input dim (H, W) takes its size from the array's shape (one example
    or [N, ...])."""
    from .passes import unbound_dims
    if args.input and unbound_dims(graph) and os.path.isfile(args.input):     # a pipe would wait forever
        try:
            shape = np.load(args.input, mmap_mode="r", allow_pickle=False).shape
        except (OSError, ValueError, AttributeError):
            shape = ()          # read_inputs says what is wrong with the file
        rank = len(graph.inputs[0].shape)
        graph = bind_like(graph, shape if len(shape) == rank else (None, *shape) if len(shape) == rank - 1 else ())
    return graph


def sizes_from_weights(args, graph, path=None):
    """Symbolic input dims still unbound take the sizes the weights at `path` (--weights) were
    trained at (a checkpoint records its input); bound ones that differ get a note (a fully
    convolutional net may run at other sizes, but the user should know). What is still unbound is
    refused as load_model does."""
    from .checkpoint import read_checkpoint
    from .passes import unbound_dims
    path = path or args.weights
    try:
        trained = read_checkpoint(path, plain_ok=True).input_shape
    except GraphConvError:
        if unbound_dims(graph):
            raise           # what is wrong with the file comes before the sizes it would have given
        trained = ()        # load_weights says what is wrong with the file
    if len(trained) == len(graph.inputs[0].shape):
        graph = bind_like(graph, trained)
        now = [str(d) for d in graph.inputs[0].shape[1:]]
        if now != [str(t) for t in trained[1:]]:
            print(f"note: {path} was trained on inputs [{', '.join(map(str, trained[1:]))}]; these are "
                  f"[{', '.join(now)}]")
    refuse_unbound(args, graph)
    return graph


def bind_like(graph, shape):
    """The graph with each unbound symbolic dim of its first input sized as the same position of
    `shape` (an int there; anything else leaves it)."""
    from .passes import bind_dims, unbound_dims
    missing = unbound_dims(graph)
    sizes = {str(d): int(n) for d, n in zip(graph.inputs[0].shape, shape)
             if d in missing and isinstance(n, (int, np.integer)) and not isinstance(n, bool)}
    return bind_dims(graph, sizes) if sizes else graph


def read_inputs(path, shape, graph):
    """An .npy of inputs shaped (N, *shape), as the model takes them (standardised like the data
    graphconv train uses), cast to the model's dtype."""
    if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):
        raise GraphConvError(f"{path}: is not a regular file (a pipe or a device?); give a .npy file")
    try:
        x = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise GraphConvError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GraphConvError(f"{path}: is a directory; give a .npy file") from None
    except (ValueError, OSError) as e:
        raise GraphConvError(f"{path}: not a .npy array of numbers (np.save writes one)") from None
    if not isinstance(x, np.ndarray):       # an .npz archive
        x.close()
        raise GraphConvError(f"{path}: an .npz archive; --input takes one array in a .npy file (np.save)")
    if x.dtype.kind not in "fiu":
        raise GraphConvError(f"{path}: holds {getattr(x, 'dtype', type(x).__name__)} values; inputs are numbers")
    if x.shape[1:] != shape:
        if x.shape == shape:
            x = x[None]
        else:
            raise GraphConvError(f"{path}: shape {list(x.shape)}; {graph.name} takes [N, {', '.join(map(str, shape))}]")
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(graph.dtype)        # predict() refuses what is not finite after the cast


def cmd_export(args):
    """The weights of a checkpoint (optimizer state and dropout's step counter dropped) as a plain weights file."""
    from .weights import RUNTIME_STATE, load_weights, save_weights
    graph = load_model(args, need_sizes=False)
    params = {k: v for k, v in load_weights(args.weights, graph).items() if k not in RUNTIME_STATE}
    refuse_export_over(args)
    save_weights(args.output, params)
    trainable = {p.name for p in graph.params if p.role == "param"}
    counts = [sum(int(v.size) for k, v in params.items() if (k in trainable) == want) for want in (True, False)]
    buffers = f" + {counts[1]:,} in buffers" if counts[1] else ""
    print(f"wrote {args.output}: {len(params)} arrays of {graph.name} ({counts[0]:,} parameters{buffers}, "
          f"{graph.dtype}) from {args.weights}")
    return 0


def refuse_export_over(args):
    """export writes over a plain weights file, never silently over its own --weights, a checkpoint
    (its optimizer state and epoch count would be lost) or a file that is not graphconv's."""
    from .checkpoint import read_checkpoint
    out = args.output
    if not os.path.isfile(out):
        return
    if os.path.samefile(out, args.weights):
        raise GraphConvError(f"export: -o {out} is the --weights file itself (a checkpoint would lose its optimizer "
                             f"state and epoch count); choose another -o")
    if args.force:
        return
    try:
        epoch = read_checkpoint(out).epoch
    except GraphConvError:
        try:
            read_checkpoint(out, plain_ok=True)
            return                        # a weights file: written again
        except GraphConvError:
            raise GraphConvError(f"export: {out} exists and is not a graphconv weights file; choose another -o or "
                                 f"pass --force to overwrite it") from None
    raise GraphConvError(f"export: {out} is a checkpoint (after {epoch} epoch{'s' if epoch != 1 else ''}, with its optimizer state); choose "
                         f"another -o or pass --force to overwrite it")


def cmd_train(args):
    from . import data
    from .training import Optimizer, Trainer, batches, check_writable, read_checkpoint
    graph = load_model(args, need_sizes=not args.resume)
    if args.resume:         # symbolic sizes as the checkpoint was trained at, unless --dim says otherwise
        graph = sizes_from_weights(args, graph, args.resume)
    dataset = args.data or data.default_dataset(graph.inputs[0].shape)
    if graph.batch_symbol() is None and graph.inputs and graph.inputs[0].shape:      # a fixed first dim
        raise GraphConvError(f"{graph.name}'s input {graph.inputs[0].name} has a fixed first dim of "
                             f"{graph.inputs[0].shape[0]} (no batch dim): training feeds batches of --batch examples "
                             f"and a last one of another size; declare the first dim as a name (\"N\") to train it")
    if args.momentum is not None and args.optimizer != "sgd":
        raise GraphConvError(f"--momentum is an sgd setting; adam has none (use --optimizer sgd, or drop --momentum)")
    given = [flag for flag, value in (("--gamma", args.gamma), ("--step-size", args.step_size)) if value is not None]
    if given and args.schedule != "step":
        raise GraphConvError(f"{' and '.join(given)} {'set' if len(given) > 1 else 'sets'} the step schedule (the "
                             f"learning rate times --gamma every --step-size epochs); --schedule {args.schedule} "
                             f"does not use {'them' if len(given) > 1 else 'it'}: add --schedule step, or drop "
                             f"{' and '.join(given)}")
    opt = Optimizer(args.optimizer, lr=args.lr, weight_decay=args.weight_decay, schedule=args.schedule,
                    step_size=args.step_size or 10, gamma=args.gamma or 0.1, epochs=args.epochs,
                    **({"momentum": args.momentum} if args.momentum is not None else {}))
    save = args.save or default_file(graph.name, suffix=".npz")
    check_writable(save)   # before any work: a bad path is found now, not after the first epoch
    trainer = Trainer(graph, opt, loss=args.loss, backend=args.backend, seed=args.seed, tf32=args.tf32,
                      winograd=args.winograd)
    if args.resume:
        for note in trainer.load(args.resume):
            if not note.startswith("epochs "):     # set below from the resumed epoch and --epochs, whatever it was
                print(f"note: resuming with a different setting: {note}")
        print(f"resumed from {args.resume} after epoch {trainer.epoch}")
    trainer.optimizer.epochs = trainer.epoch + args.epochs     # cosine: the whole run, resumed or not
    refuse_overwrite(save, args, trainer.epoch + args.epochs, read_checkpoint)
    x_tr, y_tr, x_te, y_te = data.load(dataset, trainer.model.node(trainer.input_name).shape, graph.name, graph.dtype)
    classes = int(trainer.with_loss.node(trainer.with_loss.outputs[1]).shape[1])
    if classes != len(np.unique(y_tr)):
        raise GraphConvError(f"{graph.name} outputs {classes} scores per example; {dataset} has "
                             f"{len(np.unique(y_tr))} classes")
    print(f"training {graph.name} on {dataset} ({len(x_tr)} train / {len(x_te)} test), {args.backend} backend"
          f"{variant_words(args, program_variants(trainer.step_program))}, {opt.describe()}, batch {args.batch}, "
          f"seed {args.seed}")
    saved_epoch = trainer.epoch if args.resume else None
    wrote = False          # whether this run has written `save` (a file there before it may be another run's)
    try:
        for _ in range(args.epochs):
            start = time.perf_counter()
            order = batches(len(x_tr), args.batch, args.seed, trainer.epoch)
            losses, correct = [], 0
            lr = trainer.optimizer.lr_at(trainer.epoch)
            for idx in progress(order, f"epoch {trainer.epoch + 1}", args.progress):
                loss, scores = trainer.step(x_tr[idx], y_tr[idx])
                losses.append(loss * len(idx))
                correct += int((scores.argmax(axis=1) == y_tr[idx]).sum())
            trainer.epoch += 1
            test_loss, test_acc = trainer.evaluate(x_te, y_te)
            trainer.save(save)
            saved_epoch, wrote = trainer.epoch, True
            print(f"epoch {trainer.epoch:3d}  loss {sum(losses) / len(x_tr):.4f}  train acc {correct / len(x_tr):6.2%}  "
                  f"test loss {test_loss:.4f}  test acc {test_acc:6.2%}  "
                  + (f"lr {lr:.3g}  " if opt.schedule != "constant" else "")
                  + f"({time.perf_counter() - start:.1f} s)",
                  flush=True)
    except KeyboardInterrupt:
        print(f"graphconv: interrupted in epoch {trainer.epoch + 1}; {last_checkpoint(save, args, saved_epoch, wrote)}",
              file=sys.stderr)
        return 130
    except GraphConvError as e:
        raise type(e)(f"{e}; {last_checkpoint(save, args, saved_epoch, wrote)}") from None
    print(f"saved {save}")


def last_checkpoint(save, args, epoch, wrote):
    """Where a stopped run can be picked up again: what it wrote, else the checkpoint it resumed."""
    if epoch is None:
        return "no checkpoint was written"
    source = save if wrote else args.resume
    return f"the last checkpoint is {source} (after epoch {epoch}): continue with --resume {source}"


def refuse_overwrite(save, args, final_epoch, read_checkpoint):
    """A run never silently replaces a longer one: an existing checkpoint with more epochs than this
    run will reach, or a file that is not a checkpoint, needs --force (or --resume from it)."""
    if args.force or not os.path.exists(save) or (args.resume and os.path.samefile(save, args.resume)):
        return
    try:
        existing = read_checkpoint(save).epoch
    except GraphConvError:
        raise GraphConvError(f"{save} exists and is not a graphconv checkpoint; choose another --save path or "
                             f"pass --force to overwrite it") from None
    if existing > final_epoch:
        raise GraphConvError(f"{save} holds a longer run ({existing} epochs; this one ends after {final_epoch}); "
                             f"continue it with --resume {save}, choose another --save path, or pass --force")
    print(f"note: {save} (a checkpoint after {existing} epochs) will be overwritten")


def cmd_run(args):
    from . import compile as gc_compile
    from .data import random_inputs
    from .params import init_params
    from .printer import fmt_type
    graph = load_model(args)
    program = gc_compile(graph, backend=args.backend, tf32=args.tf32, winograd=args.winograd,
                         training=False if args.eval else None)
    active = list(dict.fromkeys("batch statistics" if n.op == "batch_norm" else "dropout on"
                                for n in program.graph.topo()
                                if n.op in ("batch_norm", "dropout") and n.attrs.get("training")))
    mode = ", eval mode" if args.eval else f", training mode: {' and '.join(active)} (--eval for inference)" \
        if active else ""
    params = init_params(graph, seed=args.seed)
    batch = args.batch or 8
    if graph.batch_symbol() is None and graph.inputs and graph.inputs[0].shape:      # a fixed first dim
        fixed = int(graph.inputs[0].shape[0])
        if args.batch is not None and args.batch != fixed:
            raise GraphConvError(f"--batch {args.batch}: {graph.name}'s input {graph.inputs[0].name} has a fixed first "
                                 f"dim of {fixed} (no batch dim to size); drop --batch")
        batch = fixed
    inputs = random_inputs(graph, batch, args.seed)
    start = time.perf_counter()
    outs = program.run(inputs, params)
    elapsed = time.perf_counter() - start
    print(f"{graph.name} on {args.backend}{variant_words(args, program_variants(program))}{mode}: batch {batch}, "
          f"seed {args.seed}, {elapsed * 1e3:.1f} ms")
    for name, value in outs.items():
        print(f"  {name}: {fmt_type(graph.node(name).type)} -> {value.dtype}{list(value.shape)}  "
              f"mean {value.mean():+.6f}  std {value.std():.6f}  min {value.min():+.6f}  max {value.max():+.6f}")


def load_model(args, need_sizes=True):
    """The model named on the command line, with --dim sizes bound; a symbolic input dim other than
    the batch is refused with the option that gives it a size."""
    from .models import load
    from .passes import bind_dims
    graph = load(args.model, args.dtype)
    given = getattr(args, "dim", None) or []
    dims, batch = dict(given), graph.batch_symbol()
    for name, size in given:
        if dims[name] != size:
            raise GraphConvError(f"--dim {name} is given twice ({name}={size} and {name}={dims[name]}); give it once")
    if batch is not None and str(batch) in dims and hasattr(args, "batch"):
        # the command has --batch: that is where the batch goes (a label, a data set, the plan follow it)
        raise GraphConvError(f"--dim {batch}={dims[str(batch)]}: {batch} is {graph.name}'s batch dim; give its size "
                             f"with --batch")
    graph = bind_dims(graph, dims)
    if need_sizes:
        refuse_unbound(args, graph)
    return graph


def refuse_unbound(args, graph):
    """A symbolic input dim other than the batch is refused with the option that gives it a size."""
    from .passes import unbound_dims
    missing = unbound_dims(graph)
    if missing:
        names = ", ".join(map(str, missing))
        example = " ".join(f"--dim {d}=SIZE" for d in missing)
        n = graph.batch_symbol()
        from_batch = "" if n is None or not hasattr(args, "batch") else \
            f" (the batch dim {n} is the number of examples)" if getattr(args, "command", "") == "predict" else \
            f" (the batch dim {n} comes from --batch)"
        dims_are = f"dims {names} are" if len(missing) > 1 else f"dim {names} is"
        raise GraphConvError(f"{graph.name}: its input {dims_are} symbolic and this command needs sizes; "
                             f"give {'them' if len(missing) > 1 else 'it'} with {example}{from_batch}")


def variant_words(args, layers) -> str:
    """", TF32 tensor cores on conv2, fc1, fc2" for a header: where --tf32 / --winograd changed a
    kernel (`layers`: Program.variant_layers), or that it changed none, so it is never silently off."""
    from codegen.lowering import direct_tf32, winograd
    takes = {"tf32": f"matrix products and convolutions; a direct convolution needs at least "
                     f"{direct_tf32.LEAST_CHANNELS} input channels",
             "winograd": f"3 x 3 stride-1 convolutions with at least {winograd.LEAST_CHANNELS} input and "
                         f"{winograd.LEAST_OUTPUTS} output channels"}
    words = ""
    for flag, what in (("tf32", "TF32 tensor cores"), ("winograd", "Winograd F(2x2, 3x3)")):
        if getattr(args, flag, False):
            words += (f", {what} on {', '.join(layers[flag])}" if layers[flag] else
                      f", --{flag} changes no kernel here (it takes {takes[flag]})")
    return words


def program_variants(program) -> dict:
    """Program.variant_layers of a compiled program (none on the numpy backend)."""
    inner = getattr(program, "program", None)
    return inner.variant_layers if inner is not None else {"tf32": (), "winograd": ()}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help text (not for flags and options without one) and the
    examples as written."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


STAGE_NAMES = ("forward", "backward", "train", "fused", "fused-train")
BACKEND_CHOICES = ("numpy", "host", "cuda")
BACKEND_HELP = ("numpy: the reference interpreter; host: the generated CUDA kernels built with g++ and run on the "
                "CPU; cuda: on an NVIDIA GPU")
TF32_HELP = ("host/cuda, float32: convolutions and matrix products on TF32 tensor cores (inputs rounded to 10 "
             "mantissa bits, FP32 sums)")
WINOGRAD_HELP = ("host/cuda, float32: 3 x 3 stride-1 convolutions (forward and input gradient) by Winograd's "
                 "F(2x2, 3x3), 2.25x fewer multiply-adds (opt-in until timed on a GPU)")
COLLAPSE_HELP = ("fused stages: also collapse stacked convolutions into one where exact (a fusion pass; "
                 "multiply-adds may rise)")
TF32_RTOL = 2e-2    # check --tf32: the outputs after a whole network of TF32 products
LOSS_HELP = ("cross_entropy (the default): softmax cross-entropy; hinge: the lecture's multiclass SVM loss (not for a model "
             "whose graph ends in its own scalar loss)")


EXAMPLES = {
    "demo": ["graphconv demo", "graphconv demo --epochs 6 -o my-demo"],
    "models": ["graphconv models"],
    "summary": ["graphconv summary lenet5", "graphconv summary vgg_small --batch 64 --stage train"],
    "dump": ["graphconv dump lenet5 --stage fused-train", "graphconv dump lenet5 --stage train --format svg -o train.svg"],
    "fuse": ["graphconv fuse lenet5 --stage fused-train --batch 64"],
    "check": ["graphconv check lenet5 --stage fused-train", "graphconv check vgg_small --backend host --dtype float32",
              "graphconv check lenet5 --backend host --dtype float32 --tf32",
              "graphconv check vgg_small --backend host --dtype float32 --stage fused-train --races",
              "graphconv check vgg_small --backend host --dtype float32 --winograd",
              "graphconv check lenet5 --backend host --dtype float32 --stage fused-train --bounds"],
    "emit": ["graphconv emit lenet5 --stage fused-train -o lenet5-kernels"],
    "report": ["graphconv report lenet5 -o lenet5.html", "graphconv report lenet5 --weights lenet5.npz"],
    "filters": ["graphconv filters lenet5 --weights lenet5.npz -o conv1.png",
                "graphconv filters lenet5 --weights lenet5.npz --layer conv2"],
    "gradcheck": ["graphconv gradcheck lenet5", "graphconv gradcheck examples/custom_net.py:build"],
    "train": ["graphconv train lenet5 --epochs 6", "graphconv train lenet5 --backend host --save run.npz",
              "graphconv train lenet5 --epochs 6 --schedule cosine",
              "graphconv train lenet5 --resume run.npz --epochs 2"],
    "run": ["graphconv run lenet5 --batch 8", "graphconv run lenet5 --backend host"],
    "predict": ["graphconv predict lenet5 --weights lenet5.npz", "graphconv predict lenet5 --weights lenet5.npz "
                "--split train --backend host", "graphconv predict lenet5 --weights model.npz --input images.npy"],
    "export": ["graphconv export lenet5 --weights lenet5.npz -o lenet5-weights.npz"],
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphconv", description="A symbolic graph compiler for CNNs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_, model=True, dtype=("float32", "float64"), dims=False):
        examples = "\n".join(f"  {line}" for line in EXAMPLES[name])
        s = sub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".",
                           formatter_class=HelpFormatter, epilog=f"examples:\n{examples}")
        if model:
            s.add_argument("model", help="a bundled model name (see `graphconv models`) or path/to/file.py:function")
            s.add_argument("--dtype", default=dtype[0] if dtype[0] == "float64" else None, choices=dtype,
                           help="the float type to compute in (default: " +
                                ("float64" if dtype[0] == "float64" else "the model's own; float32 for a bundled model") + ")")
        if dims:
            s.add_argument("--dim", action="append", type=_dim, metavar="NAME=SIZE",
                           help="the size of a symbolic input dim such as H in (N, 3, H, W); repeat for each")
        return s

    s = command("demo", "the whole tool on LeNet-5: layer table, fused training graph, CUDA kernels (NVRTC-checked), "
                "every kernel checked against NumPy, training on the digits, filter and graph pictures", model=False)
    s.add_argument("-o", "--output", default="graphconv-demo", help="folder for the kernels, weights and pictures")
    s.add_argument("--epochs", type=_positive, default=3, help="training epochs")
    s.add_argument("--backend", default="auto", choices=("auto", "host", "cuda"),
                   help="auto: cuda where a GPU answers, else host (the same kernels on the CPU)")
    s.add_argument("--seed", type=_seed, default=0, help="seed of the weights, data order and check inputs")
    s.add_argument("--progress", default="auto", choices=("auto", "on", "off"),
                   help="progress bar on stderr (auto: when stderr is a terminal)")
    s.set_defaults(func=cmd_demo)

    s = command("models", "list the bundled models", model=False)
    s.set_defaults(func=cmd_models)

    s = command("summary", "the layer table: sizes, parameters, multiply-adds, receptive fields", dims=True)
    s.add_argument("--batch", type=_positive, default=None, help="batch size (default: counts per example)")
    s.add_argument("--format", default="table", choices=("table", "json"), help="output format")
    s.add_argument("--stage", default="forward", choices=STAGE_NAMES,
                   help="forward/fused: the layer table; train/fused-train: what one training step computes and holds")
    s.add_argument("--loss", default=None, choices=("cross_entropy", "hinge"), help=LOSS_HELP)
    s.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="for --stage train")
    s.add_argument("--collapse-convs", action="store_true", help=COLLAPSE_HELP)
    s.set_defaults(func=cmd_summary)

    s = command("dump", "print the graph IR of any stage: forward, backward, train, fused, fused-train", dims=True)
    s.add_argument("--stage", default="forward", choices=STAGE_NAMES, help="which graph")
    s.add_argument("--after", default=None, metavar="PASS", help="stop the stage after this pass (default: all)")
    s.add_argument("--collapse-convs", action="store_true", help=COLLAPSE_HELP)
    s.add_argument("--format", default="text", choices=("text", "dot", "json", "svg", "png"),
                   help="text (jaxpr-like), dot (graphviz), json, or a picture drawn by graphviz (svg, png): one "
                        "cluster per layer, gradient nodes orange, fused nodes green")
    s.add_argument("-o", "--output", default=None, help="write to this file instead of standard output")
    s.add_argument("--loss", default=None, choices=("cross_entropy", "hinge"), help=LOSS_HELP)
    s.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="for --stage train")
    s.add_argument("--batch", type=_positive, default=None, help="batch size for the saved-bytes line "
                   "(default: per example)")
    s.set_defaults(func=cmd_dump)

    s = command("fuse", "the fusion report: every candidate chain, the rule that fired or why not, bytes moved",
                dims=True)
    s.add_argument("--stage", default="fused", choices=("fused", "fused-train"), help="which fused graph")
    s.add_argument("--format", default="text", choices=("text", "json"), help="output format")
    s.add_argument("--batch", type=_positive, default=None, help="batch size for the byte counts "
                   "(default: per example)")
    s.add_argument("--loss", default=None, choices=("cross_entropy", "hinge"), help=LOSS_HELP)
    s.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="for --stage fused-train")
    s.add_argument("--collapse-convs", action="store_true", help=COLLAPSE_HELP)
    s.set_defaults(func=cmd_fuse)

    s = command("check", "run a fused graph and its unfused original on the same random data and compare",
                dtype=("float64", "float32"), dims=True)
    s.add_argument("--stage", default="fused", choices=("fused", "fused-train"), help="which fused graph")
    s.add_argument("--backend", default="numpy", choices=BACKEND_CHOICES,
                   help="numpy: the fused graph against the unfused one; host (CPU) or cuda (GPU): also every "
                        "generated kernel against the NumPy reference of its node, outputs poisoned first")
    s.add_argument("--batch", type=_positive, default=4, help="batch size of the random data")
    s.add_argument("--seed", type=_seed, default=0, help="seed of the data and parameters")
    s.add_argument("--rtol", type=_positive_float, default=None,
                   help=f"relative tolerance of the outputs (default: 1e-9 in float64, 1e-4 in float32, {TF32_RTOL:g} "
                        f"with --tf32; each TF32 kernel is held to its own, tighter tolerance; in float32 an Adam "
                        f"update past it that is its own moments' step, from gradients at rounding noise, is ok*; an SGD "
                        f"update that differs by no more than lr times its accepted velocity's difference is ok~)")
    s.add_argument("--tf32", action="store_true", help=TF32_HELP)
    s.add_argument("--winograd", action="store_true", help=WINOGRAD_HELP)
    s.add_argument("--bounds", action="store_true",
                   help="with --backend host: build the kernels with AddressSanitizer (in a child process) so that "
                        "a read or write outside the arrays a kernel is given, or its shared arrays, stops the check "
                        "and names the kernel")
    s.add_argument("--races", action="store_true",
                   help="with --backend host: run every kernel under the host's four schedules (a block's threads "
                        "forward and in reverse, cp.async copies landing at their wait and at their issue) and "
                        "require the same bits from each: a missing barrier or wait shows as a mismatch")
    s.add_argument("--loss", default=None, choices=("cross_entropy", "hinge"), help=LOSS_HELP)
    s.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="for --stage fused-train")
    s.add_argument("--collapse-convs", action="store_true", help=COLLAPSE_HELP)
    s.set_defaults(func=cmd_check)

    s = command("emit", "write the generated CUDA kernels of a stage (.cu files + manifest.json), NVRTC-checked",
                dims=True)
    s.add_argument("--stage", default="fused", choices=STAGE_NAMES, help="which graph")
    s.add_argument("-o", "--output", required=True, help="folder for the .cu files and manifest.json")
    s.add_argument("--no-nvrtc", action="store_true", help="skip the NVRTC compile (and the resource columns)")
    s.add_argument("--tf32", action="store_true", help="the TF32 tensor-core variants of the GEMM kernels")
    s.add_argument("--winograd", action="store_true", help=WINOGRAD_HELP)
    s.add_argument("--loss", default=None, choices=("cross_entropy", "hinge"), help=LOSS_HELP)
    s.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="for the training stages")
    s.add_argument("--collapse-convs", action="store_true", help=COLLAPSE_HELP)
    s.set_defaults(func=cmd_emit)

    s = command("report", "one self-contained HTML page: layer table, graph picture, and per layer its nodes, "
                "gradient nodes, fusion decisions and generated kernels", dims=True)
    s.add_argument("--stage", default="fused-train", choices=STAGE_NAMES, help="which graph")
    s.add_argument("-o", "--output", default=None, help="the HTML file (default: MODEL-report.html)")
    s.add_argument("--weights", default=None, help="a checkpoint (graphconv train --save) or weights file (export): "
                                                   "the page then shows conv1's learned filters")
    s.add_argument("--loss", default=None, choices=("cross_entropy", "hinge"), help=LOSS_HELP)
    s.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="for the training stages")
    s.set_defaults(func=cmd_report)

    s = command("filters", "draw the learned filters of a conv layer as a PNG grid (e.g. after graphconv train)")
    s.add_argument("--weights", required=True, help="a checkpoint (graphconv train --save) or weights file (export)")
    s.add_argument("--layer", default=None, help="the conv layer (default: the first)")
    s.add_argument("-o", "--output", default=None, help="the PNG to write (default: MODEL-LAYER-filters.png)")
    s.set_defaults(func=cmd_filters)

    s = command("gradcheck", "check every gradient rule of the model's backward graph by finite differences",
                dtype=("float64",), dims=True)
    s.add_argument("--loss", default=None, choices=("cross_entropy", "hinge"), help=LOSS_HELP)
    s.add_argument("--seed", type=_seed, default=0, help="seed of the random data, parameters and directions")
    s.add_argument("--batch", type=_positive, default=2, help="batch size of the random data")
    s.set_defaults(func=cmd_gradcheck)

    s = command("train", "train a model on an offline data set", dims=True)
    s.add_argument("--data", default=None, choices=("digits", "mnist1d", "digits3d"),
                   help="data set (default: by the model's input: mnist1d for 1-D, digits for 2-D and flat, "
                        "digits3d for 3-D)")
    s.add_argument("--epochs", type=_positive, default=3, help="epochs to run now (a resumed run continues counting)")
    s.add_argument("--batch", type=_positive, default=64, help="examples per training step")
    s.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help="parameter update rule")
    s.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate")
    s.add_argument("--momentum", type=_non_negative_float, default=None, help="sgd momentum (default 0.9)")
    s.add_argument("--weight-decay", type=_non_negative_float, default=0.0, help="L2 penalty added to the gradient")
    s.add_argument("--schedule", default="constant", choices=("constant", "step", "cosine"),
                   help="learning rate per epoch: step multiplies it by --gamma every --step-size epochs; cosine "
                        "anneals it to 0 over the whole run (resumed runs included)")
    s.add_argument("--step-size", type=_positive, default=None,
                   help="epochs between the step schedule's decays (default 10; --schedule step only)")
    s.add_argument("--gamma", type=_positive_float, default=None,
                   help="the step schedule's factor, in (0, 1] (default 0.1; --schedule step only)")
    s.add_argument("--loss", default=None, choices=("cross_entropy", "hinge"), help=LOSS_HELP)
    s.add_argument("--seed", type=_seed, default=0, help="seed of the initial weights and the batch order")
    s.add_argument("--backend", default="numpy", choices=BACKEND_CHOICES, help=BACKEND_HELP)
    s.add_argument("--tf32", action="store_true", help=TF32_HELP)
    s.add_argument("--winograd", action="store_true", help=WINOGRAD_HELP)
    s.add_argument("--save", default=None, help="checkpoint path, written after every epoch (default: MODEL.npz)")
    s.add_argument("--resume", default=None, help="continue from a checkpoint written by --save")
    s.add_argument("--force", action="store_true", help="overwrite an existing --save file that holds a longer run")
    s.add_argument("--progress", default="auto", choices=("auto", "on", "off"),
                   help="progress bar on stderr (auto: when stderr is a terminal)")
    s.set_defaults(func=cmd_train)

    s = command("predict", "classify a data set split or an .npy of inputs with trained weights (accuracy and "
                "confusion matrix where labels exist)", dims=True)
    s.add_argument("--weights", required=True, help="a checkpoint (graphconv train --save) or weights file (export)")
    s.add_argument("--data", default=None, choices=("digits", "mnist1d", "digits3d"),
                   help="data set (default: by the model's input, as graphconv train chooses)")
    s.add_argument("--split", default=None, choices=("test", "train"), help="which part of the data set "
                                                                            "(default: test)")
    s.add_argument("--input", default=None, help="an .npy of inputs [N, ...] instead of a data set (standardised "
                                                   "as the training data)")
    s.add_argument("--backend", default="numpy", choices=BACKEND_CHOICES, help=BACKEND_HELP)
    s.add_argument("--batch", type=_positive, default=256, help="examples per run")
    s.set_defaults(func=cmd_predict)

    s = command("export", "write the weights of a checkpoint as a plain weights file (optimizer state and "
                "run-time counters dropped)", dims=True)
    s.add_argument("--weights", required=True, help="a checkpoint written by graphconv train --save")
    s.add_argument("-o", "--output", required=True, help="the weights file to write (.npz); an existing weights "
                   "file is replaced, a checkpoint or another file only with --force")
    s.add_argument("--force", action="store_true", help="overwrite -o even where it is a checkpoint or not "
                   "graphconv's (never the --weights file itself)")
    s.set_defaults(func=cmd_export)

    s = command("run", "run a model on random inputs and print its outputs", dims=True)
    s.add_argument("--batch", type=_positive, help="batch size of the random inputs (default: 8); a model whose "
                   "inputs have a fixed first dim runs at that size")
    s.add_argument("--seed", type=_seed, default=0, help="seed of the inputs and parameters")
    s.add_argument("--backend", default="numpy", choices=BACKEND_CHOICES, help=BACKEND_HELP)
    s.add_argument("--tf32", action="store_true", help=TF32_HELP)
    s.add_argument("--winograd", action="store_true", help=WINOGRAD_HELP)
    s.add_argument("--eval", action="store_true", help="inference mode: batch norm with its running statistics, "
                                                       "dropout off (default: the graph as declared)")
    s.set_defaults(func=cmd_run)
    return p


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _seed(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _float(text, ok, what):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (value == value and abs(value) != float("inf") and ok(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number {what}, got {text}")
    return value


def _positive_float(text):
    return _float(text, lambda v: v > 0, "> 0")


def _non_negative_float(text):
    return _float(text, lambda v: v >= 0, ">= 0")


def _dim(text):
    name, sep, size = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE such as H=32, got {text!r}")
    return name, _positive(size)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args) or 0
    except GraphConvError as e:
        message = " ".join(str(e).split())   # one line, whatever the message holds
        print(f"graphconv: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("graphconv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
