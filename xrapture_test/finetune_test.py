"""Smoke tests of experiments/finetune.py, the README's main command."""

import io
import json
import os
import re
import sys
from unittest import mock

from absl import app
from absl.testing import absltest
from absl.testing import flagsaver
import ml_collections
import xrapture

import test_utils

_ROOT = test_utils.append_repo_root()
from configs import pretrain as pretrain_configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import launch  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import lm_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import lm_model  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import pretraining  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = os.path.join(_ROOT, 'configs', 'finetune.py')


class FinetuneTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = test_utils.tmpdir(self)
    self.launcher = test_utils.import_launcher('experiments.finetune')

  def run_main(self, *args):
    """Parses ``args`` as `app.run` would, then runs ``main([])``."""
    argv = ['finetune.py', *args]
    with flagsaver.flagsaver(), mock.patch.object(sys, 'argv', argv):
      launch.parse_flags(argv)
      self.launcher.main([])

  def assert_flag_error(self, *args, message):
    stderr = io.StringIO()
    with mock.patch.object(sys, 'stderr', stderr):
      with self.assertRaises(SystemExit):
        self.run_main(*args)
    self.assertRegex(stderr.getvalue(), message)

  def test_every_method_and_the_table(self):
    workdir = os.path.join(self.tmp, 'wd')
    self.run_main(f'--config={_CONFIG}:smoke', f'--workdir={workdir}',
                  '--config.progress_bar=False')
    with open(os.path.join(workdir, 'results.md')) as f:
      table = f.read()
    for row in ('base (no fine-tune)', 'LoRA r=4 (+ 1-D params)',
                'QLoRA NF4 + double quant, LoRA r=4 (+ 1-D params)', 'full fine-tune',
                'head-only'):
      self.assertRegex(table, rf'\n\| {re.escape(row)} \| \d\.\d{{3}} \|')
    with open(os.path.join(workdir, 'curves.png'), 'rb') as f:
      self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')
    for name in ('base/base.safetensors', 'base/model.json', 'config.json',
                 'lora/adapter.safetensors', 'qlora/adapter.safetensors',
                 'full/adapter.safetensors',
                 'head/adapter.safetensors', 'results.json'):
      self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)
    with open(os.path.join(workdir, 'lora', 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
    self.assertEqual([r['step'] for r in records if r['split'] == 'val'], [0, 3, 6])
    self.assertIn('tokens_per_s', records[-2])

    with open(os.path.join(workdir, 'results.json')) as f:
      results = {r['run']: r for r in json.load(f)}
    self.assertLess(results['lora']['trainable_params'],
                    results['full']['trainable_params'])
    self.assertLess(results['lora']['opt_state_bytes'],
                    results['full']['opt_state_bytes'])
    self.assertLess(results['lora']['adapter_bytes'], results['full']['adapter_bytes'])
    # QLoRA: the same adapters as LoRA, on a base held in 4 bits.
    self.assertEqual(results['qlora']['trainable_params'],
                     results['lora']['trainable_params'])
    self.assertLess(results['qlora']['param_bytes'], results['lora']['param_bytes'])
    # The adapter is an ordinary xrapture adapter file for the base.
    model_config = json.load(open(os.path.join(workdir, 'config.json')))['pretrain']['model']
    base = lm_model.load_base(os.path.join(workdir, 'base'),
                              ml_collections.ConfigDict(model_config))
    params = xrapture.load_adapter(os.path.join(workdir, 'lora', 'adapter.safetensors'), base)
    self.assertIsInstance(
        params['blocks/__layer_stack_no_per_layer/block/attn/value']['w'],
        xrapture.LoraWeight)

    # Rerunning with the same workdir finds every run finished.
    with mock.patch.object(lm_data, 'train_batch',
                           side_effect=AssertionError('trained again')):
      self.run_main(f'--config={_CONFIG}:smoke', f'--workdir={workdir}')
    with open(os.path.join(workdir, 'results.json')) as f:
      self.assertEqual({r['run']: r for r in json.load(f)}, results)

  def test_one_method(self):
    workdir = os.path.join(self.tmp, 'wd')
    stderr = io.StringIO()
    with mock.patch.object(sys, 'stderr', stderr):
      self.run_main(f'--config={_CONFIG}:head,smoke', f'--workdir={workdir}',
                    '--config.progress_bar=False', '--config.mesh=(1, 1)')
    # No bar, not even the base's pretraining one (tqdm writes to stderr).
    self.assertNotIn('it/s', stderr.getvalue())
    with open(os.path.join(workdir, 'results.json')) as f:
      self.assertEqual([r['run'] for r in json.load(f)], ['base', 'head'])
    self.assertFalse(os.path.exists(os.path.join(workdir, 'lora')))

  def test_unknown_config_field(self):
    self.assert_flag_error(f'--config={_CONFIG}:smoke', '--config.lora.rnak=4',
                           f'--workdir={self.tmp}',
                           message='--config.lora.rnak: no such config field.*"rank"')

  def test_config_value_of_the_wrong_type(self):
    self.assert_flag_error(f'--config={_CONFIG}:smoke', '--config.num_steps=many',
                           f'--workdir={self.tmp}', message='num_steps')

  def test_unknown_method(self):
    self.assert_flag_error(f'--config={_CONFIG}:lroa', f'--workdir={self.tmp}',
                           message='Bad config argument')

  def test_workdir_is_required(self):
    self.assert_flag_error(f'--config={_CONFIG}:smoke', message='workdir')

  def test_extra_arguments(self):
    with flagsaver.flagsaver(), mock.patch.object(sys, 'argv', ['finetune.py']):
      launch.parse_flags(['finetune.py', f'--config={_CONFIG}:smoke',
                          f'--workdir={self.tmp}'])
      with self.assertRaisesRegex(app.UsageError, 'Unexpected arguments'):
        self.launcher.main(['finetune.py', 'lora'])

  def test_unwritable_workdir(self):
    a_file = os.path.join(self.tmp, 'file')
    open(a_file, 'w').close()
    with self.assertRaisesRegex(app.UsageError, 'not a writable directory'):
      self.run_main(f'--config={_CONFIG}:smoke', f'--workdir={a_file}/wd')

  def test_impossible_mesh(self):
    with self.assertRaisesRegex(app.UsageError, 'mesh'):
      self.run_main(f'--config={_CONFIG}:smoke', f'--workdir={self.tmp}',
                    '--config.mesh=(3, 5)')

  def test_missing_base_checkpoint(self):
    with self.assertRaisesRegex(app.UsageError, 'No base model in /nonexistent'):
      self.run_main(f'--config={_CONFIG}:smoke', f'--workdir={self.tmp}',
                    '--config.base_checkpoint=/nonexistent')

  def test_base_of_another_architecture(self):
    base_dir = os.path.join(self.tmp, 'base')
    config = pretrain_configs.get_config('smoke')
    config.num_steps = 1
    config.progress_bar = False
    pretraining.run(config, base_dir, sharding.make_mesh((1, 1)))
    with self.assertRaisesRegex(app.UsageError,
                                'another architecture: d_model=32 there, 48 in the config'):
      self.run_main(f'--config={_CONFIG}:smoke', f'--workdir={self.tmp}/wd',
                    f'--config.base_checkpoint={base_dir}',
                    '--config.pretrain.model.d_model=48')

  def test_sequence_longer_than_the_model_takes(self):
    with self.assertRaisesRegex(app.UsageError, 'seq_len=64 exceeds'):
      self.run_main(f'--config={_CONFIG}:smoke', f'--workdir={self.tmp}',
                    '--config.seq_len=64')


if __name__ == '__main__':
  absltest.main()
