"""The flow-matching families' pure pieces against their definitions: sigma sampling and shift,
VAE latents of images and conditions, Flux's 2x2 packing (tiny modules, no training)."""

from __future__ import annotations

import types

import pytest
import torch

from tests.tiny_flow import tiny_vae
from train.flow import flux_shift, shifted_sigmas
from train.families.flow import FluxAdapter, SD3Adapter, pack
from train.latents import latents_from_sample

FLUX_SCHEDULER = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


def test_sigmas_are_logit_normal_per_example_then_time_shifted():
    u = torch.sigmoid(torch.randn(64, generator=torch.Generator().manual_seed(3)))
    sigmas = shifted_sigmas(64, torch.Generator().manual_seed(3), 3.0)
    assert torch.allclose(sigmas, 3.0 * u / (1 + 2.0 * u))
    assert len(set(sigmas.tolist())) == 64  # one sigma per example, not one per batch
    assert torch.equal(shifted_sigmas(64, torch.Generator().manual_seed(3), 1.0), u)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.5])
def test_the_sd3_loss_draws_its_sigmas_with_the_base_schedulers_shift(shift):
    """The loss's noise levels follow the base's own FlowMatchEulerDiscreteScheduler ``shift`` (3.0 for
    SD3/3.5), whatever its value: the sigmas the transformer is given are shift(u) of the loss's draw."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    base = types.SimpleNamespace(scheduler=scheduler)
    adapter, seen = SD3Adapter(), []
    adapter.control_inputs = lambda *args: {}
    adapter.predict = lambda controlnet, base, noisy, sigmas, *rest: seen.append(sigmas) or torch.zeros_like(noisy)
    latents = torch.zeros(8, 16, 8, 8)
    adapter.loss(None, base, latents, None, {}, None, torch.Generator().manual_seed(5))
    draw = torch.Generator().manual_seed(5)
    torch.randn(latents.shape, generator=draw)  # the loss draws its noise first
    u = torch.sigmoid(torch.randn(8, generator=draw))
    expected = scheduler.config.shift * u / (1 + (scheduler.config.shift - 1) * u)
    torch.testing.assert_close(seen[0], expected)


def test_flux_training_routes_controlnet_residuals_as_the_flux_controlnet_pipeline_does(tmp_path):
    """A Flux ControlNet with fewer blocks than the base: training must add each residual after the same base
    blocks as FluxControlNetPipeline does at inference (which routing it asks the transformer for is read
    from a real pipeline call); with non-zero residuals the two routings give different outputs."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxControlNetPipeline
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.tiny_flow import CLIP, clip_tokenizer, t5_tokenizer, tiny_t5, tiny_vae
    from train.adapter import FamilyOptions

    torch.manual_seed(0)
    shape = dict(patch_size=1, in_channels=64, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                 pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    transformer = FluxTransformer2DModel(num_layers=4, num_single_layers=4, **shape)
    controlnet = FluxControlNetModel(num_layers=2, num_single_layers=2, **shape)  # no input hint block
    for module in [*controlnet.controlnet_blocks, *controlnet.controlnet_single_blocks, controlnet.controlnet_x_embedder]:
        torch.nn.init.normal_(module.weight, std=0.5)  # zero convolutions no more: residuals that steer
    transformer.eval(), controlnet.eval()

    asked = {}
    forward = transformer.forward

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        asked.update(kwargs)
        raise Stop

    transformer.forward = spy
    pipe = FluxControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), vae=tiny_vae(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP)), tokenizer=clip_tokenizer(tmp_path),
        text_encoder_2=tiny_t5(), tokenizer_2=t5_tokenizer(), transformer=transformer, controlnet=controlnet)
    with pytest.raises(Stop):
        pipe("a red circle", control_image=torch.rand(1, 3, 32, 32), height=32, width=32, num_inference_steps=1,
             max_sequence_length=8)
    transformer.forward = forward

    base = types.SimpleNamespace(transformer=transformer,
                                 options=FamilyOptions(("canny",), False, 8, 3.5))
    gen = torch.Generator().manual_seed(1)
    noisy, sigmas = torch.randn(1, 16, 4, 4, generator=gen), torch.tensor([0.6])
    hidden, pooled = torch.randn(1, 8, 32, generator=gen), torch.randn(1, 32, generator=gen)
    control = {"controlnet_cond": pack(torch.randn(1, 16, 4, 4, generator=gen)), "conditioning_scale": 1.0}
    with torch.no_grad():
        ours = FluxAdapter().predict(controlnet, base, noisy, sigmas, hidden, {"pooled_projections": pooled}, control)

        def routed(repeat: bool) -> torch.Tensor:
            from diffusers import FluxPipeline

            img_ids = FluxPipeline._prepare_latent_image_ids(1, 2, 2, "cpu", torch.float32)
            txt_ids = torch.zeros(8, 3)
            guidance = torch.full((1,), 3.5)
            blocks, singles = controlnet(hidden_states=pack(noisy), timestep=sigmas, guidance=guidance,
                                         pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=txt_ids,
                                         img_ids=img_ids, return_dict=False, **control)
            return transformer(hidden_states=pack(noisy), timestep=sigmas, guidance=guidance, pooled_projections=pooled,
                               encoder_hidden_states=hidden, txt_ids=txt_ids, img_ids=img_ids,
                               controlnet_block_samples=blocks, controlnet_single_block_samples=singles,
                               controlnet_blocks_repeat=repeat, return_dict=False)[0]

        pipeline_routing = routed(asked["controlnet_blocks_repeat"])
        other_routing = routed(not asked["controlnet_blocks_repeat"])
    assert not torch.allclose(pipeline_routing, other_routing, atol=1e-4)  # the routing matters here
    torch.testing.assert_close(ours, pipeline_routing)


