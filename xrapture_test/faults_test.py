"""Fault injection on the library (xrapture/_src/testing/faults.py): no silent change."""

import json
import os
from unittest import mock

from absl import logging
from absl.testing import absltest
import numpy as np
import safetensors
import safetensors.numpy
from xrapture._src.io import adapter
from xrapture._src.io import integrity
from xrapture._src.testing import faults

import test_utils

_COUNTS = dict(header_flips=100, data_flips=100, truncations=10, write_faults=2,
               writers=3, rounds=3, kills=1)


class FaultInjectionTest(absltest.TestCase):

  def test_every_fault_is_refused_or_harmless(self):
    report = faults.run(**_COUNTS)
    logging.info("fault injection outcomes:\n%s", report.table())
    self.assertEqual(report.bad(), {}, "\n" + report.table())
    self.assertEqual(report.total("header bit flip"), _COUNTS["header_flips"])
    self.assertEqual(report.total("data bit flip"), _COUNTS["data_flips"])
    self.assertGreaterEqual(report.total("truncation"), _COUNTS["truncations"])
    for kind in ("read-only target", "disk full (ENOSPC on write)", "failed fsync (EIO)",
                 "failed rename (EXDEV)"):
      self.assertEqual(report.total(kind), _COUNTS["write_faults"], kind)
    self.assertEqual(report.counts[("concurrent writers (writes)", "same")],
                     _COUNTS["writers"] * _COUNTS["rounds"])
    self.assertGreater(report.total("concurrent writers (reads)"), 0)
    self.assertEqual(report.total("kill -9 during save"), _COUNTS["kills"])
    self.assertEqual(report.total("bad config value"), len(faults.BAD_CONFIG_VALUES))

  def _saved(self):
    path = os.path.join(test_utils.tmpdir(self), "a.safetensors")
    base, params, lora_spec = faults.example()
    adapter.save_adapter(path, params, lora_spec)
    return path, base, faults._expected(base, params)

  def test_saved_example_loads_exactly(self):
    path, base, expected = self._saved()
    self.assertEqual(faults._load_outcome(path, base, expected), ("same", "loaded"))

  def test_classifier_sees_a_silent_change(self):
    # Positive control: a consistent file (checksum recomputed) with another
    # alpha loads without error, and the harness calls it silent.
    path, base, expected = self._saved()
    with safetensors.safe_open(path, framework="numpy") as f:
      header = json.loads(f.metadata()["xrapture"])
      tensors = {k: f.get_tensor(k) for k in f.keys()}
    header["entries"]["lin/w"]["alpha"] = 4.5
    del header[integrity.KEY]
    header[integrity.KEY] = integrity.record(header, tensors)
    with open(path, "wb") as f:
      f.write(safetensors.numpy.save(tensors, metadata={"xrapture": json.dumps(header)}))
    self.assertEqual(faults._load_outcome(path, base, expected)[0], "silent")

  def test_classifier_sees_an_unclear_error(self):
    path, base, expected = self._saved()
    with mock.patch.object(adapter, "load_adapter", side_effect=KeyError("kind")):
      self.assertEqual(faults._load_outcome(path, base, expected)[0], "unclear")
    with mock.patch.object(adapter, "load_adapter", side_effect=ValueError("corrupt")):
      self.assertEqual(faults._load_outcome(path, base, expected)[0], "unclear")

  def test_identical_compares_bits_alpha_and_structure(self):
    _, params, _ = faults.example()
    self.assertTrue(faults.identical(params, params))
    changed = dict(params, lin=dict(params["lin"], w=params["lin"]["w"].replace(alpha=4.5)))
    self.assertFalse(faults.identical(changed, params))
    bumped = dict(params, head={"w": np.nextafter(params["head"]["w"], np.inf)})
    self.assertFalse(faults.identical(bumped, params))
    self.assertFalse(faults.identical({"lin": params["lin"]}, params))

  def test_table(self):
    report = faults.Report()
    report.add("x", "same")
    report.add("x", "refused", "e")
    report.add("y", "silent", "loaded")
    self.assertEqual(report.table().splitlines()[2:],
                     ["| x | 2 | 1 | 1 | 0 | 0 |", "| y | 1 | 0 | 0 | 0 | 1 |"])
    self.assertEqual(report.bad(), {("y", "silent"): "loaded"})


if __name__ == "__main__":
  absltest.main()
