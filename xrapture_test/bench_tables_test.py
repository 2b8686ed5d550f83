"""The READMEs' benchmark tables are the ones benchmarks/tables.py renders from the results."""

import json
import pathlib
import tempfile

from absl.testing import absltest

import test_utils

test_utils.append_repo_root()

from benchmarks import tables  # pylint: disable=g-import-not-at-top,wrong-import-position

_RESULTS = tables.ROOT / "benchmarks" / "results"


def _scaling(points):
  """A scaling.json with one width and the given (rank, ÷ bound, ÷ PEFT) points."""
  env = dict(date="d", machine="m", backend="cpu", device="cpu", python="3")
  return {"environment": env, "n_layers": 2, "seq_len": 8, "batch": 2, "vocab": 16,
          "rounds": 3, "widths": {"256": {
              "step_ms": {"bound": {"median_ms": 10.0}}, "full_over_bound": 2.0,
              "points": [{"rank": r, "xrapture": {"bound": b}, "xrapture_over_peft": q}
                         for r, b, q in points]}}}


class BenchTablesTest(absltest.TestCase):

  def test_readmes_show_what_the_results_say(self):
    for path in tables.READMES:
      text = path.read_text(encoding="utf-8")
      self.assertEqual(tables.render(text, _RESULTS), text,
                       f"{path} differs from benchmarks/results: run "
                       "`python benchmarks/tables.py`")

  def test_every_table_is_shown(self):
    shown = {name for path in tables.READMES
             for name in tables.names_in(path.read_text(encoding="utf-8"))}
    self.assertEqual(shown, set(tables.TABLES))

  def test_scaling_marks_each_missed_target(self):
    # d=256: the targets are 1 + 3r/256 + 0.03, i.e. 1.077 at r=4 and 1.124 at r=8.
    results = pathlib.Path(tempfile.mkdtemp())
    (results / "scaling.json").write_text(json.dumps(_scaling(
        [(4, 1.07, 0.80), (8, 1.13, 0.90)])))
    row = tables.scaling(results).splitlines()[-1]
    self.assertEqual(
        row, "| 256 | 10.0 | 1.070 / 1.077; 0.800 | 1.130 / 1.124 ✗; 0.900 ✗ | 2.00 |")
    rows = tables.report.markdown_table(["target (CPU)", "measured", "met"],
                                        tables._scaling_targets(results))
    self.assertIn("1 of 2 points; worst d=256, r=8: 1.13 (target 1.12) | **no**", rows)
    self.assertIn("1 of 2 points; worst d=256, r=8: 0.90 | **no**", rows)

  def test_flattened_optimizer_sweep_is_its_own_row(self):
    results = pathlib.Path(tempfile.mkdtemp())
    (results / "scaling.json").write_text(json.dumps(_scaling([(4, 1.10, 0.80)])))
    flat = _scaling([(4, 1.09, 0.80)])
    point = flat["widths"]["256"]["points"][0]
    point.update(xrapture_flat={"bound": 1.07}, flat_over_plain=0.98)
    (results / "scaling_flat.json").write_text(json.dumps(flat))
    # The flattened run's cell: its ÷ bound against the target, plain Adam's from
    # the same robin, and the paired ratio of the two.
    self.assertEqual(tables.scaling_flat(results).splitlines()[-1],
                     "| 256 | 10.0 | 1.070 / 1.077; 1.090 ✗; 0.980 |")
    rows = tables.targets_table(results)
    self.assertIn("| step ÷ bound ≤ 1 + 3r/d + 0.03 at every width and rank | 0 of 1 points", rows)
    self.assertIn("| step ÷ bound ≤ 1 + 3r/d + 0.03 at every width and rank, "
                  "`optax.flatten(adam)` (README's CPU tip) | 1 of 1 points", rows)

  def test_remat_target_is_met_by_any_policy_with_both(self):
    # Full fine-tuning's step peak 1000 bytes; each policy's RSS from its own
    # memory run, its step from remat.json. Targets: memory ≤ 0.45, step ≤ 1.25.
    def memory_run(policy, net):
      child = lambda n: {"step_peak_rss": 100 + n, "baseline_rss": 100}
      return {"remat_policy": policy,
              "children": {"full B=4": child(1000), "xrapture_remat B=4": child(net)}}
    def results_dir(steps, nets):
      results = pathlib.Path(tempfile.mkdtemp())
      (results / "remat.json").write_text(json.dumps({"step_ratios": {
          p: {"median": v} for p, v in steps.items()}}))
      for i, (policy, net) in enumerate(nets.items()):
        (results / f"memory_remat_{i}.json").write_text(json.dumps(memory_run(policy, net)))
      return results
    steps = {"nothing_saveable": 1.30, "nothing_saveable:4": 1.15, "dots_saveable": 1.03}
    nets = {"nothing_saveable": 340, "nothing_saveable:4": 440, "dots_saveable": 480}
    (row,) = tables._remat_targets(results_dir(steps, nets))
    self.assertEqual(row[1:], ["0.44, 1.15", "yes"])
    self.assertIn("`nothing_saveable`, first 4 blocks", row[0])
    del nets["nothing_saveable:4"]   # none meets both: the one saving the most is shown
    (row,) = tables._remat_targets(results_dir(steps, nets))
    self.assertEqual(row[1:], ["0.34, 1.30", "**no**"])
    (row,) = tables._remat_targets(results_dir({"other": 1.0}, nets))  # no policy has both
    self.assertIn("not measured yet", row[1])

  def test_missing_results_and_unknown_tables(self):
    empty = pathlib.Path(tempfile.mkdtemp())
    text = "a\n<!-- table: first-step -->\nold\n<!-- end table: first-step -->\nb\n"
    self.assertEqual(tables.render(text, empty),
                     "a\n<!-- table: first-step -->\n_Not measured yet: no "
                     "`first_step.json`._\n<!-- end table: first-step -->\nb\n")
    with self.assertRaisesRegex(KeyError, "names no table"):
      tables.render("<!-- table: nope -->\n<!-- end table: nope -->", empty)


if __name__ == "__main__":
  absltest.main()
