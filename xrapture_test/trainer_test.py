"""Tests for experiments/trainer.py: resume, refusal of other settings, results."""

import glob
import json
import os
from unittest import mock

from absl import app
from absl.testing import absltest
import jax
import numpy as np
import safetensors.numpy

import test_utils

_ROOT = test_utils.append_repo_root()
from configs import finetune as finetune_configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import lm_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import lm_model  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import trainer  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import variants  # pylint: disable=g-import-not-at-top,wrong-import-position


def smoke_config(**overrides):
  """configs/finetune.py:smoke (a tiny model, a few steps), with ``overrides``."""
  config = finetune_configs.get_config('smoke')
  config.update_from_flattened_dict({'progress_bar': False, **overrides})
  return config


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


class TrainerTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = test_utils.tmpdir(self)
    # Checkpoints at 3 and 6, logs at 4 and 8: resuming at 6 starts mid-window.
    self.config = smoke_config(num_steps=8, eval_every=4, log_every=4)
    self.base = lm_model.init_params(self.config.pretrain.model, 0)
    self.forward = lm_model.make_forward(self.config.pretrain.model)
    self.data = lm_data.load('docs')
    self.mesh = sharding.make_mesh((1, 1))

  def train(self, workdir, method='lora', config=None):
    config = config or self.config
    run = variants.METHODS[method](config, self.forward, self.base)
    return trainer.train(run, self.data, config, workdir, self.mesh)

  def test_resume_after_a_crash_matches_an_uninterrupted_run(self):
    straight = os.path.join(self.tmp, 'straight')
    want = self.train(straight)

    crashed = os.path.join(self.tmp, 'crashed')
    real_batch = lm_data.train_batch

    def dies_at_step_7(data, seed, step, *args):
      if step == 7:
        raise KeyboardInterrupt('killed')
      return real_batch(data, seed, step, *args)
    with mock.patch.object(lm_data, 'train_batch', dies_at_step_7):
      with self.assertRaises(KeyboardInterrupt):
        self.train(crashed)
    ckpts = os.path.join(crashed, 'checkpoints')
    self.assertEqual(sorted(os.listdir(ckpts)), ['3', '6'])
    self.assertFalse(os.path.exists(os.path.join(crashed, trainer.RESULT)))
    # What a power loss and kills can leave: a newest checkpoint with
    # truncated files, a partial last line in the metrics, a temporary file.
    for path in glob.glob(os.path.join(ckpts, '6', '**'), recursive=True):
      if os.path.isfile(path):
        os.truncate(path, os.path.getsize(path) // 2)
    with open(os.path.join(crashed, trainer.METRICS), 'a') as f:
      f.write('{"run": "lora", "step": 7, "spl')
    open(os.path.join(crashed, '.tmp-result.json-x1'), 'w').close()

    with self.assertLogs(level='WARNING') as logs:
      got = self.train(crashed)  # resumes from step 3: 6 does not read back
    self.assertRegex('\n'.join(logs.output), 'checkpoints/6 does not read back')
    self.assertNotIn('.tmp-result.json-x1', os.listdir(crashed))
    for key in ('val_bpb', 'test_bpb', 'trainable_params', 'opt_state_bytes'):
      self.assertEqual(got[key], want[key], key)
    with open(os.path.join(straight, 'adapter.safetensors'), 'rb') as f:
      want_tensors = safetensors.numpy.load(f.read())
    with open(os.path.join(crashed, 'adapter.safetensors'), 'rb') as f:
      got_tensors = safetensors.numpy.load(f.read())
    self.assertCountEqual(got_tensors, want_tensors)
    for name in want_tensors:
      np.testing.assert_array_equal(got_tensors[name], want_tensors[name], name)

    def losses(workdir):
      return [(r['step'], r['split'], r['loss'])
              for r in read_jsonl(os.path.join(workdir, trainer.METRICS))]
    # Records the crashed run wrote after step 6 were dropped and rewritten.
    self.assertEqual(losses(crashed), losses(straight))

  def test_killed_before_the_first_checkpoint_then_finished(self):
    workdir = os.path.join(self.tmp, 'run')
    with mock.patch.object(lm_data, 'train_batch', side_effect=KeyboardInterrupt):
      with self.assertRaises(KeyboardInterrupt):
        self.train(workdir, 'head')
    self.assertEqual([(r['step'], r['split']) for r in
                      read_jsonl(os.path.join(workdir, trainer.METRICS))], [(0, 'val')])
    first = self.train(workdir, 'head')
    # Starting again from step 0 did not repeat the step-0 record.
    self.assertEqual([(r['step'], r['split']) for r in
                      read_jsonl(os.path.join(workdir, trainer.METRICS))],
                     [(0, 'val'), (4, 'train'), (4, 'val'), (8, 'train'), (8, 'val')])
    # A finished run is not trained again.
    with mock.patch.object(lm_data, 'train_batch', side_effect=AssertionError):
      self.assertEqual(self.train(workdir, 'head'), first)

  def test_other_settings_or_another_base_are_refused(self):
    workdir = os.path.join(self.tmp, 'run')
    self.train(workdir, 'head')
    with self.assertRaisesRegex(app.UsageError, r'learning_rate: 0\.01 there, 0\.1 now'):
      self.train(workdir, 'head', smoke_config(num_steps=8, eval_every=4,
                                            **{'learning_rate.head': 0.1}))
    # The same architecture, one number of the base changed.
    other = jax.tree.map(np.array, self.base)
    other['ln_f']['scale'][0] += 1e-3
    run = variants.METHODS['head'](self.config, self.forward, other)
    with self.assertRaisesRegex(app.UsageError, 'trained from another base: its params '
                                'hash to sha256:[0-9a-f]{64} there, sha256:[0-9a-f]{64} now'):
      trainer.train(run, self.data, self.config, workdir, self.mesh)

  def test_result_counts_what_trains(self):
    result = self.train(os.path.join(self.tmp, 'run'))
    d, layers, mlp, rank, vocab = 32, 2, 64, 4, 256
    # Adapters on query/key/value/linear (d×d) and both MLP kernels, per
    # layer, on the token embedding and the head; every 1-D parameter
    # (config.lora.tune_vectors) in full: per layer two LayerNorms' scales
    # and offsets and the biases of the four projections and the MLP, then
    # the final LayerNorm and the head's bias.
    adapters = (layers * rank * (4 * (d + d) + (d + mlp) + (mlp + d))
                + rank * (vocab + d) + rank * (d + vocab))
    vectors = layers * (2 * 2 * d + 4 * d + mlp + d) + 2 * d + vocab
    want = adapters + vectors
    self.assertEqual(result['trainable_params'], want)
    # Adam's two moments per trainable number, plus a few step counters.
    self.assertBetween(result['opt_state_bytes'], 8 * want, 8 * want + 64)
    self.assertBetween(result['val_bpb'], 1.0, 12.0)
    self.assertGreater(result['adapter_bytes'], 4 * want)
    self.assertGreater(result['step_time_s'], 0)


if __name__ == '__main__':
  absltest.main()
