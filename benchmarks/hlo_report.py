"""What a compiled step launches and what its forward pass keeps for its backward pass, from XLA's optimized HLO.

    XLA_FLAGS="--xla_dump_to=DUMP --xla_dump_hlo_as_text" python benchmarks/train_step.py --res 256 \
        --models DiG-S/2 --variants pallas --steps 3
    python benchmarks/hlo_report.py DUMP/*jit_multi_step*after_optimizations.txt

No device needed to read a dump (`jax.jit(f).lower(...).compile().as_text()` gives the same text). Three tables:
  kernels    what one run of the program launches: the instructions of the entry computation and of the
             computations it runs (while-loop bodies, calls, conditional branches), by kind: fusions by XLA's
             fusion kind, library calls by custom-call target (Pallas kernels are "__gpu$xla.gpu.triton"),
             other instructions by opcode;
  passes     the same kernels by pass: forward (op_name under jvp), backward (under transpose), and the update
             outside differentiation (optimizer, EMA, metrics), whose count grows with the number of parameter
             arrays; the update's kernels by jax op;
  residuals  forward-pass values the backward pass reads: arrays made by instructions whose op_name is under
             jvp(...) and read by instructions under transpose(...), i.e. what stays alive from one pass to the
             other, grouped by the jax op that made them and shape, in MiB. A tuple output counts only the elements
             that are read (a cuBLAS call's workspace is not), and bitcasts count as the array they view.
With --kernels NAME,... (kernel names as a profile lists them, e.g. `loop_convert_fusion_27`, which is the HLO
instruction %loop_convert_fusion.27 of the same compile) a fourth table says what each of them computes: its
shape, the jax ops fused into it and the source lines they come from (the module's stack frames):
    python benchmarks/hlo_report.py DUMP/*jit_multi_step*after_optimizations.txt --kernels loop_convert_fusion_27
"""

import argparse
import collections
import re

# Instructions that launch nothing of their own.
_NOT_KERNELS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
                "after-all", "partition-id", "replica-id"}
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}
_CALLED = re.compile(r"\b(?:condition|body|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")

Instruction = collections.namedtuple("Instruction", "name shape opcode operands op_name attributes")


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at text[start]."""
    depth = 0
    for index in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return index
    raise ValueError(f"unbalanced parentheses from column {start}: {text[start:start + 80]!r}")


def _instruction(line: str) -> Instruction | None:
    match = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = ", line)
    if not match:
        return None
    rest = line[match.end():]
    shape_end = _closing(rest, 0) + 1 if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:shape_end], rest[shape_end:].lstrip()
    opcode = re.match(r"[\w\-]+", rest).group(0)
    operands_end = _closing(rest, len(opcode))
    references = re.findall(r"%([\w.\-]+?)(?:#(\d+))?(?=[,)\s]|$)", rest[len(opcode):operands_end + 1])
    operands = [(name, int(index) if index else None) for name, index in references]
    op_name = re.search(r'op_name="([^"]*)"', rest)
    return Instruction(match.group(1), shape, opcode, operands, op_name.group(1) if op_name else "",
                       rest[operands_end + 1:])


def parse(hlo_text: str) -> tuple[dict, str]:
    """({computation name: [Instruction]}, entry computation name) of an HLO module's text."""
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        header = re.match(r"(ENTRY )?%([\w.\-]+) .*\{\s*$", line)
        if header:
            current = computations.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
        elif current is not None and (instruction := _instruction(line)):
            current.append(instruction)
    if entry is None:
        raise ValueError("no ENTRY computation: is this an HLO module's text?")
    return computations, entry


def executed(computations: dict, entry: str) -> list[Instruction]:
    """The instructions of the entry computation and of every computation it runs as control flow, in order.
    Fusion bodies and reducers are not included: their fusion or reduce instruction stands for them."""
    seen, order = set(), []

    def walk(name):
        if name in seen or name not in computations:
            return
        seen.add(name)
        for instruction in computations[name]:
            order.append(instruction)
            if instruction.opcode in ("while", "call", "conditional"):
                called = _CALLED.findall(instruction.attributes)
                for branches in _BRANCHES.findall(instruction.attributes):
                    called += re.findall(r"%([\w.\-]+)", branches)
                for callee in called:
                    walk(callee)

    walk(entry)
    return order


def kernel_kind(instruction: Instruction) -> str | None:
    if instruction.opcode in _NOT_KERNELS:
        return None
    if instruction.opcode == "fusion":
        kind = re.search(r"kind=(\w+)", instruction.attributes)
        return f"fusion {kind.group(1) if kind else '?'}"
    if instruction.opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', instruction.attributes)
        return target.group(1) if target else "custom-call"
    return instruction.opcode


def _element_shapes(shape: str) -> list[str]:
    return re.findall(r"\w+\[[\d,]*\]", shape)


def _mib(array_shape: str) -> float:
    dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", array_shape).groups()
    count = 1
    for dim in filter(None, dims.split(",")):
        count *= int(dim)
    return count * _BYTES.get(dtype, 0) / 2 ** 20


def kernel_counts(instructions: list[Instruction]) -> collections.Counter:
    return collections.Counter(kind for kind in map(kernel_kind, instructions) if kind)


def kernels_by_pass(instructions: list[Instruction]) -> collections.Counter:
    """{(pass, jax op): kernels}: "backward" for op_names under transpose(...), "forward" under jvp(...), "update"
    for the rest (optimizer, EMA, metrics: whatever runs outside differentiation); the op is the op_name's last
    component (the jax primitive XLA names the kernel after)."""
    counts = collections.Counter()
    for instruction in instructions:
        if kernel_kind(instruction) is None:
            continue
        op_name = instruction.op_name
        step = "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "update"
        counts[(step, op_name.rsplit("/", 1)[-1] or "?")] += 1
    return counts


