"""models/vqgan.py: taming layout, strict UniXGen checkpoint loading, round trips, and a tokenizer that learns.

Fast tests use a tiny config (16 px, 8x8 tokens); the slow one loads UniXGen's real checkpoint when
CXR_UNIXGEN_VQGAN_CKPT and CXR_UNIXGEN_VQGAN_YAML point at it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.vqgan import VectorQuantizer, VQGAN, VQGANConfig

TINY = dict(
    resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=32, embed_dim=16,
    n_embed=64,
)


def tiny_config(channels: int = 3, **overrides) -> VQGANConfig:
    return VQGANConfig(in_channels=channels, out_ch=channels, **{**TINY, **overrides})


def tiny_model(channels: int = 3, seed: int = 0, **overrides) -> VQGAN:
    torch.manual_seed(seed)
    model = VQGAN(tiny_config(channels, **overrides))
    with torch.no_grad():
        # Move GroupNorm affines off their 1/0 init so that a load which skipped them would show.
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def blobs(n: int = 4, channels: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth images in [-1, 1]: a few Gaussian blobs each, like organ shadows on a film."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        img = torch.zeros(size, size)
        for _ in range(3):
            cy, cx = torch.rand(2, generator=g) * 1.6 - 0.8
            sigma = 0.15 + 0.3 * torch.rand(1, generator=g)
            img += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        out.append(img / img.max() * 2 - 1)
    return torch.stack(out)[:, None].repeat(1, channels, 1, 1)


# --- layout -------------------------------------------------------------------------------------------------------


def _conv(prefix):
    return [f"{prefix}.weight", f"{prefix}.bias"]


def _resnet(prefix, shortcut=False):
    parts = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if shortcut else [])
    return [k for p in parts for k in _conv(f"{prefix}.{p}")]


def _attn(prefix):
    return [k for p in ["norm", "q", "k", "v", "proj_out"] for k in _conv(f"{prefix}.{p}")]


def _mid(prefix):
    return _resnet(f"{prefix}.block_1") + _attn(f"{prefix}.attn_1") + _resnet(f"{prefix}.block_2")


# taming's VQModel keys for TINY, written out from taming's Encoder/Decoder: widths 32 -> 64, attention at 8 px.
TAMING_KEYS = (
    _conv("encoder.conv_in")
    + _resnet("encoder.down.0.block.0")
    + _conv("encoder.down.0.downsample.conv")
    + _resnet("encoder.down.1.block.0", shortcut=True)
    + _attn("encoder.down.1.attn.0")
    + _mid("encoder.mid")
    + _conv("encoder.norm_out")
    + _conv("encoder.conv_out")
    + _conv("decoder.conv_in")
    + _mid("decoder.mid")
    + _resnet("decoder.up.1.block.0")
    + _resnet("decoder.up.1.block.1")
    + _attn("decoder.up.1.attn.0")
    + _attn("decoder.up.1.attn.1")
    + _conv("decoder.up.1.upsample.conv")
    + _resnet("decoder.up.0.block.0", shortcut=True)
    + _resnet("decoder.up.0.block.1")
    + _conv("decoder.norm_out")
    + _conv("decoder.conv_out")
    + _conv("quant_conv")
    + _conv("post_quant_conv")
    + ["quantize.embedding.weight"]
)


def test_parameter_names_and_shapes_match_taming():
    state = tiny_model(channels=1).state_dict()
    assert sorted(state) == sorted(TAMING_KEYS)
    assert state["encoder.conv_in.weight"].shape == (32, 1, 3, 3)
    assert state["encoder.down.1.block.0.nin_shortcut.weight"].shape == (64, 32, 1, 1)
    assert state["decoder.up.0.block.0.nin_shortcut.weight"].shape == (32, 64, 1, 1)
    assert state["quant_conv.weight"].shape == (16, 32, 1, 1)
    assert state["quantize.embedding.weight"].shape == (64, 16)
    assert state["decoder.conv_out.weight"].shape == (1, 32, 3, 3)


@pytest.mark.parametrize("channels", [1, 3])
def test_encode_decode_shapes(channels):
    model = tiny_model(channels)
    x = blobs(2, channels)
    indices = model.encode_to_indices(x)
    assert indices.shape == (2, 8, 8) and indices.dtype == torch.long
    assert 0 <= indices.min() and indices.max() < 64
    decoded = model.decode_indices(indices)
    assert decoded.shape == (2, channels, 16, 16)
    assert decoded.min() >= -1 and decoded.max() <= 1
    out = model(x)
    assert out.reconstruction.shape == (2, channels, 16, 16)
    assert torch.equal(out.indices, indices)
    assert out.vq_loss.ndim == 0 and torch.isfinite(out.vq_loss)
    assert 1 <= out.usage.perplexity <= 64 and 0 < out.usage.used_fraction <= 1
    # forward and decode_indices share the decoder: eval-mode forward equals decoding its indices, up to the clamp.
    assert torch.allclose(out.reconstruction.clamp(-1, 1), decoded, atol=1e-5)
    assert model.get_last_layer() is model.decoder.conv_out.weight


def test_grayscale_xray_on_rgb_model_is_repeated_in_and_averaged_out():
    model = tiny_model(channels=3)
    gray = blobs(2, channels=1)
    indices = model.encode_to_indices(gray)
    assert torch.equal(indices, model.encode_to_indices(gray.repeat(1, 3, 1, 1)))
    back = model.decode_indices(indices, grayscale=True)
    assert back.shape == (2, 1, 16, 16)
    assert torch.allclose(back, model.decode_indices(indices).mean(1, keepdim=True))


@pytest.mark.parametrize("shape", [(1, 2, 16, 16), (1, 3, 15, 16), (3, 16, 16)])
def test_bad_image_shapes_are_rejected(shape):
    with pytest.raises(ValueError, match="expected images"):
        tiny_model(3).encode_to_indices(torch.zeros(shape))


def test_config_rejects_what_taming_cannot_build():
    with pytest.raises(ValueError, match="multiples of 32"):
        tiny_config(ch=16)
    with pytest.raises(ValueError, match="double_z"):
        tiny_config(double_z=True)


# --- quantizer ------------------------------------------------------------------------------------------------------


def test_quantizer_picks_nearest_code_reports_usage_and_passes_gradients_straight_through():
    quantizer = VectorQuantizer(n_embed=8, embed_dim=2, beta=0.25, restart_after=None)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.arange(16.0).view(8, 2))
    # Latents sitting 0.1 off codes 1 and 5, half each: [B=1, 2, h=2, w=2].
    codes = torch.tensor([[1, 5], [5, 1]])
    z = (quantizer.embedding.weight[codes] + 0.1).permute(2, 0, 1)[None].detach().requires_grad_(True)
    z_q, loss, indices, usage = quantizer(z)
    assert torch.equal(indices, codes[None])
    assert torch.allclose(z_q, quantizer.get_codebook_entry(indices))
    assert torch.isclose(loss, torch.tensor(1.25 * 0.01))  # codebook + beta * commitment, each 0.1 ** 2
    assert torch.isclose(usage.perplexity, torch.tensor(2.0)) and usage.used_fraction == 2 / 8
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_dead_codes_are_reseeded_on_batch_latents_only_while_training():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(n_embed=8, embed_dim=4, beta=0.25, restart_after=2)
    z = 5.0 + 0.1 * torch.randn(2, 4, 3, 3)  # far from the +-1/8 init: one code wins every position, seven stay dead
    latents = z.permute(0, 2, 3, 1).reshape(-1, 4)
    quantizer.eval()
    for _ in range(3):
        quantizer(z)
    assert quantizer.embedding.weight.abs().max() <= 1 / 8, "eval forward changed the codebook"
    quantizer.train()
    for _ in range(2):
        *_, usage = quantizer(z)
    assert usage.used_fraction == 1 / 8
    _, _, indices, usage = quantizer(z)  # the third step restarts the seven codes unused for two steps
    reseeded = (quantizer.embedding.weight[:, None] == latents[None]).all(-1).any(-1)
    assert reseeded.sum() == 7
    assert usage.used_fraction > 1 / 8


# --- checkpoints ----------------------------------------------------------------------------------------------------

TRIPWIRE: list[str] = []


def _tripwire_fired() -> None:
    TRIPWIRE.append("unpickling ran code from the checkpoint")


class _Tripwire:
    def __reduce__(self):
        return _tripwire_fired, ()


class ModelCheckpoint:
    """Lightning 1.x keys checkpoint['callbacks'] by the callback class itself."""


def write_unixgen_checkpoint(directory: Path, model: VQGAN, edit=None) -> tuple[Path, Path]:
    """A Lightning .ckpt and project YAML laid out like UniXGen's mimiccxr_vqgan (taming main.py output)."""
    state = dict(model.state_dict())
    state.update({
        "loss.perceptual_loss.scaling_layer.shift": torch.randn(1, 3, 1, 1),
        "loss.perceptual_loss.scaling_layer.scale": torch.randn(1, 3, 1, 1),
        "loss.perceptual_loss.net.slice1.0.weight": torch.randn(64, 3, 3, 3),
        "loss.perceptual_loss.net.slice1.0.bias": torch.randn(64),
        "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 64, 1, 1),
        "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
        "loss.discriminator.main.0.bias": torch.randn(64),
        "loss.discriminator.main.3.weight": torch.randn(64),
        "loss.discriminator.main.3.running_mean": torch.randn(64),
        "loss.discriminator.main.3.num_batches_tracked": torch.tensor(7),
    })
    if edit:
        edit(state)
    ckpt = directory / "last.ckpt"
    torch.save(
        {
            "epoch": 41,
            "global_step": 123456,
            "pytorch-lightning_version": "1.0.8",
            "state_dict": state,
            "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1), "best_model_path": "x.ckpt"}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "params": [0, 1]}]}],
            "lr_schedulers": [],
            "hyper_parameters": {"note": _Tripwire()},
        },
        ckpt,
    )
    c = model.config
    yaml_path = directory / "2021-12-17T08-58-54-project.yaml"
    yaml_path.write_text(f"""\
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: {c.embed_dim}
    n_embed: {c.n_embed}
    ddconfig:
      double_z: false
      z_channels: {c.z_channels}
      resolution: {c.resolution}
      in_channels: {c.in_channels}
      out_ch: {c.out_ch}
      ch: {c.ch}
      ch_mult: {list(c.ch_mult)}
      num_res_blocks: {c.num_res_blocks}
      attn_resolutions: {list(c.attn_resolutions)}
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_conditional: false
        disc_in_channels: {c.in_channels}
        disc_start: 250001
        disc_weight: 0.8
        codebook_weight: 1.0
data:
  target: main.DataModuleFromConfig
  params:
    batch_size: 4
""")
    return ckpt, yaml_path


