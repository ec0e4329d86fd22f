"""Where a compiled step's device time goes: a profiler trace of a few calls, each kernel attributed to a model
component through the HLO op metadata (the JAX name stack: Flax module paths and `jax.named_scope`s).

    compiled = jax.jit(step).lower(*args).compile()
    table = profile_components(compiled, lambda: compiled(*args), calls=3)   # {component: ms per call}

Kernels are read from the trace (`jax.profiler`, perfetto JSON): every device event that names its HLO op. Each
op's `op_name` (for a fusion: the names of the ops inside it) is matched against COMPONENTS in order; the first
pattern that matches any of them wins. Defines no flags (used by bench_pretrain.py --profile).
"""

from __future__ import annotations

import collections
import functools
import glob
import gzip
import json
import os
import re
import tempfile


# (component, regex on an op_name). Order matters: the first match wins. Names come from the Flax module path
# (self_attn, mlp/gate, shared_experts, lm_head, ...) and the named scopes in dsjax (attention_core, dispatch,
# experts, combine, cross_entropy, optimizer, accumulate).
def _scope(*names: str) -> str:
    """A named scope anywhere in an op_name; under autodiff it reads jvp(name) or transpose(jvp(name))."""
    return "|".join(rf"(?:^|[/(]){n}(?:[)/]|$)" for n in names)


COMPONENTS = (
    ("optimizer", _scope("optimizer")),
    ("head+CE", _scope("cross_entropy", "loss", "lm_head") + r"|DeepSeekV3\.head"),
    ("attention core", _scope("attention_core")),
    ("attention proj+rope", r"self_attn"),
    ("router", r"mlp/gate|" + _scope("router")),
    ("sort/gather/scatter", _scope("dispatch", "combine")),
    ("experts", _scope("experts")),
    ("shared experts", r"shared_experts"),
    ("dense MLP", r"dense_layers/.*mlp"),
    ("norms", r"layernorm|/norm/|enorm|hnorm"),
    ("MTP glue", r"mtp_"),
    ("embedding", r"embed"),
    ("grad accumulation", _scope("accumulate")),
)
# HLO opcodes that only move or re-type data: a kernel made of nothing else is a cast/copy, wherever it sits
_DATA_MOVES = {
    "convert",
    "copy",
    "transpose",
    "reshape",
    "broadcast",
    "bitcast",
    "parameter",
    "constant",
    "slice",
    "concatenate",
    "pad",
    "dynamic-slice",
    "dynamic-update-slice",
    "tuple",
    "get-tuple-element",
    "bitcast-convert",
    "copy-start",
    "copy-done",
}
_CONTROL = {"while", "call", "conditional"}  # their trace events contain their bodies' kernels


def _field(text: str, pattern: str):
    found = re.search(pattern, text)
    return found.group(1) if found else None


def _operands(args: str) -> list[str]:
    """The %names in an operand list (args starts after its opening parenthesis)."""
    depth = 1
    for i, ch in enumerate(args):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            return re.findall(r"%([\w.\-]+)", args[:i])
    return []


def parse_hlo(hlo_text: str):
    """HLO text -> ({computation: [instruction dict]}, {instruction: its result type text}, the entry's name). An
    instruction: name, opcode, op_name, operands, the computations it calls (calls / body / to_apply / branches),
    its known trip count (while) and parameter number."""
    comps, types, comp, entry = collections.defaultdict(list), {}, None, None
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$", line)
        if m and "=" not in line.split("(")[0]:
            comp = m.group(2)
            entry = comp if m.group(1) else entry
            continue
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
        if not m or comp is None:
            continue
        name, rest = m.groups()
        # the opcode is the word before the operand list, after the result type (which may be a tuple)
        op = re.search(r"(?:^|[\s}\])])([a-z][a-z0-9\-]*)\(", rest)
        types[name] = rest[: op.start(1)] if op else rest
        get = functools.partial(_field, rest)
        trip, param, branches = (
            get(r'known_trip_count":\{"n":"(\d+)"'),
            get(r"parameter\((\d+)\)"),
            get(r"branch_computations=\{([^}]*)\}"),
        )
        if branches is None and "true_computation=" in rest:  # a predicated conditional names its two branches
            branches = ", ".join(get(rf"{b}_computation=%?([\w.\-]+)") or "" for b in ("true", "false"))
        comps[comp].append(
            {
                "name": name,
                "opcode": op.group(1) if op else "",
                "op_name": get(r'op_name="([^"]*)"') or "",
                "operands": _operands(rest[op.end() :]) if op else [],
                "calls": get(r"calls=%?([\w.\-]+)"),
                "body": get(r"body=%?([\w.\-]+)"),
                "to_apply": get(r"to_apply=%?([\w.\-]+)"),
                "branches": re.findall(r"%?([\w.\-]+)", branches) if branches else [],
                "trip": int(trip) if trip else 1,
                "param": int(param) if param is not None else None,
            }
        )
    return comps, types, entry


