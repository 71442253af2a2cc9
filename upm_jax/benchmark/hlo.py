"""What an optimized XLA module does, read from its text (`compiled.as_text()`): the
collectives, host transfers, convolutions, copies and precisions of a compiled step, and
the FLOPs and bytes of an XLA:GPU executable, whose `cost_analysis()` is empty.

Used by the compile section of the benchmark (`benchmark/compile.py`) and its test; only
the standard library, plus JAX for `gpu_cost`.
"""
import collections
import dataclasses
import math
import re

# Bytes per element of the HLO element types that occur in these modules.
ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                 "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                 "c128": 16, "token": 0}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute", "collective-broadcast")
HOST_OPCODES = ("infeed", "outfeed", "send", "recv", "send-done", "recv-done")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$")


@dataclasses.dataclass
class Instruction:
    """One HLO instruction: result shape text, opcode, operand names, the text after them."""

    name: str
    shape: str
    opcode: str
    operands: list
    attrs: str
    computation: str


def arrays(shape):
    """[(element type, dims)] of a shape text, tuples flattened (layouts ignored)."""
    return [(t, tuple(int(d) for d in dims.split(",") if d))
            for t, dims, _ in _ARRAY.findall(shape) if t in ELEMENT_BYTES]


def shape_bytes(shape, *, skip_scratch=False):
    """Bytes of a (tuple) shape; `skip_scratch` drops a trailing u8 tuple element (the
    workspace of a cuDNN or cuBLAS call)."""
    parts = arrays(shape)
    if skip_scratch and len(parts) > 1 and parts[-1][0] == "u8":
        parts = parts[:-1]
    return sum(ELEMENT_BYTES[t] * math.prod(dims) for t, dims in parts)


def _closing(text, start):
    """Index after the bracket group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _operand_names(text):
    names, depth, current = [], 0, ""
    for ch in text + ",":
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            token = current.strip().split(" ")[-1]
            if token:
                names.append(token.lstrip("%"))
            current = ""
        else:
            current += ch
    return names


def parse(text):
    """{name: Instruction} of every computation of an HLO module text."""
    instructions, computation = {}, None
    for line in text.splitlines():
        header = _HEADER.match(line.strip())
        if header and " = " not in line.split("(")[0]:
            computation = header.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match or computation is None:
            continue
        name, rest = match.groups()
        if rest.startswith("("):
            end = _closing(rest, 0)
            shape, rest = rest[:end], rest[end:].lstrip()
        else:
            shape, _, rest = rest.partition(" ")
        call = re.match(r"([\w\-]+)\(", rest)
        if not call:
            continue
        end = _closing(rest, call.end() - 1)
        instructions[name] = Instruction(name, shape, call.group(1),
                                         _operand_names(rest[call.end():end - 1]),
                                         rest[end:], computation)
    return instructions


def _attr(attrs, key):
    match = re.search(key + r'="?([^",\s}]+)"?', attrs)
    return match.group(1) if match else None


def _fused(instructions):
    """Computations run inside another instruction (fusion bodies, reducers)."""
    return {m for i in instructions.values()
            for m in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", i.attrs)}


def summary(text):
    """A compiled module in numbers (see the keys): what the tests and the report check."""
    instructions = parse(text)
    fused = _fused(instructions)
    collectives = collections.defaultdict(lambda: {"count": 0, "bytes": 0, "shapes": []})
    host, custom_calls, convolutions, precision = (collections.Counter() for _ in range(4))
    top = collections.Counter()
    for ins in instructions.values():
        base = re.sub(r"-(start|done)$", "", ins.opcode)
        if base in COLLECTIVES:
            entry = collectives[base]
            if not ins.opcode.endswith("-done"):
                entry["count"] += 1
            if not ins.opcode.endswith("-start"):
                entry["bytes"] += shape_bytes(ins.shape)
                entry["shapes"].append(arrays(ins.shape))
        target = _attr(ins.attrs, "custom_call_target") or ""
        if ins.opcode in HOST_OPCODES:
            host[ins.opcode] += 1
        if ins.opcode == "custom-call":
            custom_calls[target] += 1
            if "callback" in target.lower() or "host" in target.lower():
                host["custom-call " + target] += 1
        if "S(5)" in ins.shape:   # XLA's host memory space
            host["host memory " + ins.opcode] += 1
        grouped = any(int(_attr(ins.attrs, k) or 1) > 1
                      for k in ("feature_group_count", "batch_group_count"))
        if ins.opcode == "convolution" or (ins.opcode == "custom-call" and "conv" in target):
            op_name = _attr(ins.attrs, "op_name") or ""
            kind = "dot" if "dot_general" in op_name else (
                "grouped convolution" if grouped else "convolution")
            convolutions[kind] += 1
        value = re.search(r"operand_precision=\{([^}]*)\}", ins.attrs)
        if value:
            precision[value.group(1).split(",")[0]] += 1
        if ins.computation not in fused:
            moved = ins.opcode in ("copy", "copy-start") and re.search(r"S\(\d+\)", ins.shape)
            top["memory-space copy" if moved else ins.opcode] += 1
    return {"instructions": len(instructions),
            "collectives": {k: dict(v) for k, v in sorted(collectives.items())},
            "host_transfers": dict(host), "custom_calls": dict(custom_calls),
            "convolutions": dict(convolutions), "operand_precision": dict(precision),
            # copies within device memory (relayouts), and into another memory space (TPU
            # prefetches into on-chip memory: expected, not a cost in HBM traffic)
            "copies": top["copy"] + top["copy-start"],
            "memory_space_copies": top["memory-space copy"],
            "transposes": top["transpose"], "fusions": top["fusion"]}


def gpu_cost(compiled, lowered, num_devices):
    """{"flops", "bytes accessed"} per device of an XLA:GPU executable.

    XLA's HloCostAnalysis (run through the CPU client: the CUDA one is compile-only here)
    counts each library call (cuDNN convolution, cuBLAS product) as -1. So the FLOPs are
    those of the module before optimisation (the computation the step asks for, divided
    evenly over the devices), and the bytes those of the optimized modules with every
    top-level custom call counted as its operands plus its results (without the workspace).
    """
    import jax  # noqa: PLC0415
    from jax._src.lib import _jax  # noqa: PLC0415  (XLA's cost analysis of an HloModule)

    client = jax.devices("cpu")[0].client
    unoptimized = _jax.hlo_module_cost_analysis(client, lowered.compiler_ir("hlo").as_hlo_module())
    total = 0.0
    for module in compiled.runtime_executable().hlo_modules():
        total += _jax.hlo_module_cost_analysis(client, module).get("bytes accessed", 0.0)
        instructions = parse(module.to_string())
        fused = _fused(instructions)
        for ins in instructions.values():
            if ins.opcode == "custom-call" and ins.computation not in fused:
                operands = sum(shape_bytes(instructions[o].shape) for o in ins.operands
                               if o in instructions)
                total += 1 + operands + shape_bytes(ins.shape, skip_scratch=True)
    return {"flops": unoptimized.get("flops", 0.0) / num_devices, "bytes accessed": total}
