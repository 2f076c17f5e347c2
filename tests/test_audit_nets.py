"""The inversion decoder for any feature shape: flat features, maps of any size, non-square images."""

import pytest
import torch
from torch import nn

from cem_fast.audit.nets import InversionDecoder, ResDecoder, build_decoder


@pytest.mark.parametrize(
    "feature_shape,image_shape",
    [
        ((64,), (3, 32, 32)),
        ((10,), (1, 28, 28)),
        ((8, 11, 11), (3, 32, 32)),
        ((4, 7, 5), (3, 24, 20)),
        ((16, 40, 40), (3, 32, 32)),
        ((8, 5, 5), (3, 48, 48)),
    ],
)
def test_inversion_decoder_any_shape(feature_shape, image_shape):
    torch.manual_seed(0)
    dec = build_decoder(feature_shape, image_shape, num_blocks=1, width=8)
    assert isinstance(dec, InversionDecoder)
    out = dec(torch.rand(2, *feature_shape))
    assert out.shape == (2, *image_shape)
    assert torch.all((out > 0) & (out < 1))


def test_flat_features_get_a_linear_stem():
    dec = InversionDecoder((64,), (3, 32, 32), num_blocks=0, width=8)
    assert isinstance(dec.stem[0], nn.Linear) and dec.stem[0].out_features == 8 * 8 * 8
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in dec.modules()) == 2  # 8 -> 16 -> 32


def test_power_of_two_maps_keep_the_papers_decoder():
    dec = build_decoder((8, 8, 8), (3, 32, 32), num_blocks=2, width=16)
    assert type(dec) is ResDecoder and dec.in_size == 8 and dec.out_size == 32


def test_inversion_decoder_rejects_bad_shapes():
    with pytest.raises(ValueError, match="feature_shape"):
        InversionDecoder((4, 4), (3, 32, 32))
    with pytest.raises(ValueError, match="InversionDecoder expects"):
        InversionDecoder((64,), (3, 32, 32), num_blocks=0, width=4)(torch.rand(2, 63))
