"""Smoke tests of experiments/pretrain.py."""

import io
import json
import os
import sys
from unittest import mock

from absl.testing import absltest
from absl.testing import flagsaver
import jax
import ml_collections
import numpy as np

import test_utils

_ROOT = test_utils.append_repo_root()
from experiments import launch  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import lm_model  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import pretraining  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = os.path.join(_ROOT, 'configs', 'pretrain.py')


class PretrainTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = test_utils.tmpdir(self)
    self.launcher = test_utils.import_launcher('experiments.pretrain')

  def run_main(self, *args):
    """Parses ``args`` as `app.run` would, then runs ``main([])``."""
    argv = ['pretrain.py', *args]
    with flagsaver.flagsaver(), mock.patch.object(sys, 'argv', argv):
      launch.parse_flags(argv)
      self.launcher.main([])

  def test_pretrains_saves_and_resumes(self):
    workdir = os.path.join(self.tmp, 'base')
    args = (f'--config={_CONFIG}:smoke', f'--workdir={workdir}',
            '--config.progress_bar=False', '--config.mesh=(1, 1)')
    self.run_main(*args)
    with open(os.path.join(workdir, lm_model.MODEL)) as f:
      model = json.load(f)
    self.assertEqual(model['d_model'], 32)
    self.assertEqual(model['domain'], 'code')
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
    self.assertEqual([r['step'] for r in records if r['split'] == 'val'], [0, 3, 6])
    val = [r['loss'] for r in records if r['split'] == 'val']
    self.assertLess(val[-1], val[0])  # it learns

    config = ml_collections.ConfigDict(model)
    params = lm_model.load_base(workdir, config)
    # A finished base is loaded, not trained again.
    with mock.patch.object(pretraining.trainer, 'train', side_effect=AssertionError):
      self.run_main(*args)
    for a, b in zip(jax.tree.leaves(params),
                    jax.tree.leaves(lm_model.load_base(workdir, config))):
      np.testing.assert_array_equal(a, b)

  def test_unknown_config_field(self):
    stderr = io.StringIO()
    with mock.patch.object(sys, 'stderr', stderr), self.assertRaises(SystemExit):
      self.run_main(f'--config={_CONFIG}', '--config.model.depth=4',
                    f'--workdir={self.tmp}')
    self.assertIn('depth', stderr.getvalue())


if __name__ == '__main__':
  absltest.main()