def forward_residuals(instructions: list[Instruction]) -> dict:
    """{(making op, array shape): (count, MiB)} of forward values read by the backward pass."""
    by_name = {instruction.name: instruction for instruction in instructions}

    def source(name, index):  # a bitcast is its operand's buffer
        while name in by_name and by_name[name].opcode == "bitcast" and by_name[name].operands:
            name, index = by_name[name].operands[0]
        return name, index

    kept, totals = set(), collections.defaultdict(lambda: [0, 0.0])
    for reader in instructions:
        if "transpose(" not in reader.op_name:
            continue
        for name, index in map(lambda operand: source(*operand), reader.operands):
            maker = by_name.get(name)
            if maker is None or "jvp(" not in maker.op_name or "transpose(" in maker.op_name or (name, index) in kept:
                continue
            kept.add((name, index))
            shapes = _element_shapes(maker.shape)
            array = shapes[index] if index is not None and index < len(shapes) else shapes[0]
            key = (maker.op_name.rsplit("/", 1)[-1], array)
            totals[key][0] += 1
            totals[key][1] += _mib(array)
    return {key: tuple(value) for key, value in sorted(totals.items(), key=lambda item: -item[1][1])}


def source_frames(hlo_text: str) -> dict[int, str]:
    """{stack_frame_id: "dir/file.py:line (function)"} of the innermost frame of each stack frame in the module's
    FileNames / FunctionNames / FileLocations / StackFrames tables (paths cut to their last two components)."""
    tables, current = collections.defaultdict(dict), None
    for line in hlo_text.split("\n%", 1)[0].splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = line
        elif current and (row := re.match(r"(\d+) (.*)", line)):
            tables[current][int(row.group(1))] = row.group(2)
    locations = {}
    for index, text in tables["FileLocations"].items():
        fields = dict(re.findall(r"(\w+)=(\d+)", text))
        path = tables["FileNames"].get(int(fields["file_name_id"]), "?").strip('"')
        function = tables["FunctionNames"].get(int(fields["function_name_id"]), "?").strip('"')
        locations[index] = f"{'/'.join(path.split('/')[-2:])}:{fields['line']} ({function})"
    return {index: locations.get(int(re.search(r"file_location_id=(\d+)", text).group(1)), "?")
            for index, text in tables["StackFrames"].items()}


def kernel_sources(hlo_text: str, kernel_names: list[str]) -> str:
    """Markdown: per kernel name of a profile (`name_N` is the instruction %name.N), its shape, the jax ops in it
    (its fused computation's op_names, last component) and their source lines."""
    computations, _ = parse(hlo_text)
    by_name = {instruction.name: instruction for body in computations.values() for instruction in body}
    frames = source_frames(hlo_text)
    lines = ["| kernel | instruction | shape | jax ops | source lines |", "|---|---|---|---|---|"]
    for kernel in kernel_names:
        name = next((n for n in (kernel, re.sub(r"_(\d+)$", r".\1", kernel)) if n in by_name), None)
        if name is None:
            lines.append(f"| {kernel} | not in this module | | | |")
            continue
        instruction = by_name[name]
        called = re.search(r"calls=%([\w.\-]+)", instruction.attributes)
        body = computations.get(called.group(1), []) if called else []
        inside = [instruction] + body
        ops = sorted({i.op_name.rsplit("/", 1)[-1] for i in inside if i.op_name})
        frame_ids = (re.search(r"stack_frame_id=(\d+)", i.attributes) for i in inside)
        sources = sorted({frames[int(f.group(1))] for f in frame_ids if f and int(f.group(1)) in frames})
        lines.append(f"| {kernel} | {name} | {instruction.shape} | {', '.join(ops)} | {'; '.join(sources)} |")
    return "\n".join(lines)


def report(hlo_text: str, title: str, top: int = 30) -> str:
    """Markdown: kernels by kind, kernels by pass (and the update's by op), then the largest forward values kept
    for the backward pass."""
    instructions = executed(*parse(hlo_text))
    counts = kernel_counts(instructions)
    by_pass = kernels_by_pass(instructions)
    residuals = forward_residuals(instructions)
    lines = [f"{title}: {sum(counts.values())} kernels per run, forward values read by the backward pass "
             f"{sum(mib for _, mib in residuals.values()):.1f} MiB", "", "| kernel kind | count |", "|---|---|"]
    lines += [f"| {kind} | {count} |" for kind, count in counts.most_common()]
    passes = collections.Counter()
    for (step, _), count in by_pass.items():
        passes[step] += count
    lines += ["", "| pass | kernels | of which, by jax op (update only) |", "|---|---|---|"]
    for step in ("forward", "backward", "update"):
        ops = ", ".join(f"{op} {count}" for (name, op), count in by_pass.most_common() if name == step)
        lines.append(f"| {step} | {passes[step]} | {ops if step == 'update' else ''} |")
    lines += ["", "| made by | array | count | MiB |", "|---|---|---|---|"]
    lines += [f"| {op} | {array} | {count} | {mib:.1f} |"
              for (op, array), (count, mib) in list(residuals.items())[:top]]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dumps", nargs="+", help="optimized HLO text files (*after_optimizations.txt)")
    parser.add_argument("--top", type=int, default=30, help="residual groups to list")
    parser.add_argument("--kernels", default="", help="comma list of kernel names from a profile to look up")
    args = parser.parse_args()
    for path in args.dumps:
        with open(path) as f:
            text = f.read()
        print(report(text, path, args.top) + "\n")
        if args.kernels:
            print(kernel_sources(text, args.kernels.split(",")) + "\n")


if __name__ == "__main__":
    main()
