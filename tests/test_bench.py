"""mend-bench's side-by-side tables: the official code's medians are read from the harness's JSON
and shown beside the rows of the same editor, program, thread count and model size."""

import json

import pytest

from mend_jax import bench, cli


def _row(alg, mode, threads, size, median):
  return {"alg": alg, "mode": mode, "threads": threads, "size": size, "median_s": median, "peak_rss_mib": 3000.0}


def _result(alg, n_layer, width, step, edit):
  return {"alg": alg, "threads": 2, "n_layer": n_layer, "width": width, "train_step_s": step, "edit_s": edit,
          "train_step_compile_s": 10.0, "edit_compile_s": 5.0, "floor_s": 1.0, "peak_gb": 2.4,
          "editor_params": 1000, "train_step_gflop": 500.0, "edit_gflop": 150.0, "matmul_gflops": 200.0}


def test_official_medians_sit_beside_the_matching_rows(tmp_path):
  path = tmp_path / "official.json"
  path.write_text(json.dumps({"args": {}, "results": [
      _row("mend", "train", 2, "6x768", 6.9), _row("mend", "edit", 2, "6x768", 2.25),
      _row("efk", "edit", 2, "6x768", 0.85), _row("mend", "train", 2, "24X768", 11.0),
      _row("mend", "train", 1, "6x768", 9.7)]}))
  official = bench.load_official(str(path))
  assert official == {("mend", "train_step_s", 2, "6x768"): 6.9, ("mend", "edit_s", 2, "6x768"): 2.25,
                      ("ke", "edit_s", 2, "6x768"): 0.85, ("mend", "train_step_s", 2, "24x768"): 11.0,
                      ("mend", "train_step_s", 1, "6x768"): 9.7}
  results = [_result("mend", 6, 768, 3.5, 1.2), _result("mend", 24, 768, 4.9, 1.4), _result("enn", 6, 768, 5.0, 0.5)]
  lines = bench.table(results, official).splitlines()[2:]
  assert "| 3.500 (6.900) | 1.200 (2.250) |" in lines[0]
  assert "| 4.900 (11.000) | 1.400 |" in lines[1]  # no official edit at 24x768
  assert "| 5.000 | 0.500 |" in lines[2]  # no official ENN row
  bound = bench.bound_table(results, official).splitlines()[2:]
  assert bound[0].endswith("| 3.500 | 2.30 |") and bound[1].endswith("| 1.200 | 0.75 |")  # a third of 6.9, 2.25
  assert bound[-1].endswith("| 0.500 | - |")
  # Without the file no official figure is shown.
  assert "(" not in bench.table(results).split("\n", 2)[2]


def test_a_file_that_is_not_the_harness_json_is_a_clear_error(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([{"alg": "mend"}]))
  with pytest.raises(ValueError, match=r"--official '.*bad.json': expected the JSON that official_mend_bench.py"):
    bench.load_official(str(bad))
  with pytest.raises(SystemExit, match=r"^error: --official '.*missing.json': expected"):
    cli.bench_main(["mend-bench", "--threads", "1", "--official", str(tmp_path / "missing.json")])
