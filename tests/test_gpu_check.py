"""The prepared GPU check (recipes/benchmarks/gpu_check.py) cannot rot: its CPU dry run runs every code path.

The dry run is a subprocess (as a user runs it): the script resets accelerate's process-wide state
between its fp32 and bf16 sections, which must not leak into the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
gpu_check = load_recipe("benchmarks/gpu_check")


@pytest.mark.slow
def test_dry_run_runs_every_section_on_policy_and_writes_the_docs_table(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    original = (ROOT / "docs" / "benchmarks.md").read_text()
    docs.write_text(original)
    output = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "recipes" / "benchmarks" / "gpu_check.py"), "--dry-run", "--output",
                    str(output), "--write-docs", str(docs)], cwd=ROOT, env=env, check=True, capture_output=True,
                   timeout=300)
    results = json.loads(output.read_text())

    assert list(results["sections"]) == list(gpu_check.SECTIONS)
    for name, section in results["sections"].items():
        if name == "t2i_forward_process" and gpu_check.FORWARD_PROCESS_ITERATION is None:
            assert section["status"].startswith("skipped: the library has no forward-process objective")
            continue
        assert section["status"] == "ok", (name, section.get("traceback"))
        assert section["command"].endswith(f"--dry-run --sections {name}")
    sections = results["sections"]
    # The first update after sampling reproduces the rollout's log-probabilities exactly, in fp32 and under
    # bf16 autocast, for the motion prior and both text-to-image families (with guidance and LoRA).
    for name in ("ego_grpo_fp32", "ego_grpo_bf16", "t2i_unet", "t2i_sd3"):
        assert sections[name]["on_policy_ratio_max_dev"] == 0.0, name
        assert sections[name]["samples_finite"]
        assert sections[name]["out_of_memory_attempts"] == []
    ego = sections["ego_grpo_fp32"]
    assert (ego["conditions"], ego["rollouts"]) == (2, 4)  # the dry run's B x G, not halved
    assert [r["precision"] for r in sections["ego_sampling"]["rows"]] == ["fp32", "bf16"]
    assert [r["precision"] for r in sections["ego_grpo_bf16"]["rows"]] == ["bf16"]

    text = docs.read_text()
    assert text.startswith(original.rstrip("\n"))  # the rest of the file is untouched
    generated = text[text.index(gpu_check.report.DOCS_BEGIN):]
    assert generated.count("DRY RUN") == 1
    figure_rows = sum(len(s.get("rows", [])) or 1 for s in sections.values())
    assert generated.count("\n| ") == 1 + figure_rows  # header + one row per figure (or status)
    for name in gpu_check.SECTIONS:
        assert f"--sections {name}` |" in generated

    # Regenerating the table from the results file changes nothing (the section is replaced, not added).
    gpu_check.main(gpu_check.Config(from_results=output, write_docs=docs))
    assert docs.read_text() == text


def test_docs_section_is_inserted_once_then_replaced_and_broken_markers_are_refused() -> None:
    begin, end = gpu_check.report.DOCS_BEGIN, gpu_check.report.DOCS_END
    replace = gpu_check.report.replace_docs_section
    once = replace("# Benchmarks\n\nCPU tables.\n", "table 1\n")
    assert once == f"# Benchmarks\n\nCPU tables.\n\n## GPU check\n\n{begin}\ntable 1\n{end}\n"
    assert replace(once, "table 1\n") == once
    moved = once + "\n## Later section\n"
    assert replace(moved, "table 2\n") == moved.replace("table 1\n", "table 2\n")
    for broken in (f"{begin}\nx\n", f"x\n{end}\n", f"{end}\n{begin}\n", once + once):
        with pytest.raises(ValueError, match="markers"):
            replace(broken, "t\n")


def test_budget_skips_the_sections_that_no_longer_fit_and_a_failure_does_not_stop_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Clock:  # the script's clock, advanced only by the sections below (no dependence on machine load)
        now = 100.0

        def perf_counter(self) -> float:
            return self.now

    clock, ran = Clock(), []

    def slow(cfg, env):
        ran.append("slow")
        clock.now += 10.0
        return {"rows": [gpu_check.row("slow", "fp32", 10.0, None)]}

    def broken(cfg, env):
        ran.append("broken")
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check, "time", clock)
    monkeypatch.setitem(gpu_check.SECTION_FUNCTIONS, "ego_sampling", broken)
    monkeypatch.setitem(gpu_check.SECTION_FUNCTIONS, "ego_grpo_fp32", slow)
    monkeypatch.setitem(gpu_check.SECTION_FUNCTIONS, "t2i_unet", lambda cfg, env: ran.append("never"))
    output = tmp_path / "results.json"
    cfg = gpu_check.Config(dry_run=True, sections=("ego_sampling", "ego_grpo_fp32", "t2i_unet"), budget_s=8.0,
                           margin_s=1.0, output=output)
    results = gpu_check.run(cfg)
    assert ran == ["broken", "slow"]
    status = {name: s["status"] for name, s in results["sections"].items()}
    assert status["ego_sampling"] == "failed: RuntimeError: boom"
    assert status["ego_grpo_fp32"] == "ok"
    assert status["t2i_unet"] == "skipped: budget (10 s elapsed + 0 s reserve > 7 s)"
    assert json.loads(output.read_text())["sections"].keys() == status.keys()  # written after every section
    assert "| t2i_unet: skipped: budget" in gpu_check.report.markdown(results)


def test_full_size_pipelines_have_the_published_parameter_counts() -> None:
    """Built on the meta device (no memory): the layouts of SD 1.5 and SD3 Medium, and the task's latents at 512 px."""
    import torch

    from tasks.text_to_image.full_size import full_size_pipeline
    from tasks.text_to_image.task import TextToImageTask, TextToImageTaskConfig

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    unet = full_size_pipeline("unet", device="meta")
    assert (count(unet.unet), count(unet.text_encoder), count(unet.vae)) == (859_520_964, 123_060_480, 83_653_863)
    sd3 = full_size_pipeline("sd3", device="meta")
    assert (count(sd3.transformer), count(sd3.text_encoder_2)) == (2_028_328_000, 694_659_840)
    assert sd3.text_encoder_3 is None
    config = TextToImageTaskConfig(image_size_px=512)
    assert TextToImageTask(unet, {"train": ["a cat"]}, config).sample_shape == (4, 64, 64)
    assert TextToImageTask(sd3, {"train": ["a cat"]}, config).sample_shape == (16, 64, 64)
    # 512 px latents through the denoisers (shapes only, on the meta device): 77 CLIP tokens for SD 1.5; for
    # SD3 77 CLIP tokens (768 + 1280 features, zero-padded to T5's 4096) + 256 zero T5 tokens, pooled 768 + 1280.
    meta = {"device": "meta"}
    eps = unet.unet(torch.zeros(2, 4, 64, 64, **meta), torch.ones(2, **meta), torch.zeros(2, 77, 768, **meta)).sample
    velocity = sd3.transformer(hidden_states=torch.zeros(2, 16, 64, 64, **meta), timestep=torch.ones(2, **meta),
                               encoder_hidden_states=torch.zeros(2, 333, 4096, **meta),
                               pooled_projections=torch.zeros(2, 2048, **meta)).sample
    assert eps.shape == (2, 4, 64, 64) and velocity.shape == (2, 16, 64, 64)


@pytest.mark.unchecked_annotations
def test_full_size_pipeline_refuses_an_unknown_family() -> None:
    from tasks.text_to_image.full_size import full_size_pipeline

    with pytest.raises(ValueError, match="family='flux' is not one of 'unet', 'sd3'"):
        full_size_pipeline("flux", device="meta")  # type: ignore[arg-type]
