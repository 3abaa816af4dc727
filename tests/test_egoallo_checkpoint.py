"""EgoAllo's released checkpoint: safe YAML, the 222-key manifest, strict loading, its computation, the recipes.

Checkpoints here are synthetic (random weights with exactly the manifest's keys and shapes, a YAML
written the way EgoAllo writes it); the real file cannot be downloaded on these machines.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
import tyro
import yaml
from safetensors.torch import load_file, save_file

import recipes.eval_ego_motion as eval_ego_motion_recipe
import tasks.ego_motion.grpo as ego_job
from tasks.ego_motion.model.egoallo_checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    EgoAlloConfig,
    EgoAlloDenoiser,
    StoredRotaryEmbedding,
    UnsafeYamlTagError,
    expected_shapes,
    find_checkpoint_files,
    manifest_numel,
    read_config,
)
from tasks.ego_motion.model.motion import sampling_timesteps
from tasks.ego_motion.model.network import DenoiserConfig, MotionDenoiser, load_denoiser, save_denoiser
from tasks.ego_motion.model.prior import make_scheduler, sample_prior

TINY = {"d_latent": 32, "d_feedforward": 64, "d_noise_emb": 16, "num_heads": 2, "encoder_layers": 1,
        "decoder_layers": 1}
"""The released layout at a width that trains on 2 CPU cores (same keys, smaller shapes)."""


def egoallo_yaml(**fields) -> str:
    """model_config.yaml as EgoAllo writes it: ``yaml.dump`` of its frozen ``egoallo.network.EgoDenoiserConfig``."""
    cls = dataclasses.make_dataclass(
        "EgoDenoiserConfig", [(f.name, f.type, dataclasses.field(default=f.default))
                              for f in dataclasses.fields(EgoAlloConfig)], frozen=True)
    cls.__module__ = "egoallo.network"
    return yaml.dump(cls(**fields))


def synthetic_tensors(config: EgoAlloConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with exactly the manifest's keys and shapes; RoPE freqs 0.9 x the initial ones."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in sorted(expected_shapes(config).items()):
        if key.endswith("rotary_emb.freqs"):
            head_dim = 2 * shape[0]
            tensors[key] = 0.9 * 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        elif len(shape) == 2:
            scale = 1.0 if key == "noise_emb.weight" else 1.0 / math.sqrt(shape[1])
            tensors[key] = scale * torch.randn(shape, generator=gen)
        else:  # LayerNorm weights near 1, biases near 0
            tensors[key] = float(key.endswith(".weight")) + 0.1 * torch.randn(shape, generator=gen)
    return tensors


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], yaml_text: str, step: int = 3000000) -> Path:
    """EgoAllo's layout: model_config.yaml + checkpoints_<step>/model.safetensors + accelerate leftovers."""
    weights_dir = folder / f"checkpoints_{step}"
    weights_dir.mkdir(parents=True)
    (folder / CONFIG_FILE).write_text(yaml_text)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights_dir / WEIGHTS_FILE))
    (weights_dir / "optimizer.bin").write_bytes(b"\x00" * 16)
    return folder


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "egoallo_tiny", synthetic_tensors(EgoAlloConfig(**TINY)), egoallo_yaml(**TINY))


def _inputs(config: EgoAlloConfig, B: int = 2, T: int = 5, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, config.motion_dim, generator=gen), torch.randn(B, T, config.d_cond, generator=gen)


def _head_trajectory(B: int, T: int) -> torch.Tensor:
    """(B, T+1, 4, 4) CPF poses walking along world +x at 1.6 m, looking along +x (CPF +Z forward)."""
    T_world_cpf = torch.eye(4).repeat(B, T + 1, 1, 1)
    T_world_cpf[..., :3, :3] = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    T_world_cpf[..., 0, 3] = 0.04 * torch.arange(T + 1.0)
    T_world_cpf[..., 2, 3] = 1.6
    return T_world_cpf


def read_config_text(text: str, tmp_dir: Path) -> EgoAlloConfig:
    path = tmp_dir / CONFIG_FILE
    path.write_text(text)
    return read_config(path)


# ---------------------------------------------------------------------------------------------
# The manifest and strict loading