def test_flux_shift_counts_packed_tokens():
    """Flux's mu is linear in the packed sequence length: 0.5 at 256 tokens, 1.15 at 4096."""
    assert flux_shift(256, FLUX_SCHEDULER) == pytest.approx(torch.e ** 0.5)
    assert flux_shift(4096, FLUX_SCHEDULER) == pytest.approx(torch.e ** 1.15)
    base = types.SimpleNamespace(scheduler=types.SimpleNamespace(config=FLUX_SCHEDULER))
    latents = torch.zeros(2, 16, 64, 64)  # a 512 px image: 32 x 32 = 1024 tokens of 2x2 patches
    assert FluxAdapter().shift(base, latents) == pytest.approx(flux_shift(1024, FLUX_SCHEDULER))


def test_image_latents_are_shifted_then_scaled():
    vae = tiny_vae()
    sample = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = (sample - vae.config.shift_factor) * vae.config.scaling_factor
    assert torch.allclose(latents_from_sample(vae.config, sample), expected)
    sd_config = types.SimpleNamespace(shift_factor=None, scaling_factor=0.18215)
    assert torch.allclose(latents_from_sample(sd_config, sample), sample * 0.18215)


@pytest.mark.parametrize("adapter, force_zeros, shifted", [
    (FluxAdapter, None, True), (SD3Adapter, True, False), (SD3Adapter, False, True)])
def test_condition_latents_are_the_condition_in_minus_one_to_one_through_the_vae(adapter, force_zeros, shifted):
    """As the ControlNet pipelines encode ``control_image``: [0, 1] -> [-1, 1], VAE sample, minus the
    shift (SD3 ControlNets with force_zeros_for_pooled_projection skip it), times the scale."""
    vae = tiny_vae().eval()
    base = types.SimpleNamespace(vae=vae)
    controlnet = types.SimpleNamespace(config=types.SimpleNamespace(force_zeros_for_pooled_projection=force_zeros))
    condition = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = adapter().condition_latents(base, controlnet, condition, torch.Generator().manual_seed(5))
        sample = vae.encode(condition * 2 - 1).latent_dist.sample(generator=torch.Generator().manual_seed(5))
    shift = vae.config.shift_factor if shifted else 0.0
    assert torch.allclose(got, (sample - shift) * vae.config.scaling_factor)