def test_unixgen_checkpoint_loads_strictly_and_reproduces_outputs(tmp_path):
    source = tiny_model(channels=3)
    ckpt, yaml_path = write_unixgen_checkpoint(tmp_path, source)
    config = VQGANConfig.from_taming_yaml(yaml_path)
    assert config == source.config
    TRIPWIRE.clear()
    loaded = VQGAN.from_checkpoint(ckpt, config)
    assert TRIPWIRE == []
    assert not loaded.training
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = blobs(2, channels=3)
    indices = loaded.encode_to_indices(x)
    assert torch.equal(indices, source.encode_to_indices(x))
    assert torch.equal(loaded.decode_indices(indices), source.decode_indices(indices))
    assert torch.equal(loaded(x).reconstruction, source(x).reconstruction)


def _drop(key):
    return lambda state: state.pop(key)


def _add(key):
    return lambda state: state.update({key: torch.zeros(1)})


@pytest.mark.parametrize(
    ("edit", "kind", "key"),
    [
        (_drop("decoder.conv_out.bias"), "missing", "decoder.conv_out.bias"),
        (_drop("quantize.embedding.weight"), "missing", "quantize.embedding.weight"),
        (_add("encoder.down.0.block.0.temb_proj.weight"), "unexpected", "encoder.down.0.block.0.temb_proj.weight"),
        (_add("quantize.used"), "unexpected", "quantize.used"),
        # Only LPIPS and the discriminator are skipped, not everything under loss.
        (_add("loss.logvar"), "unexpected", "loss.logvar"),
    ],
)
def test_checkpoint_key_problems_name_the_keys_and_the_file(tmp_path, edit, kind, key):
    source = tiny_model(channels=3)
    ckpt, yaml_path = write_unixgen_checkpoint(tmp_path, source, edit)
    with pytest.raises(ValueError) as err:
        VQGAN.from_checkpoint(ckpt, VQGANConfig.from_taming_yaml(yaml_path))
    message = str(err.value)
    assert str(ckpt) in message and f"{kind}: " in message and key in message


