"""Tests for experiments/launch.py: config checks, and every README command parses."""

import os

# Eight CPU devices for the mesh checks; must happen before jax is imported
# (conftest.py does the same for pytest, Bazel runs this file directly).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import re  # pylint: disable=g-import-not-at-top,wrong-import-position
import shlex  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position
from unittest import mock  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl.testing import absltest  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl.testing import parameterized  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

import test_utils  # pylint: disable=g-import-not-at-top,wrong-import-position

_ROOT = test_utils.append_repo_root()
from configs import finetune as finetune_configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import pretrain as pretrain_configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import launch  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position

_LAUNCHERS = ('experiments/finetune.py', 'experiments/pretrain.py', 'experiments/sweep.py')


def readme_commands() -> list[list[str]]:
  """Every launcher command line in README.md (code blocks and inline code).

  Returns:
    Per command, the launcher's path and its arguments (environment
    assignments before it and ``&`` after it dropped).
  """
  with open(os.path.join(_ROOT, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  snippets = []
  blocks = re.findall(r'^```[^\n]*\n(.*?)^```', text, re.S | re.M)
  for block in blocks:
    snippets += block.replace('\\\n', ' ').splitlines()
  prose = re.sub(r'^```[^\n]*\n.*?^```', '', text, flags=re.S | re.M)
  snippets += [s.replace('\n', ' ') for s in re.findall(r'`([^`]+)`', prose)]
  commands = []
  for snippet in snippets:
    words = shlex.split(snippet, comments=True)
    starts = [i for i, w in enumerate(words) if w in _LAUNCHERS and i and
              words[i - 1].startswith('python')]
    for start in starts:
      end = next((i for i in range(start + 1, len(words))
                  if words[i] in ('&', '&&', ';', '|')), len(words))
      commands.append(words[start:end])
  return commands


class ReadmeCommandsTest(absltest.TestCase):

  def test_every_launcher_command_in_the_readme_parses_and_checks(self):
    commands = readme_commands()
    # The README shows the main job, variants, pretraining and two processes.
    self.assertGreaterEqual(len(commands), 7, commands)
    self.assertIn('--config.lora.rank=32', sum(commands, []))
    self.assertIn('--config.cluster.process_id=1', sum(commands, []))
    for launcher, *args in commands:
      with self.subTest(' '.join([launcher, *args])):
        test_utils.import_launcher(launcher[:-len('.py')].replace('/', '.'))
        # Paths in the README are relative to the repository root.
        args = [re.sub(r'^--config=', f'--config={_ROOT}/', a) for a in args]
        with flagsaver.flagsaver(), mock.patch.object(sys, 'argv', [launcher, *args]):
          self.assertEqual(launch.parse_flags([launcher, *args]), [launcher])
          config = flags.FLAGS.config
          launch.check_config(config)
          self.assertEqual(config.job, os.path.basename(launcher)[:-len('.py')])

  def test_a_wrong_field_fails_to_parse(self):
    # Positive control: what the README had before (--config.rank) is refused.
    test_utils.import_launcher('experiments.finetune')
    argv = ['finetune.py', f'--config={_ROOT}/configs/finetune.py:lora',
            '--workdir=/tmp/w', '--config.rank=32']
    with flagsaver.flagsaver(), mock.patch.object(sys, 'stderr') as stderr:
      with self.assertRaises(SystemExit):
        launch.parse_flags(argv)
    self.assertRegex(''.join(c.args[0] for c in stderr.write.call_args_list),
                     r"FATAL Flags parsing error: Unknown command line flag 'config\.rank'")


class CheckConfigTest(parameterized.TestCase):

  @parameterized.parameters('finetune', 'finetune:smoke', 'finetune:lora,smoke',
                            'pretrain', 'pretrain:smoke')
  def test_the_configs_pass(self, name):
    module, _, arg = name.partition(':')
    configs = finetune_configs if module == 'finetune' else pretrain_configs
    launch.check_config(configs.get_config(arg))

  @parameterized.named_parameters(
      ('job', {'job': 'eval'},
       r"--config.job='eval': expected one of \('pretrain', 'finetune', 'sweep'\)"),
      ('method', {'methods': ('lora', 'lorb')}, r"Unknown methods \['lorb'\]"),
      ('mesh', {'mesh': (2, 2, 2)}, r'--config.mesh: mesh must be \(data, model\)'),
      ('heads', {'pretrain.model.num_heads': 5},
       '--config.pretrain.model.d_model=128 is not a multiple of '
       '--config.pretrain.model.num_heads=5'),
      ('seq_len', {'seq_len': 256},
       "--config.seq_len=256 exceeds the model's --config.pretrain.model.max_len=128"),
      ('pretrain_seq_len', {'pretrain.seq_len': 256},
       '--config.pretrain.seq_len=256 exceeds'),
      ('steps', {'num_steps': 0}, '--config.num_steps=0 must be at least 1'))
  def test_bad_finetune_configs(self, overrides, message):
    config = finetune_configs.get_config()
    config.update_from_flattened_dict(overrides)
    with self.assertRaisesRegex(app.UsageError, message):
      launch.check_config(config)

  def test_pretraining_is_not_checked_when_the_base_is_given(self):
    config = finetune_configs.get_config()
    config.update_from_flattened_dict({'pretrain.seq_len': 256, 'base_checkpoint': '/b'})
    launch.check_config(config)

  def test_bad_pretrain_config(self):
    config = pretrain_configs.get_config()
    config.model.max_len = 64
    with self.assertRaisesRegex(app.UsageError, '--config.seq_len=128 exceeds the '
                                "model's --config.model.max_len=64"):
      launch.check_config(config)

  def test_batches_must_split_over_the_data_axis(self):
    if jax.device_count() < 4:
      self.skipTest(f'needs 4 devices, has {jax.device_count()}')
    mesh = sharding.make_mesh((4, 1))
    config = finetune_configs.get_config('smoke')  # batch_size 8 in both trainings
    launch.check_batches(config, mesh)
    config.pretrain.batch_size = 6
    with self.assertRaisesRegex(app.UsageError,
                                "--config.pretrain.batch_size=6 does not split over "
                                "the mesh's 'data' axis of 4 devices"):
      launch.check_batches(config, mesh)
    config.base_checkpoint = '/b'  # no pretraining: its batch size does not matter
    launch.check_batches(config, mesh)


if __name__ == '__main__':
  absltest.main()