def test_full_size_manifest_has_222_keys_and_50_447_088_numbers(tmp_path):
    config = read_config_text(egoallo_yaml(), tmp_path)
    shapes = expected_shapes(config)
    assert len(shapes) == 222 and manifest_numel(config) == 50_447_088
    assert shapes["noise_emb.weight"] == (1000, 1024) and shapes["encoder_layers.5.rotary_emb.freqs"] == (64,)
    assert shapes["decoders.hand_rotmats.5.weight"] == (270, 512) and shapes["latent_from_cond.weight"] == (512, 154)
    with torch.device("meta"):
        model = EgoAlloDenoiser(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes  # the module is the manifest
    assert model.num_parameters() == 50_447_088 - 12 * 64  # the stored RoPE frequencies are buffers


def test_tiny_checkpoint_loads_strictly_with_the_stored_values(tiny_folder):
    model = load_denoiser(tiny_folder)  # a folder routes to the EgoAllo loader
    assert isinstance(model, EgoAlloDenoiser) and model.config == EgoAlloConfig(**TINY)
    stored = synthetic_tensors(EgoAlloConfig(**TINY))
    loaded = model.state_dict()
    assert loaded.keys() == stored.keys()
    assert all(torch.equal(loaded[k], stored[k]) for k in stored)
    assert torch.equal(model.decoder_layers[0].rotary_emb.freqs, stored["decoder_layers.0.rotary_emb.freqs"])


def test_a_file_still_routes_to_the_motion_denoiser(tmp_path):
    path = tmp_path / "prior.safetensors"
    save_denoiser(path, MotionDenoiser(DenoiserConfig(width=16, ff_dim=32, num_heads=2, num_encoder_layers=1,
                                                      num_decoder_layers=1, timestep_features=8)))
    assert isinstance(load_denoiser(path), MotionDenoiser)


def test_full_size_synthetic_checkpoint_loads_and_predicts(tmp_path):
    config = EgoAlloConfig()
    folder = write_checkpoint(tmp_path / "egoallo_checkpoint_april13", synthetic_tensors(config), egoallo_yaml())
    model = load_denoiser(folder)
    assert sum(v.numel() for v in model.state_dict().values()) == 50_447_088 and len(model.state_dict()) == 222
    x_t, cond = _inputs(config, B=1, T=4)
    with torch.no_grad():
        out = model(x_t, torch.tensor([999]), cond)
    assert out.shape == (1, 4, 496) and torch.isfinite(out).all()


def _mutated(tensors: dict, change: str) -> dict:
    tensors = dict(tensors)
    if change in ("renamed", "all"):
        tensors["encoders.beta.0.weight"] = tensors.pop("encoders.betas.0.weight")
    if change in ("missing", "all"):
        del tensors["decoder_layers.0.xattn_q_proj.weight"]
    if change in ("reshaped", "all"):
        tensors["encoder_layers.0.rotary_emb.freqs"] = tensors["encoder_layers.0.rotary_emb.freqs"][:4]
    return tensors


@pytest.mark.parametrize(("change", "named"), [
    ("renamed", ["missing (1): encoders.betas.0.weight", "unexpected (1): encoders.beta.0.weight"]),
    ("missing", ["missing (1): decoder_layers.0.xattn_q_proj.weight"]),
    ("reshaped", ["encoder_layers.0.rotary_emb.freqs is (4,), expected (8,)"]),
    ("all", ["encoders.betas.0.weight", "encoders.beta.0.weight", "decoder_layers.0.xattn_q_proj.weight",
             "encoder_layers.0.rotary_emb.freqs is (4,), expected (8,)"]),
])
def test_a_tampered_checkpoint_names_every_bad_tensor(tmp_path, change, named):
    folder = write_checkpoint(tmp_path / "ckpt", _mutated(synthetic_tensors(EgoAlloConfig(**TINY)), change),
                              egoallo_yaml(**TINY))
    with pytest.raises(ValueError, match="does not match its model_config.yaml") as error:
        load_denoiser(folder)
    for text in named:
        assert text in str(error.value)


def test_a_config_that_disagrees_with_the_weights_is_an_error(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", synthetic_tensors(EgoAlloConfig(**TINY)),
                              egoallo_yaml(**{**TINY, "d_latent": 64}))
    with pytest.raises(ValueError, match=r"encoders\.betas\.0\.weight is \(32, 16\), expected \(64, 16\)"):
        load_denoiser(folder)
    no_hands = write_checkpoint(tmp_path / "no_hands", synthetic_tensors(EgoAlloConfig(**TINY)),
                                egoallo_yaml(**TINY, include_hands=False))
    with pytest.raises(ValueError, match=r"unexpected \(14\): decoders\.hand_rotmats\.0\.bias"):
        load_denoiser(no_hands)


# ---------------------------------------------------------------------------------------------
# The folder


def test_the_newest_checkpoint_is_chosen_by_step_and_leftovers_are_never_opened(tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    tensors = synthetic_tensors(EgoAlloConfig(**TINY))
    folder = write_checkpoint(tmp_path / "run", tensors, egoallo_yaml(**TINY), step=99)
    newer = {**tensors, "noise_emb.weight": tensors["noise_emb.weight"] + 1.0}
    save_dir = folder / "checkpoints_100"
    save_dir.mkdir()
    save_file(newer, str(save_dir / WEIGHTS_FILE))
    (save_dir / "random_states_0.pkl").write_bytes(pickle.dumps(Payload()))  # unpickling it would run `touch`
    assert find_checkpoint_files(folder).step == 100  # 100 > 99, though "checkpoints_99" sorts last as text
    model = load_denoiser(folder)
    assert torch.equal(model.noise_emb.weight, newer["noise_emb.weight"])
    assert not marker.exists()
    # EgoAllo's own scripts pass the checkpoints_<N> folder itself: accepted, with the parent's YAML.
    assert torch.equal(load_denoiser(folder / "checkpoints_99").noise_emb.weight, tensors["noise_emb.weight"])


def test_incomplete_folders_name_the_missing_file(tmp_path, tiny_folder):
    (tiny_folder / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="model_config.yaml is missing"):
        find_checkpoint_files(tiny_folder)
    (tiny_folder / CONFIG_FILE).write_text(egoallo_yaml(**TINY))
    (tiny_folder / "checkpoints_4000000").mkdir()  # newest, but its save never finished
    with pytest.raises(FileNotFoundError, match=r"checkpoints_4000000/model.safetensors is missing"):
        find_checkpoint_files(tiny_folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no checkpoints_<N> folder"):
        find_checkpoint_files(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# The YAML: one Python tag, read as a mapping; every other tag refused before anything runs


def test_the_egoallo_tag_and_a_plain_mapping_both_read(tmp_path):
    text = egoallo_yaml(**TINY)
    assert text.startswith("!!python/object:egoallo.network.EgoDenoiserConfig\n")
    assert read_config_text(text, tmp_path) == EgoAlloConfig(**TINY)
    plain = text.split("\n", 1)[1]
    assert read_config_text(plain, tmp_path) == EgoAlloConfig(**TINY)
    assert read_config_text(text + "d_cond: 154\n", tmp_path) == EgoAlloConfig(**TINY)  # EgoAllo's cached property


@pytest.mark.parametrize("where", ["document", "field"])
def test_a_code_running_tag_is_refused_and_nothing_runs(tmp_path, where):
    marker = tmp_path / "executed"
    payload = f'!!python/object/apply:os.system ["touch {marker}"]'
    text = payload + "\n" if where == "document" else egoallo_yaml(**TINY) + f"activation: {payload}\n"
    with pytest.raises(UnsafeYamlTagError, match=r"refused YAML tag 'tag:yaml.org,2002:python/object/apply:os.system'"):
        read_config_text(text, tmp_path)
    assert not marker.exists()
    control = tmp_path / "control"  # the payload is live: PyYAML's unsafe loader would have run it
    yaml.unsafe_load(payload.replace(str(marker), str(control)))
    assert control.exists()


@pytest.mark.parametrize("tag", ["!!python/name:os.system", "!!python/object/new:os.system",
                                 "!!python/object:egoallo.network.Other", "!!python/tuple", "!custom"])
def test_every_other_tag_is_refused(tmp_path, tag):
    text = egoallo_yaml(**TINY) + f"dropout_p: {tag} [0.0]\n"
    with pytest.raises(UnsafeYamlTagError, match="refused YAML tag"):
        read_config_text(text, tmp_path)


@pytest.mark.parametrize(("extra", "message"), [
    ("noise_conditioning: film\n", "noise_conditioning='film' \\(implemented: 'token'\\)"),
    ("positional_encoding: transformer\n", "positional_encoding='transformer'"),
    ("max_t: 500\n", "max_t=500 \\(implemented: 1000\\)"),
    ("new_field: 1\n", "unknown EgoDenoiserConfig fields \\['new_field'\\]"),
    ("d_cond: 100\n", "d_cond=100"),
])
def test_unsupported_or_unknown_fields_are_named(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        read_config_text(egoallo_yaml(**TINY) + extra, tmp_path)


def test_a_wrongly_typed_field_is_named(tmp_path):
    with pytest.raises(TypeError, match="num_heads='4' is a str, expected int"):
        read_config_text(egoallo_yaml(**TINY) + "num_heads: '4'\n", tmp_path)


# ---------------------------------------------------------------------------------------------
# The computation


def test_matches_egoallo_numbers_pinned_from_its_network():
    """Outputs pinned from EgoAllo's own ``EgoDenoiser`` (network.py at commit 0c20ae8, rotary-embedding-torch
    0.8.6, torch 2.13 CPU) loaded with these weights and called with EgoAllo's t = 1000, 1."""
    config = EgoAlloConfig(**TINY)
    model = EgoAlloDenoiser(config)
    model.load_state_dict(synthetic_tensors(config), strict=True)
    x_t, cond = _inputs(config)
    with torch.no_grad():
        out = model(x_t, torch.tensor([999, 0]), cond)  # diffusers indices = EgoAllo's t - 1
    expected_first = torch.tensor(PINNED["first"])
    expected_last = torch.tensor(PINNED["last"])
    assert torch.allclose(out[0, 0, :4], expected_first, atol=1e-5), out[0, 0, :4]
    assert torch.allclose(out[1, -1, -4:], expected_last, atol=1e-5), out[1, -1, -4:]
    assert math.isclose(float(out.sum()), PINNED["sum"], rel_tol=1e-5, abs_tol=1e-3)
    assert math.isclose(float(out.square().sum()), PINNED["sum_sq"], rel_tol=1e-5)


PINNED = {"first": [0.13300723, 0.15116975, -0.45545998, 0.16643149],
          "last": [-0.11499105, 0.45611754, -0.34126961, -0.14404783], "sum": -113.604599, "sum_sq": 1055.304199}


def test_rope_rotates_adjacent_pairs_by_the_stored_frequencies():
    rope = StoredRotaryEmbedding(8)
    rope.freqs.copy_(torch.tensor([0.3, -1.1, 0.05, 2.0]))
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    # Independent form: pair (2i, 2i+1) as the complex number x_2i + j x_2i+1, times exp(j * position * freqs[i]).
    angles = torch.arange(6.0, dtype=torch.float64)[:, None] * rope.freqs.double()
    expected = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (4, 2)).contiguous())
                                  * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    assert torch.allclose(rope(x.float()).double(), expected, atol=1e-5)


def test_the_stored_frequencies_drive_the_output():
    config = EgoAlloConfig(**TINY)
    model = EgoAlloDenoiser(config)
    model.load_state_dict(synthetic_tensors(config), strict=True)
    x_t, cond = _inputs(config)
    t = torch.tensor([500, 3])
    with torch.no_grad():
        before = model(x_t, t, cond)
        model.decoder_layers[0].rotary_emb.freqs.mul_(1.5)  # one block's frequencies
        after = model(x_t, t, cond)
    assert not torch.allclose(before, after, atol=1e-4)


def test_timestep_index_k_reads_noise_embedding_row_k(tiny_folder):
    model = load_denoiser(tiny_folder)
    tokens = []
    model.noise_emb_token_proj.register_forward_hook(lambda module, args, out: tokens.append(args[0]))
    x_t, cond = _inputs(model.config)
    with torch.no_grad():
        model(x_t, torch.tensor([999, 0]), cond)
    # EgoAllo's t = 1000 and 1 read rows t - 1 = 999 and 0: the offset is applied exactly once.
    assert torch.equal(tokens[0], model.noise_emb.weight[[999, 0]])
    for bad in (torch.tensor([1000, 0]), torch.tensor([-1, 0]), torch.tensor([3.5, 0.0])):
        with pytest.raises(ValueError, match="diffusers"):
            model(x_t, bad, cond)


def test_the_sampler_reads_the_rows_of_egoallos_grid_minus_one(tiny_folder):
    model = load_denoiser(tiny_folder)
    rows = []
    model.noise_emb.register_forward_hook(lambda module, args, out: rows.append(int(args[0][0])))
    motion = sample_prior(model, make_scheduler(), _head_trajectory(1, 4), torch.Generator().manual_seed(0),
                          include_hands=True)
    assert rows == (sampling_timesteps(30, convention="egoallo")[:-1] - 1).tolist()  # 999, 840, ..., 3, 0
    assert rows[0] == 999 and rows[-1] == 0
    assert motion.hand_rotmats is not None and motion.body_rotmats.shape == (1, 4, 21, 3, 3)
    assert torch.isfinite(motion.hand_rotmats).all() and torch.isfinite(motion.contacts).all()


# ---------------------------------------------------------------------------------------------
# The recipes take --prior FOLDER


def test_both_recipes_parse_prior_folder(tiny_folder, tmp_path):
    main = tyro.cli(ego_job.Config, args=["--prior", str(tiny_folder), "--task.include-hands"])
    assert main.prior == tiny_folder
    evaluation = tyro.cli(eval_ego_motion_recipe.Config, args=["--prior", str(tiny_folder)])
    assert evaluation.prior == tiny_folder
    old = eval_ego_motion_recipe.Config(checkpoint=tiny_folder)  # the deprecated alias
    assert old.prior == tiny_folder and old.checkpoint is None
    (tmp_path / "not_a_checkpoint").mkdir()
    with pytest.raises(FileNotFoundError, match="has no checkpoints_<N> folder"):
        ego_job.Config(prior=tmp_path / "not_a_checkpoint")


def test_one_grpo_iteration_and_the_evaluation_on_an_egoallo_folder(tiny_folder, tmp_path):
    recipe = ego_job
    task = recipe.EgoMotionTaskConfig(window_frames=32, include_hands=True, num_sampling_steps=6)
    probe = recipe.ProbeConfig(splits=("validation",), conditions_per_split=2, noises_per_condition=1, eval_every=1)
    grpo = dataclasses.replace(recipe.default_grpo(), num_iterations=1, conditions_per_iteration=2, group_size=3,
                               micro_batch_size=6, checkpoint_every=1, probe=probe, diagnostics_every=0)
    cfg = recipe.Config(output_dir=tmp_path / "grpo", prior=tiny_folder, eval_max_windows=2, use_tto=False,
                        use_perceptual_reward=False, task=task, grpo=grpo)
    before = load_denoiser(tiny_folder).state_dict()
    results = recipe.main(cfg)
    assert set(results["grpo"]) == set(recipe.METRIC_UNITS)
    assert all(math.isfinite(v) for v in results["grpo"].values())
    saved = load_file(str(cfg.output_dir / "checkpoints" / "step_000001" / "shared.safetensors"))
    policy = {k.removeprefix("model."): v for k, v in saved.items() if k.startswith("model.")}
    assert policy.keys() == before.keys()  # the post-trained policy keeps EgoAllo's keys
    unchanged = sorted(k for k in before if torch.equal(policy[k], before[k]))
    assert unchanged == ["decoder_layers.0.rotary_emb.freqs", "encoder_layers.0.rotary_emb.freqs"]  # all else moved
    exported = load_denoiser(results["prior"]).state_dict()  # the job's export, in EgoAllo's layout: that policy
    assert results["prior"] == str(cfg.output_dir / "prior")
    assert exported.keys() == policy.keys() and all(torch.equal(exported[k], policy[k]) for k in policy)
    with pytest.raises(ValueError, match="pass --task.include-hands True"):
        recipe.main(dataclasses.replace(cfg, output_dir=tmp_path / "no_hands",
                                        task=dataclasses.replace(task, include_hands=False)))
    assert all(torch.equal(before[k], v) for k, v in load_denoiser(tiny_folder).state_dict().items())

    evaluation = eval_ego_motion_recipe
    ecfg = evaluation.Config(prior=tiny_folder, output_dir=tmp_path / "eval", seeds=(0,), max_windows=1,
                             batch_size=1, use_tto=False, render=False, task=task,
                             stitch=evaluation.StitchConfig(window_frames=32, overlap_frames=8))
    written = evaluation.run_eval(ecfg)
    assert written["num_windows"] == 1 and written["checkpoint"] == str(tiny_folder)
    assert math.isfinite(written["metrics"]["base"]["mpjpe_mm"]["mean"])
