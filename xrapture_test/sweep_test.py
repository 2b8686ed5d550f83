"""Tests of the sweep job: experiments/sweeping.py, sweep_report.py, tools/sweep_readme.py."""

import contextlib
import io
import json
import os
from unittest import mock

from absl import app
from absl.testing import absltest
import xrapture

import test_utils

_ROOT = test_utils.append_repo_root('tools')
from configs import sweep as sweep_configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import launch  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import lm_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import lm_model  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import sweep_report  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import sweeping  # pylint: disable=g-import-not-at-top,wrong-import-position
import sweep_readme  # pylint: disable=g-import-not-at-top,wrong-import-position


def stages(*stages):
  return tuple(sweep_configs.stage(*s) for s in stages)


class SweepRunTest(absltest.TestCase):
  """The smoke sweep, trained for real (a tiny model, a few steps)."""

  def test_smoke_sweep_and_rerun(self):
    tmp = test_utils.tmpdir(self)
    workdir = os.path.join(tmp, 'sweep')
    config = sweep_configs.get_config('smoke')
    config.progress_bar = config.pretrain.progress_bar = False
    # The smoke config's two points, and one on a field that does not exist yet.
    config.optional_fields = ('lora.not_yet',)
    config.stages = config.stages + stages(('later', 'best', ('lora.not_yet', (True,))))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
      record = launch.main(config, workdir)
    # 'later' starts from the best point: the skipped point carries its overrides.
    skipped = ('lr=0.03,lora.not_yet=on' if record['best'] == 'lr=0.03'
               else 'lora.not_yet=on')
    self.assertIn(f"Sweep: skipping point {skipped} of stage 'later'", stdout.getvalue())
    self.assertEqual([r['name'] for r in record['points']], ['default', 'lr=0.03'])
    self.assertEqual([r['name'] for r in record['skipped']], [skipped])

    with open(os.path.join(workdir, sweep_report.SWEEP_JSON)) as f:
      saved = json.load(f)
    self.assertEqual(saved, json.loads(json.dumps(record)))
    full, = saved['full']
    base = saved['base']['val_bpb']
    for row in saved['points']:
      # The row holds what the point's own run wrote.
      with open(os.path.join(workdir, 'points', row['name'], 'result.json')) as f:
        result = json.load(f)
      self.assertEqual(row['val_bpb'], result['val_bpb'])
      self.assertAlmostEqual(row['share_of_full_gain'],
                             (base - result['val_bpb']) / (base - full['val_bpb']))
      self.assertEqual(row['within_budget'],
                       result['trainable_params'] <= 0.5 * full['trainable_params'])
    # The override reached the run: the two points trained with their own rates.
    with open(os.path.join(workdir, 'points', 'lr=0.03', 'fingerprint.json')) as f:
      self.assertEqual(json.load(f)['learning_rate'], 0.03)
    with open(os.path.join(workdir, 'points', 'default', 'fingerprint.json')) as f:
      self.assertEqual(json.load(f)['learning_rate'], 0.01)
    self.assertNotEqual(saved['points'][0]['val_bpb'], saved['points'][1]['val_bpb'])
    # The best is the lowest val bits/byte within the budget.
    fits = [r for r in saved['points'] if r['within_budget']]
    self.assertEqual(saved['best'], min(fits, key=lambda r: r['val_bpb'])['name'])
    # Every point's adapter is an ordinary adapter file for the sweep's base.
    base_params = lm_model.load_base(os.path.join(workdir, 'base'), config.pretrain.model)
    params = xrapture.load_adapter(
        os.path.join(workdir, 'points', 'default', 'adapter.safetensors'), base_params)
    self.assertIsInstance(
        params['blocks/__layer_stack_no_per_layer/block/mlp/~/linear_0']['w'],
        xrapture.LoraWeight)

    with open(os.path.join(workdir, sweep_report.SWEEP_MD)) as f:
      table = f.read()
    for row in ('| base (no fine-tune) |', '| full fine-tune (default) |', 'LoRA default',
                'LoRA lr=0.03',
                f'| LoRA {skipped} | later | skipped: the config has no field lora.not_yet'):
      self.assertIn(row, table)
    with open(os.path.join(workdir, sweep_report.SWEEP_PNG), 'rb') as f:
      self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')

    # A rerun trains nothing and reports the same.
    with mock.patch.object(lm_data, 'train_batch',
                           side_effect=AssertionError('trained again')):
      with contextlib.redirect_stdout(io.StringIO()):
        again = launch.main(config, workdir)
    self.assertEqual(json.loads(json.dumps(again)), saved)


