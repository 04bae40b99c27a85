"""Does each collective run concurrently with the attention kernels? Read the scheduled HLO.

  python -m benchmarks.hlo_overlap FILE [FILE ...]   # compiled.as_text() or an XLA dump's
                                                     # *after_optimizations.txt

An optimized module is scheduled: inside each computation the instructions
are listed in execution order. For every collective this reports

  async        a start/done pair (collective-permute-start ... -done); a
               synchronous collective (CPU) blocks the stream and cannot overlap
  bracketed    heavy ops (kernel custom-calls, conditionals/calls/fusions that
               contain one, dots) scheduled between its start and done: these
               run while the transfer is in flight (GPU: on another stream)
  independent  heavy ops in the same computation that neither feed it nor use
               its result: what a latency-hiding scheduler COULD overlap
  waits        whether it needs a heavy op's result (then it can only overlap
               with a later one)

On CPU only the dependency columns mean something (collectives are
synchronous there); the GPU module says what the scheduler actually did.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import sys

COLLECTIVES = ("collective-permute", "all-gather", "all-reduce", "reduce-scatter",
               "all-to-all", "collective-broadcast", "send", "recv")
HEAVY_OPCODES = ("custom-call", "dot", "convolution")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations|"
                    r"true_computation|false_computation)=\{?([^}]*?)\}?(?:,\s*\w+=|$)")


@dataclasses.dataclass
class Instr:
  name: str
  opcode: str
  operands: list
  called: list
  text: str


def _skip_type(rest: str) -> str:
  """Drops the leading result type ("f32[1,2]{1,0}" or a parenthesised tuple)."""
  rest = rest.lstrip()
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[i + 1:].lstrip()
  return rest.split(" ", 1)[1] if " " in rest else ""


def _parse_instr(line: str) -> Instr | None:
  m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
  if not m:
    return None
  name, rest = m.group(1), _skip_type(m.group(2))
  om = re.match(r"([a-z][\w\-]*)\((.*)$", rest)
  if not om:
    return None
  opcode, tail = om.group(1), om.group(2)
  depth, end = 1, len(tail)
  for i, ch in enumerate(tail):
    depth += (ch == "(") - (ch == ")")
    if depth == 0:
      end = i
      break
  args, attrs = tail[:end], tail[end + 1:]
  operands = re.findall(r"%([\w.\-]+)", args)
  if not operands and args.strip():   # HLO text without % sigils
    operands = [a.strip().split(" ")[-1] for a in args.split(",") if a.strip()]
  called = []
  for group in re.findall(r"(?:calls|to_apply|body|condition|branch_computations)="
                          r"(\{[^}]*\}|%?[\w.\-]+)", attrs):
    called += [c.strip().lstrip("%") for c in group.strip("{}").split(",") if c.strip()]
  return Instr(name, opcode, operands, called, line.strip())


def parse_module(text: str) -> dict[str, list[Instr]]:
  """Computation name -> its instructions in (scheduled) order."""
  comps, current = {}, None
  for line in text.splitlines():
    if not line.strip():
      continue
    if not line[0].isspace() and line.rstrip().endswith("{"):
      head = line.split("(", 1)[0].replace("ENTRY", "").strip().lstrip("%")
      current = comps.setdefault(head, [])
      continue
    if line.strip() == "}":
      current = None
      continue
    if current is not None:
      ins = _parse_instr(line)
      if ins is not None:
        current.append(ins)
  return comps


def _heavy_computations(comps) -> set:
  """Computations that (transitively) contain a kernel or a dot."""
  heavy = {c for c, body in comps.items() if any(i.opcode in HEAVY_OPCODES for i in body)}
  changed = True
  while changed:
    changed = False
    for c, body in comps.items():
      if c not in heavy and any(x in heavy for i in body for x in i.called):
        heavy.add(c)
        changed = True
  return heavy


def _collective_kind(ins: Instr, comps) -> str | None:
  op = ins.opcode
  for kind in COLLECTIVES:
    if op in (kind, f"{kind}-start"):
      return kind
  if op == "async-start":   # wrapped collectives (reduce-scatter, all-to-all, ...)
    for c in ins.called:
      for inner in comps.get(c, []):
        if inner.opcode in COLLECTIVES:
          return inner.opcode
  return None


def analyze(text: str) -> list[dict]:
  """One record per collective in the module (see the module docstring)."""
  comps = parse_module(text)
  heavy_comps = _heavy_computations(comps)
  records = []
  for cname, body in comps.items():
    index = {i.name: n for n, i in enumerate(body)}
    is_heavy = [i.opcode in HEAVY_OPCODES or any(c in heavy_comps for c in i.called)
                for i in body]
    users = collections.defaultdict(list)
    for n, i in enumerate(body):
      for o in i.operands:
        if o in index:
          users[index[o]].append(n)

    def closure(start, step):
      seen, todo = set(), [start]
      while todo:
        n = todo.pop()
        for m in step(n):
          if m not in seen:
            seen.add(m)
            todo.append(m)
      return seen

    ancestors = lambda n: closure(n, lambda k: [index[o] for o in body[k].operands if o in index])
    descendants = lambda n: closure(n, lambda k: users[k])
    for n, ins in enumerate(body):
      kind = _collective_kind(ins, comps)
      if kind is None or ins.opcode.endswith("-done"):
        continue
      is_async = ins.opcode.endswith("-start")
      done = next((m for m in users[n] if body[m].opcode.endswith("-done")), n) if is_async else n
      before, after = ancestors(n), descendants(done)
      heavy = [m for m in range(len(body)) if is_heavy[m]]
      records.append({
          "computation": cname, "name": ins.name, "kind": kind, "async": is_async,
          "bracketed": [body[m].name for m in heavy if n < m < done],
          "independent": [body[m].name for m in heavy
                          if m not in before and m not in after and m not in (n, done)],
          "waits_on_heavy": any(m in before for m in heavy),
      })
  return records


def summarize(records: list[dict]) -> dict:
  """Counts per collective kind: total, async, overlapped (>= 1 bracketed heavy
  op), could overlap (>= 1 independent heavy op), waits on a heavy op."""
  out = {}
  for r in records:
    s = out.setdefault(r["kind"], dict(total=0, is_async=0, overlapped=0, could_overlap=0,
                                       waits_on_heavy=0))
    s["total"] += 1
    s["is_async"] += r["async"]
    s["overlapped"] += bool(r["bracketed"])
    s["could_overlap"] += bool(r["independent"])
    s["waits_on_heavy"] += r["waits_on_heavy"]
  return out


def report_lines(records: list[dict]) -> list[str]:
  lines = ["| computation | collective | kind | async | bracketed heavy ops | "
           "independent heavy ops | waits on heavy |", "|---|---|---|---|---|---|---|"]
  for r in records:
    lines.append(f"| {r['computation']} | {r['name']} | {r['kind']} | {r['async']} | "
                 f"{len(r['bracketed'])} | {len(r['independent'])} | {r['waits_on_heavy']} |")
  return lines


def main(argv=None) -> int:
  paths = sys.argv[1:] if argv is None else argv
  if not paths:
    print(__doc__)
    return 2
  for path in paths:
    with open(path) as f:
      records = analyze(f.read())
    print(f"## {path}\n")
    print("\n".join(report_lines(records)))
    print(f"\nsummary: {summarize(records)}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
