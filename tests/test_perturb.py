import math
from dataclasses import dataclass

import noise
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffgrpo.config import PerturbConfig
from diffgrpo.perturb import (
    GaussianPerturber,
    NoPerturbation,
    PerlinPerturber,
    available_perturbers,
    get_perturber,
    perturber_from_config,
    pnoise1,
    register_perturber,
)


def reference(x: torch.Tensor, **kwargs) -> torch.Tensor:
    """noise.pnoise1 applied elementwise (the scalar C reference)."""
    values = [noise.pnoise1(v, **kwargs) for v in x.flatten().tolist()]
    return torch.tensor(values, dtype=torch.float32).view(x.shape)


def mixed_inputs(seed: int) -> torch.Tensor:
    """Negative, large, near-integer and exactly integer float32 values."""
    gen = torch.Generator().manual_seed(seed)
    parts = [
        (torch.rand(1500, generator=gen) - 0.5) * 600.0,
        torch.randn(800, generator=gen) * 2.0,
        (torch.rand(300, generator=gen) - 0.5) * 2.0e5,
        torch.arange(-300, 300, dtype=torch.float32),
        torch.arange(-50, 50, dtype=torch.float32) + 1e-3,
        torch.tensor([0.0, -0.0, 0.5, -0.5, 255.999, 256.0, -256.0, 1023.5, 1024.0, -1025.25]),
    ]
    return torch.cat(parts)


PNOISE_SETTINGS = [
    {},
    {"octaves": 3},
    {"octaves": 4, "persistence": 0.7, "lacunarity": 2.3},
    {"octaves": 6, "persistence": 0.35, "lacunarity": 1.7, "repeat": 513, "base": 3},
    {"repeat": 7},
    {"repeat": 1},
    {"octaves": 2, "persistence": 0.5, "lacunarity": 1.5, "repeat": 300},
    {"base": 17},
    {"base": 256, "repeat": 100},
    {"octaves": 3, "persistence": -0.4, "lacunarity": 0.5, "repeat": 4096},
]


def setting_id(kwargs: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"


@pytest.mark.parametrize("kwargs", PNOISE_SETTINGS, ids=setting_id)
def test_pnoise1_matches_reference_bit_for_bit(kwargs):
    x = mixed_inputs(seed=len(kwargs))
    got = pnoise1(x, **kwargs)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert (got - reference(x, **kwargs)).abs().max().item() == 0.0


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.floats(-1e5, 1e5, width=32), min_size=1, max_size=20),
    st.integers(1, 5),
    st.floats(0.1, 0.9),
    st.floats(1.1, 3.0),
    st.integers(1, 2000),
    st.integers(0, 256),
)
def test_pnoise1_property_matches_reference(values, octaves, persistence, lacunarity, repeat, base):
    x = torch.tensor(values, dtype=torch.float32)
    kwargs = dict(octaves=octaves, persistence=persistence, lacunarity=lacunarity, repeat=repeat, base=base)
    assert torch.equal(pnoise1(x, **kwargs), reference(x, **kwargs))


def test_pnoise1_shapes_layouts_and_dtypes():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 5, 3, generator=gen) * 100 - 50
    flat = pnoise1(x.flatten()).view(4, 5, 3)
    assert torch.equal(pnoise1(x), flat)
    assert torch.equal(pnoise1(x.permute(2, 0, 1)), flat.permute(2, 0, 1))
    assert torch.equal(pnoise1(x.double()), flat)  # float64 is rounded to float32 first, like the C parser
    assert pnoise1(torch.tensor(2.3)).item() == noise.pnoise1(2.3)
    assert pnoise1(torch.empty(0, 3)).shape == (0, 3)
    # Zero at lattice points; period `repeat` on x >= 0 and 256 everywhere for the default repeat.
    assert torch.equal(pnoise1(torch.arange(-5.0, 5.0)), torch.zeros(10))
    dyadic = torch.randint(0, 64 * 40, (50,), generator=gen) / 64.0  # exact under integer shifts
    assert torch.equal(pnoise1(dyadic, repeat=7), pnoise1(dyadic + 7.0, repeat=7))
    assert torch.equal(pnoise1(dyadic - 20.0), pnoise1(dyadic + 236.0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"octaves": 0}, "octaves"),
        ({"repeat": 0}, "repeat"),
        ({"base": 257}, "base"),
        ({"base": -1}, "base"),
        ({"lacunarity": math.inf, "octaves": 2}, "lacunarity"),
        ({"octaves": 2, "persistence": -1.0}, "persistence"),
        ({"octaves": 3, "lacunarity": 0.1, "repeat": 4}, "repeat"),
    ],
)
def test_pnoise1_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pnoise1(torch.tensor([0.5]), **kwargs)