class StagesTest(absltest.TestCase):
  """Points, names, presets and checks: no training."""

  def setUp(self):
    super().setUp()
    self.config = sweep_configs.get_config()

  def test_the_configs_pass_the_launcher_checks(self):
    launch.check_config(sweep_configs.get_config())
    launch.check_config(sweep_configs.get_config('smoke'))

  def test_product_of_axes_without_the_config_own_values(self):
    stage = sweep_configs.stage('s', 'config', ('learning_rate.lora', (1e-2, 3e-2)),
                                ('lora.targets', ('attn', 'all_linear')))
    names = [p.name for p in sweeping.expand(self.config, stage, ())]
    # 1e-2 and all_linear are the config's own values: not in the names.
    self.assertEqual(names, ['targets=attn', 'default', 'lr=0.03,targets=attn', 'lr=0.03'])

  def test_a_stage_from_a_start(self):
    stage = sweep_configs.stage('s', 'best', ('lora.rank', (8, 16)))
    points = list(sweeping.expand(self.config, stage, (('lora.rslora', True),)))
    self.assertEqual([p.overrides for p in points],
                     [(('lora.rank', 8), ('lora.rslora', True)), (('lora.rslora', True),)])
    self.assertEqual([p.name for p in points], ['r=8,rslora=on', 'rslora=on'])

  def test_point_config_resolves_presets(self):
    point = sweeping.point_config(self.config, (('lora.targets', 'attn'),
                                                ('learning_rate.lora', 0.1)))
    self.assertEqual(point.lora.targets, sweep_configs.ATTN)
    self.assertEqual(point.learning_rate.lora, 0.1)
    self.assertEqual(self.config.learning_rate.lora, 1e-2)  # the config is not changed
    self.assertEqual(point.lora.rank, self.config.lora.rank)

  def test_full_overrides_keep_what_changes_full_fine_tuning(self):
    self.assertEqual(
        sweeping.full_overrides((('learning_rate.lora', 0.1), ('lora.rank', 8),
                                 ('loraplus_lr_ratio', 4.0), ('num_steps', 600))),
        (('num_steps', 600),))

  def test_best_fits_the_budget(self):
    rows = [dict(name='a', val_bpb=1.9, within_budget=False),
            dict(name='b', val_bpb=2.0, within_budget=True),
            dict(name='c', val_bpb=2.1, within_budget=True)]
    self.assertEqual(sweeping.best(rows)['name'], 'b')
    self.assertIsNone(sweeping.best(rows[:1]))

  def test_bad_stages(self):
    for bad, message in (
        (stages(('s', 'config', ('lora.rnak', (4,)))),
         "no field 'lora.rnak' .*config.optional_fields"),
        (stages(('s', 'config', ('lora.targets', ('attention',)))),
         "lora.targets='attention': no preset of that name"),
        (stages(('s', 'worst', ('lora.rank', (4,)))), "start='worst'"),
        (stages(('s', 'config', ('lora.rank', ()))), 'is not \\(field, values\\)'),
        ((('s', 'config'),), 'is not \\(name, start, axes\\)'),
        (stages(('s', 'config', ('lora.rank', (4,))), ('s', 'best', ('lora.rank', (8,)))),
         "two stages named 's'")):
      with self.subTest(message):
        config = sweep_configs.get_config()
        config.stages = bad
        with self.assertRaisesRegex(app.UsageError, '--config.stages: .*' + message):
          launch.check_config(config)

  def test_an_optional_field_passes_the_checks(self):
    self.config.stages = stages(('s', 'best', ('lora.not_yet', (True,))))
    self.config.optional_fields = ('lora.not_yet',)
    launch.check_config(self.config)


def _record():
  base = dict(val_bpb=2.8, test_bpb=3.0)
  full = dict(name='default', val_bpb=1.8, test_bpb=2.0, trainable_params=1000,
              step_time_s=0.2)
  points = [dict(name='default', stage='coarse', val_bpb=2.0, test_bpb=2.2,
                 share_of_full_gain=0.8, trainable_params=200, param_fraction=0.2,
                 within_budget=True, step_time_s=0.1),
            dict(name='r=64', stage='rank', val_bpb=1.85, test_bpb=2.05,
                 share_of_full_gain=0.95, trainable_params=800, param_fraction=0.8,
                 within_budget=False, step_time_s=None)]
  return dict(base=base, full=[full], points=points,
              skipped=[dict(name='dora=on', stage='dora', reason='no field')],
              budget=250, max_trainable_fraction=0.25, best='default')


class ReportTest(absltest.TestCase):

  def test_table(self):
    text = sweep_report.table(_record())
    self.assertIn('| **LoRA default** (best) | coarse | 2.000 | 2.200 | 80.0% | 200 (20.0%) '
                  '| 100 ms |', text)
    self.assertIn('| LoRA r=64 | rank | 1.850 | 2.050 | 95.0% | 800 (80.0%, over budget) '
                  '| – |', text)
    self.assertIn('| full fine-tune (default) | reference | 1.800 | 2.000 | 100% '
                  '| 1,000 (100%) | 200 ms |', text)
    self.assertIn('| LoRA dora=on | dora | skipped: no field |', text)
    self.assertIn('Budget: at most 250 trainable parameters (25% of', text)

  def test_readme_block_is_replaced(self):
    readme = 'intro\n<!-- sweep table -->\nold table\n<!-- end sweep table -->\nafter\n'
    new = sweep_readme.render(readme, _record())
    self.assertTrue(new.startswith('intro\n<!-- sweep table -->\n| run | stage |'))
    self.assertTrue(new.endswith('<!-- end sweep table -->\nafter\n'))
    self.assertNotIn('old table', new)
    self.assertIn(sweep_report.table(_record()), new)
    with self.assertRaisesRegex(ValueError, 'no <!-- sweep table --> ... <!-- end sweep'):
      sweep_readme.render('no markers', _record())

  def test_readme_tool_writes_the_file(self):
    tmp = test_utils.tmpdir(self)
    readme, results = os.path.join(tmp, 'README.md'), os.path.join(tmp, 'sweep.json')
    with open(readme, 'w') as f:
      f.write('<!-- sweep table -->\n<!-- end sweep table -->\n')
    with open(results, 'w') as f:
      json.dump(_record(), f)
    with contextlib.redirect_stdout(io.StringIO()):
      self.assertEqual(sweep_readme.main([results, f'--readme={readme}']), 0)
    with open(readme) as f:
      self.assertIn('| LoRA r=64 |', f.read())


if __name__ == '__main__':
  absltest.main()
