"""Image tokens (tasks.generators.tokens): encoded from the pixel shards once per (dicom_id, VQ-GAN id), read back
in order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.vqgan import VQGAN, VQGANConfig
from tasks.data import catalog
from tasks.data.pixels import PixelStore, write_shard
from tasks.generators import tokens
from tasks.generators.tokens import encode_cohort, TokenStore

RESOLUTION = 32
IDS = [f"dicom-{index}" for index in range(5)]


@pytest.fixture
def data_root(tmp_path) -> Path:
    """Five 32 px images (a gradient, a disc of growing size, noise) in one pixel shard."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:RESOLUTION, 0:RESOLUTION]
    images = np.stack([
        np.clip(x * 6 + 200 * ((x - 16) ** 2 + (y - 16) ** 2 < (3 + 2 * index) ** 2) + rng.normal(0, 8, x.shape),
                0, 255).astype(np.uint8)
        for index in range(len(IDS))
    ])
    write_shard(tmp_path, RESOLUTION, "images-a", images)
    catalog.write_part(tmp_path, "pixels", "images-a", [
        {"dicom_id": dicom_id, "resolution": RESOLUTION, "shard": "images-a", "shard_row": row}
        for row, dicom_id in enumerate(IDS)
    ])
    return tmp_path


@pytest.fixture
def vqgan() -> VQGAN:
    torch.manual_seed(0)
    config = VQGANConfig(resolution=RESOLUTION, in_channels=1, out_ch=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                         attn_resolutions=(), z_channels=8, n_embed=16, embed_dim=8)
    return VQGAN(config)


def count_encodes(monkeypatch, vqgan: VQGAN) -> list[int]:
    """Record the batch size of every encode_to_indices call on `vqgan`."""
    calls: list[int] = []
    encode = vqgan.encode_to_indices

    def counting(images):
        calls.append(len(images))
        return encode(images)

    monkeypatch.setattr(vqgan, "encode_to_indices", counting)
    return calls


def test_tokens_round_trip_in_the_order_asked(data_root, vqgan):
    counts = encode_cohort(data_root, vqgan, "vq-a", IDS, RESOLUTION, batch_size=2, unit_size=3, progress=False)
    assert counts == tokens.TokenCounts(encoded=5, skipped=0)
    images = torch.from_numpy(PixelStore(data_root, RESOLUTION).get_many(IDS)).float()[:, None] / 127.5 - 1.0
    expected = vqgan.encode_to_indices(images).flatten(1)
    assert expected.shape == (5, 16 * 16) and len(expected.unique()) > 1

    asked = [IDS[3], IDS[0], IDS[4]]
    got = TokenStore(data_root, "vq-a").get_many(asked)
    assert got.dtype == torch.long
    assert torch.equal(got, expected[[3, 0, 4]])
    with pytest.raises(KeyError, match="no tokens for VQ-GAN vq-a"):
        TokenStore(data_root, "vq-a").get_many(["absent"])


def test_present_tokens_are_skipped_and_another_vqgan_id_recomputes(data_root, vqgan, monkeypatch):
    encode_cohort(data_root, vqgan, "vq-a", IDS[:3], RESOLUTION, batch_size=2, unit_size=2, progress=False)
    calls = count_encodes(monkeypatch, vqgan)

    counts = encode_cohort(data_root, vqgan, "vq-a", IDS, RESOLUTION, batch_size=4, unit_size=8, progress=False)
    assert counts == tokens.TokenCounts(encoded=2, skipped=3)
    assert calls == [2]

    calls.clear()
    counts = encode_cohort(data_root, vqgan, "vq-a", IDS, RESOLUTION, batch_size=4, unit_size=8, progress=False)
    assert counts == tokens.TokenCounts(encoded=0, skipped=5)
    assert calls == []

    counts = encode_cohort(data_root, vqgan, "vq-b", IDS, RESOLUTION, batch_size=4, unit_size=8, progress=False)
    assert counts == tokens.TokenCounts(encoded=5, skipped=0)
    assert len(TokenStore(data_root, "vq-a")) == len(TokenStore(data_root, "vq-b")) == 5


def test_a_killed_run_resumes_without_duplicates(data_root, vqgan, die_on_second_part):
    die_on_second_part.arm("tokens")
    with pytest.raises(RuntimeError, match="killed"):
        encode_cohort(data_root, vqgan, "vq-a", IDS, RESOLUTION, batch_size=2, unit_size=2, progress=False)
    die_on_second_part.disarm()

    assert len(TokenStore(data_root, "vq-a")) == 2
    counts = encode_cohort(data_root, vqgan, "vq-a", IDS, RESOLUTION, batch_size=2, unit_size=2, progress=False)
    assert counts == tokens.TokenCounts(encoded=3, skipped=2)
    with catalog.connect(data_root) as con:
        stored = con.table("tokens").to_arrow_table()["dicom_id"].to_pylist()
    assert sorted(stored) == IDS
