"""benchmarks/bench_gram.py --readme: the README's performance table is rendered from the rows of
a run and replaces only its own block (no timing here: fake rows, no jit)."""

from __future__ import annotations

import pathlib
import sys

import pytest

pytest.importorskip("gaussnewton_experiments")  # replace_block lives in the harness
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gram  # noqa: E402

ROW = {
    "problem": "reg 8-256-256-1 b=128",
    "gram_ms": {"jacobian": 32.0, "structured": 0.5},
    "egn_over_adam": 2.9,
    "egn_default_over_adam": 3.7,
    "compile_egn_over_adam": 3.4,
    "flops_egn_over_adam": 3.3,
    "egn_step_peak_bytes": 2 * 2**20,
}
META = {
    "command": "python benchmarks/bench_gram.py --readme README.md",
    "date": "2026-12-02 06:31 UTC",
    "machine": "Some CPU, 2 cores, Linux",
    "jax": "0.10.2",
    "solve_backend": "native",
    "blas_after": [{"num_threads": 2}],
    "load_before": 0.7,
    "load_after": 1.2,
}


def test_block_has_one_row_per_problem_with_the_run_facts():
    text = bench_gram.readme_block([ROW, {**ROW, "problem": "other", "gram_ms": {}}], META)
    lines = text.splitlines()
    assert META["command"] in lines[0] and "2026-12-02" in lines[0] and "0.7" in lines[0]
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| problem")]
    assert rows[0].split(" | ")[1:7] == ["32.00 ms", "0.50 ms (64x)", "2.9", "3.7", "3.4", "3.3"]
    assert rows[1].split(" | ")[1:3] == ["-", "-"]  # no Gram timings for that problem
    assert len(rows) == 2


def test_write_readme_replaces_only_the_perf_block(tmp_path):
    page = tmp_path / "README.md"
    page.write_text(
        "intro\n<!-- results:begin perf -->\nold\n<!-- results:end perf -->\n"
        "<!-- results:begin readme -->\nkeep\n<!-- results:end readme -->\n",
        encoding="utf-8",
    )
    bench_gram.write_readme(str(page), [ROW], META)
    text = page.read_text(encoding="utf-8")
    assert "old" not in text and "| reg 8-256-256-1 b=128 |" in text
    assert text.startswith("intro\n") and "keep\n" in text


def test_command_line_leaves_out_the_local_output_path():
    args = ["--readme", "README.md", "--out", "/tmp/x.json", "--steps", "20", "--out=y.json"]
    assert bench_gram.command_line(args) == (
        "python benchmarks/bench_gram.py --readme README.md --steps 20"
    )