def test_checkpoint_for_another_config_is_a_shape_error(tmp_path):
    ckpt, _ = write_unixgen_checkpoint(tmp_path, tiny_model(channels=3))
    with pytest.raises(ValueError, match=r"shape mismatch: quantize\.embedding\.weight \(64, 16\) in file, \(32, 16\)"):
        VQGAN.from_checkpoint(ckpt, tiny_config(3, n_embed=32))


def test_legacy_format_checkpoint_loads(tmp_path):
    source = tiny_model(channels=3)
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": source.state_dict(), "epoch": 1}, path, _use_new_zipfile_serialization=False)
    loaded = VQGAN.from_checkpoint(path, source.config)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())


def test_checkpoint_without_state_dict_is_rejected(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(tiny_model().state_dict(), path)
    with pytest.raises(ValueError, match="no 'state_dict'"):
        VQGAN.from_checkpoint(path, tiny_config())


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ("taming.models.vqgan.VQModel", "taming.models.vqgan.GumbelVQ", "only taming's VQModel"),
        ("      dropout: 0.0\n", "      dropout: 0.0\n      resamp_with_conv: false\n", "resamp_with_conv"),
        ("      ch: 32\n", "", r"lacks \['ch'\]"),
    ],
)
def test_taming_yaml_that_this_model_cannot_honour_is_rejected(tmp_path, old, new, match):
    _, yaml_path = write_unixgen_checkpoint(tmp_path, tiny_model())
    yaml_path.write_text(yaml_path.read_text().replace(old, new))
    with pytest.raises(ValueError, match=match):
        VQGANConfig.from_taming_yaml(yaml_path)