def test_pnoise1_rejects_non_finite_and_out_of_range_inputs():
    with pytest.raises(ValueError, match="NaN or inf"):
        pnoise1(torch.tensor([0.5, math.nan]))
    with pytest.raises(ValueError, match="NaN or inf"):
        pnoise1(torch.tensor([math.inf]))
    with pytest.raises(ValueError, match="2\\^31"):
        pnoise1(torch.tensor([3.0e9]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pnoise1_cuda_matches_cpu():
    x = mixed_inputs(seed=3)
    for kwargs in PNOISE_SETTINGS:
        assert torch.equal(pnoise1(x.cuda(), **kwargs).cpu(), pnoise1(x, **kwargs))


# ---------------------------------------------------------------------------------------------- perturbers


def test_registry_lists_builtins_and_rejects_unknown_names():
    assert {"none", "gaussian", "perlin"} <= set(available_perturbers())
    with pytest.raises(KeyError, match="gaussian.*none.*perlin"):
        get_perturber("pink")
    with pytest.raises(ValueError, match="amplitude"):
        get_perturber("perlin", amplitude=0.1)
    with pytest.raises(ValueError, match="already registered"):
        register_perturber("perlin")(PerlinPerturber)
    assert get_perturber("perlin", scale=0.2, octaves=2) == PerlinPerturber(scale=0.2, octaves=2)


@pytest.mark.parametrize("name", ["gaussian", "perlin"])
def test_perturbers_are_seeded_shaped_and_independent_across_batch(name):
    perturber = get_perturber(name, scale=0.1)
    x = torch.zeros(2, 8, 64, 3, dtype=torch.float64)
    out_a = perturber(x, torch.Generator().manual_seed(0))
    out_b = perturber(x, torch.Generator().manual_seed(0))
    out_c = perturber(x, torch.Generator().manual_seed(1))
    assert out_a.shape == x.shape and out_a.dtype == x.dtype
    assert torch.equal(out_a, out_b)
    assert not torch.equal(out_a, out_c)
    curves = out_a.permute(0, 1, 3, 2).reshape(-1, 64)  # one curve per (batch element, channel)
    assert curves.std(dim=1).min() > 0
    corr = torch.corrcoef(curves)
    off_diagonal = corr[~torch.eye(len(curves), dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.999  # no two members/axes share a curve


def test_perlin_is_smooth_in_time_and_gaussian_is_not():
    x = torch.zeros(32, 128, 3)
    perlin = get_perturber("perlin", scale=1.0)(x, torch.Generator().manual_seed(0))
    white = get_perturber("gaussian", scale=1.0)(x, torch.Generator().manual_seed(0))

    def roughness(noise_curves):
        """Mean squared first difference over time, relative to the variance."""
        return noise_curves.diff(dim=-2).pow(2).mean() / noise_curves.var()

    assert roughness(white) > 1.5  # 2 for white noise
    assert roughness(perlin) < 0.02 * roughness(white)


def test_perlin_follows_documented_formula():
    perturber = PerlinPerturber(scale=0.3, frequency=0.1, octaves=2, offset_range=50.0)
    x = torch.randn(4, 20, 3, generator=torch.Generator().manual_seed(5))
    out = perturber(x, torch.Generator().manual_seed(9))
    offsets = torch.rand(4, 1, 3, generator=torch.Generator().manual_seed(9)) * 50.0
    positions = offsets + torch.arange(20.0)[:, None] * 0.1
    torch.testing.assert_close(out, x + 0.3 * pnoise1(positions, octaves=2), rtol=0, atol=1e-6)


def test_none_returns_input_and_channels_restrict_the_perturbation():
    x = torch.randn(3, 16, 5, generator=torch.Generator().manual_seed(0))
    assert get_perturber("none")(x, torch.Generator()) is x
    for cls in (GaussianPerturber, PerlinPerturber):
        out = cls(scale=0.5, channels=(1, -1))(x, torch.Generator().manual_seed(2))
        changed = (out != x).flatten(0, 1).any(dim=0)
        assert changed.tolist() == [False, True, False, False, True]


@pytest.mark.unchecked_annotations
def test_perturbers_validate_inputs_and_parameters():
    perlin = get_perturber("perlin")
    with pytest.raises(ValueError, match="NaN or inf"):
        perlin(torch.tensor([[0.0, math.nan]]), torch.Generator())
    with pytest.raises(ValueError, match="\\(\\.\\.\\., T, D\\)"):
        perlin(torch.zeros(5), torch.Generator())
    with pytest.raises(ValueError, match="channels"):
        PerlinPerturber(channels=(3,))(torch.zeros(2, 3), torch.Generator())
    with pytest.raises(ValueError, match="twice"):
        GaussianPerturber(channels=(0, -3))(torch.zeros(2, 3), torch.Generator())
    with pytest.raises(ValueError, match="scale"):
        GaussianPerturber(scale=-1.0)
    with pytest.raises(ValueError, match="frequency"):
        PerlinPerturber(frequency=0.0)
    with pytest.raises(ValueError, match="octaves"):
        PerlinPerturber(octaves=0)


def test_perturber_from_config_passes_the_fields_each_factory_takes():
    # The one rule (a config field goes to the factory under its own name when the factory takes it) gives
    # the built-ins exactly these arguments: perlin scale, frequency, octaves; gaussian scale; none nothing.
    perlin = PerturbConfig(name="perlin", scale=0.3, frequency=1 / 8, octaves=2)
    assert perturber_from_config(perlin) == PerlinPerturber(scale=0.3, frequency=1 / 8, octaves=2)
    assert perturber_from_config(PerturbConfig(name="gaussian", scale=0.2)) == GaussianPerturber(scale=0.2)
    assert perturber_from_config(PerturbConfig()) == NoPerturbation()
    # Further parameters come as KEY=VALUE strings (the command line's --grpo.perturb.params), as literals.
    extra = PerturbConfig(name="perlin", scale=0.1, params=("lacunarity=3.0", "channels=(0, 2)"))
    assert perturber_from_config(extra) == PerlinPerturber(scale=0.1, lacunarity=3.0, channels=(0, 2))


def test_perturb_config_refuses_parameters_the_factory_does_not_take():
    with pytest.raises(ValueError, match="amplitude"):
        PerturbConfig(name="perlin", scale=0.1, params=("amplitude=2",))
    with pytest.raises(ValueError, match="KEY=VALUE"):
        PerturbConfig(name="gaussian", scale=0.1, params=("lacunarity",))
    with pytest.raises(ValueError, match="persistence"):  # the factory's own check runs at config time
        PerturbConfig(name="perlin", scale=0.1, octaves=2, params=("persistence=-1.0",))


def test_a_registered_custom_perturber_is_configurable_by_name():
    @register_perturber("test_constant_offset")
    @dataclass(frozen=True)
    class ConstantOffset:
        scale: float = 0.0
        offset: float = 0.0

        def __call__(self, x, generator):
            return x + self.scale * self.offset

    perturber = perturber_from_config(PerturbConfig(name="test_constant_offset", scale=2.0, params=("offset=0.5",)))
    assert perturber == ConstantOffset(scale=2.0, offset=0.5)
    assert torch.equal(perturber(torch.zeros(1, 3, 2), torch.Generator()), torch.ones(1, 3, 2))
