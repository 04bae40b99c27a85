"""The mutation kit's anchors exist in today's sources (the kit itself is not
run in CI: see tests/mutation/kit.py)."""

import importlib.util
import os

_KIT = os.path.join(os.path.dirname(__file__), "mutation", "kit.py")


def _kit():
  spec = importlib.util.spec_from_file_location("jga_mutation_kit", _KIT)
  module = importlib.util.module_from_spec(spec)
  import sys
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def test_every_mutant_anchor_is_in_the_sources():
  kit = _kit()
  assert kit.check_anchors() == []
  kinds = {m.kind for m in kit.MUTANTS}
  assert {"logic", "precision", "mask", "offset"} <= kinds
  # A mutant must change something and name where it should be caught.
  for m in kit.MUTANTS:
    assert m.anchor != m.replacement and m.tests, m.name


def test_a_missing_anchor_is_an_error(tmp_path):
  kit = _kit()
  m = kit.MUTANTS[0]
  (tmp_path / os.path.dirname(m.path)).mkdir(parents=True)
  (tmp_path / m.path).write_text("nothing to see here\n")
  assert kit.check_anchors(str(tmp_path), [m]) and "found 0 times" in kit.check_anchors(
      str(tmp_path), [m])[0]