def test_save_pretrained_round_trips(tmp_path):
    source = tiny_model(channels=1, dead_code_restart_after=None, beta=0.5)
    source.save_pretrained(tmp_path / "vqgan")
    assert json.loads((tmp_path / "vqgan" / "config.json").read_text())["ch_mult"] == [1, 2]
    loaded = VQGAN.from_pretrained(tmp_path / "vqgan")
    assert loaded.config == source.config
    assert not loaded.training
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = blobs(2)
    assert torch.equal(loaded(x).reconstruction, source(x).reconstruction)


# --- learning -------------------------------------------------------------------------------------------------------


def _overfit(restart_after: int | None, steps: int = 100) -> tuple[float, float, float, float]:
    """Train on four images; returns MSE and the share of codes used over the images, before and after."""
    torch.manual_seed(0)
    model = VQGAN(tiny_config(1, attn_resolutions=(), dead_code_restart_after=restart_after))
    images = blobs(4)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)

    def measure() -> tuple[float, float]:
        indices = model.encode_to_indices(images)
        with torch.no_grad():
            mse = F.mse_loss(model.decode_indices(indices), images).item()
        return mse, indices.unique().numel() / model.config.n_embed

    mse_before, _ = measure()
    model.train()
    for _ in range(steps):
        out = model(images)
        loss = F.mse_loss(out.reconstruction, images) + out.vq_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    mse_after, used_after = measure()
    return mse_before, mse_after, used_after, out.usage.perplexity.item()


def test_overfitting_lowers_mse_and_restarts_keep_the_codebook_alive():
    mse_before, mse_after, used, perplexity = _overfit(restart_after=4)
    assert mse_after < 0.05 * mse_before
    assert used >= 0.75 and perplexity >= 16
    _, mse_plain, used_plain, perplexity_plain = _overfit(restart_after=None)
    assert mse_plain < 0.05 * mse_before
    assert used_plain <= used - 0.25 and perplexity_plain < perplexity


# --- the real checkpoint --------------------------------------------------------------------------------------------


def _real_xray(size: int) -> torch.Tensor:
    """pydicom-data's chest PA film (MONOCHROME1, 15 bit) as UniXGen saw MIMIC-CXR-JPG: 8-bit range, smallest side
    resized to `size`, centre crop, [-1, 1]."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.skip("pydicom-data (a test extra) is not installed")
    ds = dcmread(path)
    pixels = torch.from_numpy(ds.pixel_array.astype("float32"))
    pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    if ds.PhotometricInterpretation == "MONOCHROME1":
        pixels = 1.0 - pixels
    h, w = pixels.shape
    scale = size / min(h, w)
    pixels = F.interpolate(pixels[None, None], size=(round(h * scale), round(w * scale)), mode="area")
    top, left = (pixels.shape[2] - size) // 2, (pixels.shape[3] - size) // 2
    return pixels[:, :, top : top + size, left : left + size] * 2 - 1


@pytest.mark.slow
def test_real_unixgen_checkpoint_reconstructs_a_chest_xray():
    ckpt, yaml_path = os.environ.get("CXR_UNIXGEN_VQGAN_CKPT"), os.environ.get("CXR_UNIXGEN_VQGAN_YAML")
    if not (ckpt and yaml_path):
        pytest.skip("set CXR_UNIXGEN_VQGAN_CKPT (last.ckpt) and CXR_UNIXGEN_VQGAN_YAML (its project.yaml)")
    config = VQGANConfig.from_taming_yaml(yaml_path)
    model = VQGAN.from_checkpoint(ckpt, config)
    assert config.n_embed == 1024 and config.latent_resolution == 32
    image = _real_xray(config.resolution)
    indices = model.encode_to_indices(image)
    assert indices.shape == (1, 32, 32)
    assert indices.unique().numel() > 100
    with torch.no_grad():
        reconstruction = model.decode_indices(indices, grayscale=True)
    assert F.mse_loss(reconstruction, image).item() < 0.02