def test_flux_packing_is_2x2_patches_channel_minor_and_unpacks_to_the_latents():
    from diffusers import FluxPipeline

    b, c, h, w = 2, 16, 6, 8
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(0))
    # token (i, j) holds the 2x2 patch at rows 2i..2i+1, cols 2j..2j+1, as channel-major (c, dy, dx)
    expected = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    assert torch.equal(pack(x), expected)
    assert torch.equal(pack(x)[0, 1], torch.stack([x[0, :, 0, 2], x[0, :, 0, 3], x[0, :, 1, 2], x[0, :, 1, 3]], 1).reshape(-1))
    vae_scale = 8  # pixels per latent side
    assert torch.equal(FluxPipeline._unpack_latents(pack(x), h * vae_scale, w * vae_scale, vae_scale), x)



class LatentPipe:
    """A pipeline stand-in that returns fixed latents for ``output_type="latent"`` (packing left out)."""

    vae_scale_factor = 8

    def __init__(self, latents: torch.Tensor):
        self.latents = latents
        self.image_processor = types.SimpleNamespace(postprocess=lambda images, output_type: list(images))

    def __call__(self, **kwargs):
        assert kwargs["output_type"] == "latent"
        self.kwargs = kwargs
        return types.SimpleNamespace(images=self.latents)

    def _unpack_latents(self, latents, height, width, scale):
        return latents


@pytest.mark.parametrize("adapter", (SD3Adapter, FluxAdapter))
def test_validation_decodes_the_pipelines_latents_unscaled_then_unshifted(adapter, monkeypatch):
    """``output_type="latent"`` gives the denoiser's latents: the VAE decodes ``latents / scale + shift``."""
    from train.adapter import FamilyOptions

    vae = tiny_vae().eval()
    latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = {}

    def decode(z, return_dict=False):
        seen["z"] = z.clone()
        return (torch.zeros(z.shape[0], 3, 32, 32),)

    monkeypatch.setattr(vae, "decode", decode)
    base = types.SimpleNamespace(vae=vae, options=FamilyOptions(), transformer=flux_transformer(guidance=True))
    images = adapter().sample(LatentPipe(latents), base, torch.rand(1, 3, 32, 32), "a", 2, torch.Generator(), 2)
    assert len(images) == 2
    assert torch.allclose(seen["z"], latents / vae.config.scaling_factor + vae.config.shift_factor)


def flux_transformer(guidance: bool) -> types.SimpleNamespace:
    return types.SimpleNamespace(config=types.SimpleNamespace(guidance_embeds=guidance))


@pytest.mark.parametrize("guidance_embeds", (True, False))
def test_flux_validation_samples_at_the_guidance_the_run_trains_with(guidance_embeds, monkeypatch):
    """Flux-dev's distilled guidance is an input: validation uses --guidance_scale, not the pipeline's
    own default (7.0); a base without guidance embeds gets none."""
    from train.adapter import FamilyOptions

    vae = tiny_vae().eval()
    monkeypatch.setattr(vae, "decode", lambda z, return_dict=False: (torch.zeros(z.shape[0], 3, 32, 32),))
    base = types.SimpleNamespace(vae=vae, options=FamilyOptions(guidance_scale=2.5),
                                 transformer=flux_transformer(guidance_embeds))
    pipe = LatentPipe(torch.zeros(1, 16, 4, 4))
    FluxAdapter().sample(pipe, base, torch.rand(1, 3, 32, 32), "a", 1, torch.Generator(), 2)
    assert pipe.kwargs.get("guidance_scale") == (2.5 if guidance_embeds else None)
