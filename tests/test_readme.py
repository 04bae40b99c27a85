"""README.md's Python blocks run as written.

Every ```python block is extracted. Unmarked blocks run in README order as
ONE script (later blocks use the names of earlier ones, as a reader would),
in a subprocess on CPU with 8 host devices. A block whose first line is
``# requires: gpu`` is self-contained and runs instead in the GPU test (with
the other marked blocks, in order), skipped without a GPU. Tracebacks point
at README.md's own line numbers.

Run the blocks by hand: ``python tests/test_readme.py cpu`` (or ``gpu``).
"""

import os
import re
import subprocess
import sys
import time

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
GPU_MARK = "# requires: gpu"
TIMEOUT_S = 240


def python_blocks(path=README):
  """[(first line number of the code, source, requires_gpu)] of the ```python blocks."""
  text = open(path, encoding="utf-8").read()
  blocks = []
  for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S):
    line = text.count("\n", 0, m.start(1)) + 1
    source = m.group(1)
    first = source.lstrip().splitlines()[0].strip() if source.strip() else ""
    blocks.append((line, source, first == GPU_MARK))
  return blocks


def run_blocks(kind: str, path=README) -> None:
  """Executes the ``kind`` ("cpu" or "gpu") blocks in order in one namespace."""
  namespace = {"__name__": "__readme__"}
  for line, source, gpu in python_blocks(path):
    if gpu != (kind == "gpu"):
      continue
    t0 = time.perf_counter()
    code = compile("\n" * (line - 1) + source, path, "exec")   # README line numbers
    exec(code, namespace)   # noqa: S102 -- the README's own code
    print(f"README.md:{line}: ok ({time.perf_counter() - t0:.1f} s)", flush=True)


def _run_in_subprocess(kind: str, env: dict) -> None:
  t0 = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), kind], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"README {kind} blocks took over {TIMEOUT_S} s:\n{e.stdout}\n{e.stderr}")
  log = (proc.stdout + proc.stderr)[-6000:]
  assert proc.returncode == 0, f"README {kind} blocks failed (rc={proc.returncode}):\n{log}"
  print(f"README {kind} blocks: {time.perf_counter() - t0:.1f} s\n{proc.stdout}")


def test_readme_blocks_are_found_and_compile():
  blocks = python_blocks()
  assert sum(not gpu for _, _, gpu in blocks) >= 4, [line for line, _, _ in blocks]
  assert any(gpu for _, _, gpu in blocks)
  for line, source, _ in blocks:
    compile("\n" * (line - 1) + source, README, "exec")   # SyntaxError names the line
  # A block in no language or another one is not run: keep shell out of python.
  text = open(README, encoding="utf-8").read()
  for m in re.finditer(r"^```python[ \t]*\n(.*?)^```", text, re.M | re.S):
    assert not re.search(r"^\s*(pip|python|bash) ", m.group(1), re.M), (
        f"README.md:{text.count(chr(10), 0, m.start()) + 1}: a shell command in a python block")


def _cpu_env(env) -> dict:
  """``env`` with JAX on CPU and 8 host devices."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  return dict(env, JAX_PLATFORMS="cpu",
              XLA_FLAGS=(flags + " --xla_force_host_platform_device_count=8").strip())


def test_readme_python_blocks_run_on_cpu():
  _run_in_subprocess("cpu", _cpu_env(os.environ))


@pytest.mark.gpu
def test_readme_gpu_blocks_run_on_gpu():
  _run_in_subprocess("gpu", dict(os.environ))


if __name__ == "__main__":
  if len(sys.argv) != 2 or sys.argv[1] not in ("cpu", "gpu"):
    sys.exit(f"usage: {sys.argv[0]} cpu|gpu")
  if sys.argv[1] == "cpu":   # before JAX starts (the blocks import it)
    os.environ.update(_cpu_env(os.environ))
  run_blocks(sys.argv[1])
