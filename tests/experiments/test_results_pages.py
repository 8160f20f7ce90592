"""The results pages regenerated from records (``gaussnewton-experiments results``).

A fake experiment (no JAX, no training) writes real records through the runner; the pages are then
rendered from them: markers round-trip (prose outside them survives, a second regeneration is
byte-identical), the tables hold the numbers the rows imply (test metric at the best validation
evaluation), the stamp names the machine and date from the records, figures are written and
embedded by relative paths, the README block has one line per section, and ``results`` resumes
(a second run trains nothing). The whole file takes a few seconds.
"""

from __future__ import annotations

import json

import pytest

from gaussnewton_experiments import registry as R
from gaussnewton_experiments import results as G
from gaussnewton_experiments.cli import main

CALLS: list[tuple[str, int]] = []


def _fake_run(cfg: R.RunConfig):
    """Test metric 10 + seed - step/100 + (1 at the last row); validation best at the 2nd-last."""
    CALLS.append((cfg.optimizer, cfg.seed))
    offset = 1.0 if cfg.optimizer == "_pages_b" else 0.0
    steps = list(range(0, cfg.steps + 1, cfg.eval_every))
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        yield {
            "step": step,
            "train_time": 0.001 * step,
            "pages_metric": 10.0 + cfg.seed + offset - step / 100 + (1.0 if last else 0.0),
            "val_metric": 5.0 - i + (3.0 if last else 0.0),
            "train_loss": 1.0 / (step + 1),
        }


@pytest.fixture(scope="module", autouse=True)
def fake_entries():
    R.load_builtins()
    spec = R.ExperimentSpec(
        run=_fake_run,
        metric="pages_metric",
        target=9.0,
        default_steps=300,
        default_seeds=2,
        default_eval_every=100,
        default_optimizers=("_pages_a", "_pages_b"),
        description="fake experiment of the results-page tests",
    )
    R.register_experiment("_pages_fake", spec, overwrite=True)
    for name in ("_pages_a", "_pages_b"):
        R.register_optimizer(name, lambda model_fn, loss, **hp: None, overwrite=True)
    yield


SEC = G.Section("fake_one", "results.md", "_pages_fake", ("--seeds", "2"), "Fake task one")
MISSING = G.Section("fake_two", "results_rl.md", "_pages_fake", (), "Fake task two")

PAGE = """# Results

Hand-written introduction that must survive.

<!-- results:begin fake_one -->
stale generated text
<!-- results:end fake_one -->

Hand-written reading of the table, also kept.
"""

README = (
    "# Project\n\nprose\n\n<!-- results:begin readme -->\nold\n<!-- results:end readme -->\n"
    "\n## Next\n"
)


def test_markers_round_trip():
    body = "| a | b |\n|---|---|\n| 1 | 2 |\n"
    once = G.replace_block(PAGE, "fake_one", body)
    assert G.read_blocks(once) == {"fake_one": body}
    assert once.split("<!-- results:begin")[0] == PAGE.split("<!-- results:begin")[0]
    assert once.endswith("Hand-written reading of the table, also kept.\n")
    assert G.replace_block(once, "fake_one", body) == once  # idempotent
    assert G.replace_block(once, "fake_one", "stale generated text\n") == PAGE  # exact inverse
    appended = G.replace_block(once, "other", "x")
    assert appended.startswith(once) and G.read_blocks(appended)["other"] == "x\n"
    with pytest.raises(ValueError, match="2 times"):
        G.replace_block(PAGE + PAGE, "fake_one", body)
    with pytest.raises(ValueError, match="no end marker"):
        G.replace_block("<!-- results:begin z -->\nx\n", "z", body)
    with pytest.raises(ValueError, match="block name"):
        G.replace_block(PAGE, "a b", body)


def _records(tmp_path):
    root = tmp_path / "records"
    assert G.run_sections([SEC], root, log=lambda m: None) == {"fake_one": 0}
    return root


def test_pages_regenerate_from_records(tmp_path):
    root = _records(tmp_path)
    docs, readme = tmp_path / "docs", tmp_path / "README.md"
    docs.mkdir()
    (docs / "results.md").write_text(PAGE)
    readme.write_text(README)
    G.regenerate([SEC, MISSING], root, docs, readme=readme, figures=False)
    page = (docs / "results.md").read_text()
    first_readme = readme.read_text()
    assert "Hand-written introduction that must survive." in page
    assert page.endswith("Hand-written reading of the table, also kept.\n")
    body = G.read_blocks(page)["fake_one"]
    # seeds 0 and 1: best validation at the 2nd-last row (step 200): 10 + seed - 2 -> 8.5 ± 0.5;
    # the final row is 1 higher (10 + seed - 3 + 1): 8.5 too for _a, 9.5 for _b
    assert "| _pages_a | 2 (0) | 8.5 ± 0.5 | 8.5 ± 0.5 |" in body
    assert "| _pages_b | 2 (0) | 9.5 ± 0.5 | 9.5 ± 0.5 |" in body
    machine = json.loads((root / "fake_one" / "records.jsonl").read_text().splitlines()[0])
    cpu = machine["versions"]["cpu"]
    assert f"Machine: {cpu}, {machine['versions']['cpu_count']} cores, jax" in body
    assert "UTC" in body and "4 runs" in body
    assert "gaussnewton-experiments run _pages_fake --seeds 2 --out " in body
    rl = (docs / "results_rl.md").read_text()  # created, with the block of the missing section
    assert "not run yet" in G.read_blocks(rl)["fake_two"]
    lines = G.read_blocks(first_readme)["readme"].replace("\n  ", " ").splitlines()
    assert first_readme.startswith("# Project\n\nprose\n\n") and first_readme.endswith("## Next\n")
    assert any(
        ln.startswith("- Fake task one (") and "_pages_a 8.5 ± 0.5, _pages_b 9.5 ± 0.5" in ln
        for ln in lines
    )
    assert "- Fake task two: not run yet." in lines
    # a second regeneration from the same records is byte-identical
    G.regenerate([SEC, MISSING], root, docs, readme=readme, figures=False)
    assert (docs / "results.md").read_text() == page and readme.read_text() == first_readme


def test_results_command_resumes_and_embeds_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(G, "SECTIONS", (SEC,))
    docs, readme = tmp_path / "docs", tmp_path / "README.md"
    args = ["results", "--records", str(tmp_path / "rec"), "--docs", str(docs), "--readme",
            str(readme)]  # fmt: skip
    CALLS.clear()
    assert main(args) == 0
    assert sorted(CALLS) == [("_pages_a", 0), ("_pages_a", 1), ("_pages_b", 0), ("_pages_b", 1)]
    page = (docs / "results.md").read_text()
    assert "![fake_one](figures/fake_one.png)" in page
    png = docs / "figures" / "fake_one.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    CALLS.clear()
    assert main(args) == 0 and CALLS == []  # resumed: every run was finished
    assert main([*args, "--no-run", "--no-figures"]) == 0
    assert main(["results", "--only", "nope", "--no-run"]) == 2