def index_of(parsed):
    """{op: (opcode, op_name or "", called computation or None)} and {computation: [(opcode, op_name)]}."""
    comps = parsed[0]
    ops = {x["name"]: (x["opcode"], x["op_name"], x["calls"]) for body in comps.values() for x in body}
    return ops, {c: [(x["opcode"], x["op_name"]) for x in body] for c, body in comps.items()}


def hlo_index(hlo_text: str):
    return index_of(parse_hlo(hlo_text))


def _match(name: str) -> str:
    for comp, pattern in COMPONENTS:
        if re.search(pattern, name):
            return comp
    return "other"


def classify(op: str, index) -> str:
    """Component of one kernel: its own op_name first, else a vote of its inner ops' op_names; a kernel that only
    moves or re-types data is "casts/copies" wherever it sits."""
    ops, comps = index
    opcode, name, called = ops.get(op, ("", "", None))
    inner = comps.get(called, []) if called else []
    if all(c in _DATA_MOVES for c, _ in inner or [(opcode, name)]):
        return "casts/copies"
    own = _match(name) if name else "other"
    if own != "other":
        return own
    votes = collections.Counter(_match(n) for _, n in inner if n)
    votes.pop("other", None)
    return votes.most_common(1)[0][0] if votes else "other"


def _device_events(trace_dir: str):
    paths = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise RuntimeError(f"no perfetto trace under {trace_dir}")
    data = json.load(gzip.open(sorted(paths)[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    device_pids = {
        e["pid"]
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and re.search(r"device:(GPU|TPU)", str(e.get("args", {}).get("name", "")))
    }
    out = []
    for e in events:
        if e.get("ph") != "X" or "hlo_op" not in (e.get("args") or {}):
            continue
        if device_pids and e.get("pid") not in device_pids:
            continue
        out.append((e["args"]["hlo_op"], float(e.get("dur", 0.0)) / 1e3, e.get("name", "")))
    return out


def profile_components(compiled, call, calls: int = 3, trace_dir: str | None = None, top: int = 5):
    """Run `call()` `calls` times under the profiler; returns (per-component ms per call, the `top` kernels of each
    component as [(kernel name, ms per call)], total device ms per call, each component's kernel kinds (`family`)
    as [(kind, ms per call)], largest first)."""
    import jax

    trace_dir = trace_dir or tempfile.mkdtemp(prefix="dsjax_trace_")
    jax.block_until_ready(call())
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    try:
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
    finally:
        jax.profiler.stop_trace()
    index = hlo_index(compiled.as_text())
    per = collections.defaultdict(float)
    kernels = collections.defaultdict(lambda: collections.defaultdict(float))
    families = collections.defaultdict(lambda: collections.defaultdict(float))
    for op, ms, kname in _device_events(trace_dir):
        if index[0].get(op, ("",))[0] in _CONTROL:
            continue
        comp = classify(op, index)
        per[comp] += ms / calls
        kernels[comp][f"{op} ({kname[:40]})"] += ms / calls
        families[comp][family(op, kname, index)] += ms / calls
    tops = {c: sorted(k.items(), key=lambda kv: -kv[1])[:top] for c, k in kernels.items()}
    fams = {c: sorted(k.items(), key=lambda kv: -kv[1]) for c, k in families.items()}
    return dict(per), tops, sum(per.values()), fams


def family(op: str, kname: str, index) -> str:
    """A kernel's kind, to sum its calls across layers: its name without numbers, and the innermost jitted
    function it runs in (the Pallas kernels run under jit in pallas_kernels: _gpu_gmm, _gpu_tgmm, quantize_tiles_t,
    ...), which tells apart the GEMMs that share one Mosaic kernel name."""
    name = re.sub(r"[._]*\d+", "", kname)[:48]
    jits = re.findall(r"jit\((\w+)\)", index[0].get(op, ("", "", None))[1])
    return f"{name} [{jits[-1]}]" if jits else name


def format_families(fams: dict, per: dict, comps: int = 6, rows: int = 8) -> str:
    """The largest components' kernel kinds, ms per step each."""
    out = []
    for comp, _ in sorted(per.items(), key=lambda kv: -kv[1])[:comps]:
        kinds = ", ".join(f"{name} {ms:.2f}" for name, ms in fams.get(comp, [])[:rows])
        out.append(f"  {comp}: {kinds}")
    return "\n".join(out)


def format_table(per: dict, total_ms: float, step_ms: float) -> str:
    rows = ["| component | ms / step | share of device time |", "|---|---|---|"]
    for comp, ms in sorted(per.items(), key=lambda kv: -kv[1]):
        rows.append(f"| {comp} | {ms:.2f} | {100 * ms / max(total_ms, 1e-9):.1f}% |")
    rows.append(f"| **sum of kernels** | {total_ms:.2f} | (step wall time {step_ms:.2f} ms) |")
    return "\n".join(rows)
