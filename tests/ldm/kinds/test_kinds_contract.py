"""The contract every registered conditioning kind keeps (ldm/kinds/base.py), run for each of them at tiny size from
its entry in tests/kinds.py: a new kind is one module under ldm/kinds/ plus that entry."""
import numpy as np
import pytest
import torch

from kinds import TINY, cache_batch
from ldm.conditioning import Conditioner
from ldm.diffusion import Schedule, diffusion_loss
from ldm.kinds import KINDS, CacheMismatch, kind_of
from ldm.latent_scale import LatentScale
from ldm.model import LatentDiffusion
from ldm.sampling import generate
from pipeline.evaluate.held_out import HeldOut
from pipeline.presets import load_config

BASE_MANIFEST = {"preprocess": {}, "text_encoder": {"kind": "none"}, "totals": {"labels": {"none": 1}}}


def merged(a: dict, b: dict) -> dict:
    """The manifest `a` with each section of `b` laid over its own (one level deep)."""
    return {k: {**a.get(k, {}), **b.get(k, {})} for k in {*a, *b}}


def setup(name: str, *extra: str):
    cfg = load_config("tiny", overrides=(*TINY[name].overrides, *extra))
    model = LatentDiffusion(cfg).eval()
    f = cfg.autoencoder.downsample_factor
    encode = lambda px: torch.zeros(px.shape[0], 4, px.shape[1] // f, px.shape[2] // f)  # noqa: E731 - a first stage
    return cfg, model, Conditioner.build(model, latent_scale=LatentScale(1.0, 0.0), encode=encode)


def request_prompts(kind, request: dict) -> list:
    values = {i.name: [i.decode(v) for v in request[i.name]] for i in kind.inputs}
    return kind.from_inputs(values, 2) if kind.inputs else [""] * 2


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_kind_has_an_entry_and_validates(name):
    assert name in TINY, f"kind {name!r} is registered but has no entry in tests/kinds.py"
    cfg = load_config("tiny", overrides=TINY[name].overrides)
    assert cfg.conditioning.kind == name and kind_of(name).name == name


@pytest.mark.parametrize("name", sorted(TINY))
def test_the_kind_names_what_its_cache_must_hold(name):
    kind, cfg = kind_of(name), load_config("tiny", overrides=TINY[name].overrides)
    kind.check_cache(cfg, merged(BASE_MANIFEST, TINY[name].manifest), "cache")
    if TINY[name].manifest:  # a cache without what the kind trains on is refused with a message naming the fix
        with pytest.raises(CacheMismatch, match="cache"):
            kind.check_cache(cfg, BASE_MANIFEST, "cache")
    assert set(kind.columns(cfg, False)) <= set(cache_batch(kind.columns(cfg, False), 1))


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_training_batch_gives_the_condition_and_its_null_where_dropped(name):
    cfg, model, c = setup(name)
    batch = cache_batch(c.kind.columns(cfg, False), 4)
    drop = torch.tensor([False, True, False, True])

    def cond(d):
        return c.batch(batch, d, torch.Generator().manual_seed(0))
    mixed, kept, null = cond(drop), cond(torch.zeros(4, dtype=torch.bool)), cond(torch.ones(4, dtype=torch.bool))
    assert set(mixed) == set(kept) == set(null)
    for k in mixed:
        assert torch.equal(mixed[k][drop], null[k][drop]) and torch.equal(mixed[k][~drop], kept[k][~drop]), k
    if cfg.conditioning.cond_drop_prob or not c.kind.dense:  # a null that is the condition itself guides nothing
        assert any(not torch.equal(kept[k], null[k]) for k in kept) or not kept
    z = torch.randn(4, 4, 8, 8)
    assert model(z, torch.tensor([1, 5, 50, 99]), **mixed).shape == z.shape


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_request_samples_through_the_kind_end_to_end(name):
    cfg, model, c = setup(name)
    prompts = request_prompts(c.kind, TINY[name].request)
    prompts, size = c.kind.canvas(c, prompts, None, (16, 16))
    shape = (4, *(v // 2 for v in (size or (16, 16))))
    cond, uncond = c.prompts(prompts)
    assert (uncond is None) == (not c.guided)
    decode = lambda z: torch.nn.functional.interpolate(z[:, :3], scale_factor=2.0)  # noqa: E731
    images = generate(model, c, LatentScale(1.0, 0.0), decode, prompts, shape, torch.linspace(0.99, 0.01, 100),
                      steps=2, cfg_scale=3.0, seeds=[0, 1])
    assert images.shape == (2, 3, shape[1] * 2, shape[2] * 2) and torch.isfinite(images).all()
    assert c.kind.finish(images, prompts).shape == images.shape
    assert all(isinstance(c.kind.describe(p, i), str) for i, p in enumerate(prompts))


@pytest.mark.parametrize("name", sorted(TINY))
def test_the_kind_trains_and_samples_under_the_flow_objective(name):
    cfg, model, c = setup(name, "diffusion.objective=flow", "diffusion.timestep_sampling=logit_normal")
    g = torch.Generator().manual_seed(0)
    batch = cache_batch(c.kind.columns(cfg, False), 4)
    z0 = torch.randn(4, 4, 8, 8, generator=g)
    loss = diffusion_loss(model.train(), z0, cfg.diffusion, Schedule.from_config(cfg.diffusion), generator=g,
                          **c.batch(batch, torch.tensor([False, True, False, False]), g)).mean()
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    prompts = request_prompts(c.kind, TINY[name].request)
    prompts, size = c.kind.canvas(c, prompts, None, (16, 16))
    shape = (4, *(v // 2 for v in (size or (16, 16))))
    decode = lambda z: torch.nn.functional.interpolate(z[:, :3], scale_factor=2.0)  # noqa: E731
    images = generate(model.eval(), c, LatentScale(1.0, 0.0), decode, prompts, shape, None, steps=2, cfg_scale=3.0,
                      seeds=[0, 1], sampler="heun", parameterization=cfg.diffusion.prediction)
    assert images.shape == (2, 3, shape[1] * 2, shape[2] * 2) and torch.isfinite(images).all()


@pytest.mark.parametrize("name", sorted(TINY))
def test_default_grid_and_held_out_conditions_sample(name):
    cfg, model, c = setup(name)
    rows = cache_batch(c.kind.sample_columns, 3) if c.kind.sample_columns else {}
    rows = [{k: (v[i].tolist() if torch.is_tensor(v) else v[i]) for k, v in rows.items()} for i in range(3)]
    grid = c.kind.sample_prompts(cfg, rows, 16)
    assert len(grid) >= 1 and c.prompts(grid)[0] is not None
    n = 3
    maps = np.stack([np.pad(np.full((8, 8), 2, np.uint8), 4)] * n)
    held = HeldOut(torch.rand(n, 3, 16, 16) * 2 - 1, ("a bag",) * n, (3,) * n, True, maps, ({},) * n,
                   ([[2, 4, 4, 8, 8]],) * n)
    conditions = c.kind.held_out(cfg, held)
    assert len(conditions) == n
    prompts, _ = c.kind.canvas(c, conditions, None, (16, 16))
    assert set(c.prompts(prompts)[0]) == set(c.prompts(request_prompts(c.kind, TINY[name].request))[0])
