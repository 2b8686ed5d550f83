"""The README's example runs as written, against the installed package."""

import os
import pathlib
import re
import tempfile

from absl.testing import absltest


def _readme() -> str:
  here = pathlib.Path(__file__).resolve().parent
  for candidate in (here.parent / "README.md", here / ".." / "README.md"):
    if candidate.exists():
      return candidate.read_text()
  raise FileNotFoundError("README.md next to xrapture_test/")


class ReadmeTest(absltest.TestCase):

  def test_example_runs_and_trains(self):
    text = _readme()
    section = text.split("## Example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
      os.chdir(tmp)
      try:
        exec(compile(code, "README.md example", "exec"), scope)  # pylint: disable=exec-used
        self.assertTrue(os.path.exists("adapter.safetensors"))
      finally:
        os.chdir(cwd)
    import jax  # pylint: disable=g-import-not-at-top
    import xrapture  # pylint: disable=g-import-not-at-top
    # The example's objects: the adapted kernels are LoraWeights, the merged
    # params are plain, and both compute the same function.
    params, merged, model, x = (scope[k] for k in ("params", "merged", "model", "x"))
    kinds = {type(v).__name__ for v in jax.tree.leaves(params, is_leaf=xrapture.is_implicit)}
    self.assertIn("LoraWeight", kinds)
    self.assertFalse(any(xrapture.is_implicit(v) for v in
                         jax.tree.leaves(merged, is_leaf=xrapture.is_implicit)))
    import haiku as hk  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    dense = hk.transform(scope["forward_fn"]).apply(merged, None, x)
    np.testing.assert_allclose(model.apply(params, None, x), dense, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
