"""Tests for experiments/metrics.py: metrics.jsonl survives kills."""

import json
import os

from absl.testing import absltest

import test_utils

test_utils.append_repo_root()
from experiments import metrics  # pylint: disable=g-import-not-at-top,wrong-import-position

_RECORDS = [dict(step=0, split='val', loss=5.0), dict(step=3, split='train', loss=4.0),
            dict(step=3, split='val', loss=4.5), dict(step=6, split='train', loss=3.0)]


class MetricsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.path = os.path.join(test_utils.tmpdir(self), 'metrics.jsonl')

  def write_lines(self, *lines):
    with open(self.path, 'w') as f:
      f.write(''.join(lines))

  def test_resume_drops_what_came_after_the_checkpoint(self):
    self.write_lines(*(json.dumps(r) + '\n' for r in _RECORDS))
    writer = metrics.Writer(self.path, resume_step=3)
    self.assertEqual(metrics.read_jsonl(self.path), _RECORDS[:3])
    writer.write(step=4, split='train', loss=3.5)
    self.assertEqual(metrics.read_jsonl(self.path)[-1], dict(step=4, split='train', loss=3.5))

  def test_a_start_from_scratch_keeps_nothing(self):
    # A run killed before its first checkpoint wrote the step-0 record; the
    # rerun writes it again, so the old one goes.
    self.write_lines(json.dumps(_RECORDS[0]) + '\n')
    metrics.Writer(self.path, resume_step=0)
    self.assertEqual(metrics.read_jsonl(self.path), [])

  def test_a_partial_last_line_is_dropped_with_a_warning(self):
    self.write_lines(*(json.dumps(r) + '\n' for r in _RECORDS[:3]), '{"step": 6, "spl')
    with self.assertLogs(level='WARNING') as logs:
      metrics.Writer(self.path, resume_step=3)
    self.assertRegex(logs.output[0], r'metrics\.jsonl: dropping line\(s\) \[4\]')
    self.assertEqual(metrics.read_jsonl(self.path), _RECORDS[:3])
    with open(self.path) as f:
      self.assertTrue(f.read().endswith('}\n'))

  def test_no_file_and_not_the_writer(self):
    metrics.Writer(self.path, resume_step=3, enabled=False).write(step=1)
    self.assertFalse(os.path.exists(self.path))
    self.assertEqual(metrics.read_jsonl(self.path), [])


if __name__ == '__main__':
  absltest.main()
