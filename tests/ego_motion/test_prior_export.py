"""The post-trained prior's export (``model.prior_export``): both architectures read back by ``load_denoiser``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tasks.ego_motion.model.egoallo_checkpoint import EgoAlloConfig, EgoAlloDenoiser
from tasks.ego_motion.model.network import DenoiserConfig, MotionDenoiser, load_denoiser
from tasks.ego_motion.model.prior_export import export_prior
from tests.test_egoallo_checkpoint import TINY, egoallo_yaml, synthetic_tensors, write_checkpoint


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _nudge(model: torch.nn.Module) -> None:
    """Stand-in for post-training: move every weight, so an export of the source's weights would be caught."""
    with torch.no_grad():
        for value in model.parameters():
            value.add_(0.01)


def test_a_motion_denoiser_round_trips_and_replaces_the_previous_export(tmp_path):
    torch.manual_seed(0)
    model = MotionDenoiser(dataclasses.replace(DenoiserConfig.demo(), width=32, ff_dim=64, num_encoder_layers=1,
                                               num_decoder_layers=1))
    first = export_prior(model, tmp_path, source=tmp_path / "unused.safetensors", step=2)
    _nudge(model)
    path = export_prior(model, tmp_path, source=tmp_path / "unused.safetensors", step=2)
    assert path == first == tmp_path / "prior.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior.safetensors"]  # no temporary left behind
    loaded = load_denoiser(path)
    assert isinstance(loaded, MotionDenoiser) and loaded.config == model.config and _states_equal(loaded, model)


def test_an_egoallo_prior_is_exported_in_egoallos_layout_and_reads_back(tmp_path):
    source = write_checkpoint(tmp_path / "egoallo_tiny", synthetic_tensors(EgoAlloConfig(**TINY)),
                              egoallo_yaml(**TINY))
    model = load_denoiser(source)
    assert isinstance(model, EgoAlloDenoiser)
    out = tmp_path / "run"
    export_prior(model, out, source=source, step=1)
    _nudge(model)
    folder = export_prior(model, out, source=source, step=30)  # a second export replaces the first whole
    assert folder == out / "prior" and sorted(p.name for p in out.iterdir()) == ["prior"]
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoints_30", "model_config.yaml"]
    assert (folder / "model_config.yaml").read_bytes() == (source / "model_config.yaml").read_bytes()
    loaded = load_denoiser(folder)
    assert isinstance(loaded, EgoAlloDenoiser) and loaded.config == model.config and _states_equal(loaded, model)
    x, t, cond = torch.randn(1, 4, model.config.motion_dim), torch.tensor([5]), torch.randn(1, 4, model.config.d_cond)
    assert torch.equal(loaded(x, t, cond), model(x, t, cond))


def test_a_model_no_loader_reads_is_refused(tmp_path):
    with pytest.raises(TypeError, match="cannot export a Linear"):
        export_prior(torch.nn.Linear(2, 2), tmp_path, source=tmp_path, step=1)
