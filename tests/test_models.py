"""Tests for reproduce.models: split shapes vs the facts tables, bottleneck grammar, decoder, critic."""

import math

import pytest
import torch
from torch import nn

from reproduce.models import ResDecoder, SplitModel, WGANCritic, build_split_model, parse_bottleneck

# The authors' smashed-data shapes (C,H,W) with the 8-channel bottleneck.
VGG_SMASHED = {  # cut -> {image_size: (C,H,W)}
    1: {32: (8, 32, 32), 48: (8, 48, 48), 64: (8, 64, 64)},
    2: {32: (8, 16, 16), 48: (8, 24, 24), 64: (8, 32, 32)},
    3: {32: (8, 16, 16), 48: (8, 24, 24), 64: (8, 32, 32)},
    4: {32: (8, 8, 8), 48: (8, 12, 12), 64: (8, 16, 16)},
    5: {32: (8, 8, 8), 48: (8, 12, 12), 64: (8, 16, 16)},
}
# facts: cut 1 -> img, cuts 2-4 -> img/2, cuts 5-7 -> img/4, cuts 8-10 -> img/8 (listed for 32 and 64 px).
RESNET_DIVISOR = {1: 1, 2: 2, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 8: 8, 9: 8, 10: 8}
# facts: client parameter counts of vgg11_bn_sgm (noRELU_C8S1).
VGG_CLIENT_PARAMS = {1: 6.5e3, 2: 6.5e3, 3: 85e3, 4: 85e3, 5: 390e3}


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny convs: one thread avoids oversubscription when other processes share the two cores
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("image_size", [32, 48, 64])
@pytest.mark.parametrize("cut", sorted(VGG_SMASHED))
def test_vgg_smashed_shape_matches_facts(cut, image_size):
    torch.manual_seed(0)
    model = build_split_model("vgg11_bn", 10, cut, image_size).eval()
    x = torch.randn(2, 3, image_size, image_size)
    z = model.encoder(x)
    assert model.smashed_shape == VGG_SMASHED[cut][image_size]
    assert tuple(z.shape[1:]) == VGG_SMASHED[cut][image_size]
    assert isinstance(model.encoder.head, nn.Sigmoid)
    assert torch.all((z >= 0) & (z <= 1))  # the Sigmoid at the cut
    assert torch.equal(model.server(z), model(x))
    assert model(x).shape == (2, 10)


@pytest.mark.parametrize("image_size", [32, 48, 64])
@pytest.mark.parametrize("cut", sorted(RESNET_DIVISOR))
def test_resnet_smashed_shape_matches_facts(cut, image_size):
    torch.manual_seed(0)
    model = build_split_model("resnet20", 7, cut, image_size).eval()
    x = torch.randn(2, 3, image_size, image_size)
    z = model.encoder(x)
    side = image_size // RESNET_DIVISOR[cut]
    assert model.smashed_shape == (8, side, side)
    assert tuple(z.shape[1:]) == (8, side, side)
    assert isinstance(model.encoder.head, nn.Sigmoid)
    assert torch.all((z >= 0) & (z <= 1))
    assert torch.equal(model.server(z), model(x))
    assert model(x).shape == (2, 7)


def test_split_model_is_two_separate_modules():
    model = build_split_model("vgg11_bn", 10, 4, 32)
    assert isinstance(model, SplitModel)
    enc = {id(p) for p in model.encoder.parameters()}
    srv = {id(p) for p in model.server.parameters()}
    assert enc and srv and not enc & srv
    assert len(enc) + len(srv) == len(list(model.parameters()))
    # train mode: gradient of a server loss reaches the encoder through the smashed data
    x = torch.randn(4, 3, 32, 32)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.encoder.parameters())


@pytest.mark.parametrize("cut", sorted(VGG_CLIENT_PARAMS))
def test_vgg_client_param_counts_match_facts(cut):
    n = _count(build_split_model("vgg11_bn", 10, cut, 32).encoder)
    assert n == pytest.approx(VGG_CLIENT_PARAMS[cut], rel=0.02)


def test_vgg_cut4_client_params_with_extra_layer():
    plain = _count(build_split_model("vgg11_bn", 10, 4, 32).encoder)
    extra = _count(build_split_model("vgg11_bn", 10, 4, 32, extra_client_layer=True).encoder)
    assert plain == pytest.approx(85e3, rel=0.01)
    assert extra == pytest.approx(93e3, rel=0.01)


@pytest.mark.parametrize("image_size,flat", [(32, 512), (48, 512), (64, 2048)])
def test_vgg_classifier_input_follows_image_size(image_size, flat):
    model = build_split_model("vgg11_bn", 5, 4, image_size)
    linears = [m for m in model.server.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(flat, 512), (512, 512), (512, 5)]
    assert sum(isinstance(m, nn.Dropout) for m in model.server.classifier) == 2


def test_vgg_init_xavier_client_default_server():
    torch.manual_seed(0)
    model = build_split_model("vgg11_bn", 10, 4, 32)
    for m in model.encoder.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert m.weight.abs().max() <= bound
            assert m.weight.abs().max() > 0.9 * bound  # uniform over the whole xavier range
            assert torch.all(m.bias == 0)
    server_convs = [m for m in model.server.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.bias.abs().sum() > 0 for m in server_convs)  # PyTorch default init, not zeroed


def test_resnet_init_he_normal_on_client_and_server_bottleneck():
    torch.manual_seed(0)
    model = build_split_model("resnet20", 10, 5, 32)
    convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    convs += [m for m in model.server.features.bottleneck.modules() if isinstance(m, nn.Conv2d)]
    for m in convs:
        expected = math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels))
        if m.weight.numel() > 500:
            assert m.weight.std().item() == pytest.approx(expected, rel=0.15)
    blocks = [m for m in model.server.features.layers.modules() if isinstance(m, nn.Conv2d)]
    fan_in_bound = [1.0 / math.sqrt(m.in_channels * 9) for m in blocks]
    assert all(
        m.weight.abs().max() <= b + 1e-6 for m, b in zip(blocks, fan_in_bound)
    )  # default (kaiming-uniform a=sqrt5)


def test_resnet_structure():
    model = build_split_model("resnet20", 10, 10, 32)
    stem = model.encoder.layers[0][0]
    assert (stem.in_channels, stem.out_channels, stem.kernel_size) == (3, 16, (5, 5))
    widths = [blk.conv2.out_channels for blk in model.encoder.layers[1:]]
    assert widths == [32] * 3 + [64] * 3 + [128] * 3
    assert model.server.classifier.in_features == 128
    # option-A shortcuts have no parameters
    assert _count(model.encoder.layers[1].shortcut) == 0


def test_resnet_extra_client_layer_adds_conv16():
    plain = build_split_model("resnet20", 10, 5, 64)
    extra = build_split_model("resnet20", 10, 5, 64, extra_client_layer=True)
    assert extra.smashed_shape == plain.smashed_shape == (8, 16, 16)
    assert len(extra.encoder.layers) == len(plain.encoder.layers) + 1
    conv = extra.encoder.layers[1][0]
    assert (conv.in_channels, conv.out_channels) == (16, 16)
    assert _count(extra.server) == _count(plain.server)


def test_vgg_extra_client_layer_first_conv_is_3_to_16():
    model = build_split_model("vgg11_bn", 10, 3, 32, extra_client_layer=True)
    first = model.encoder.layers[0][0]
    assert (first.in_channels, first.out_channels) == (3, 16)
    assert model.encoder.layers[1][0].in_channels == 16
    assert model.smashed_shape == (8, 16, 16)


def test_non_sigmoid_variant_puts_batchnorm_at_the_cut():
    model = build_split_model("vgg11_bn", 10, 4, 32, sigmoid=False).eval()
    assert isinstance(model.encoder.head, nn.BatchNorm2d) and model.encoder.head.num_features == 8
    assert not any(isinstance(m, nn.Sigmoid) for m in model.encoder.modules())
    z = model.encoder(torch.randn(2, 3, 32, 32))
    assert (z < 0).any()  # not squashed into (0,1)


@pytest.mark.parametrize(
    "option,expected",
    [
        ("noRELU_C8S1", (8, 3, 1, False)),
        ("norelu_C8S1", (8, 3, 1, False)),
        ("noReLUC4", (4, 3, 1, False)),
        ("C8S2", (8, 3, 2, True)),
        ("K5C16S1", (16, 5, 1, True)),
        ("noRELU_K7C2S4", (2, 7, 4, False)),
        ("C12", (12, 3, 1, True)),
    ],
)
def test_bottleneck_grammar(option, expected):
    spec = parse_bottleneck(option)
    assert (spec.channels, spec.kernel, spec.stride, spec.relu) == expected


@pytest.mark.parametrize(
    "option", ["", "C", "X8", "C8S3", "K4C8", "C0", "noRELU_C8S1x", "relu_C8", "c8s1", "C8S1 ", "noRELU__C8", "S1C8"]
)
def test_bottleneck_grammar_rejects_bad_strings(option):
    with pytest.raises(ValueError, match="bottleneck"):
        parse_bottleneck(option)
    with pytest.raises(ValueError, match="bottleneck"):
        build_split_model("vgg11_bn", 10, 4, 32, bottleneck=option)


def test_bottleneck_none_keeps_cut_channels():
    assert parse_bottleneck("none").channels is None
    vgg = build_split_model("vgg11_bn", 10, 4, 32, bottleneck="none")
    assert vgg.smashed_shape == (128, 8, 8)
    res = build_split_model("resnet20", 10, 5, 32, bottleneck="none")
    assert res.smashed_shape == (64, 8, 8)
    x = torch.randn(2, 3, 32, 32)
    assert vgg(x).shape == res(x).shape == (2, 10)


@pytest.mark.parametrize(
    "arch,cut,option,shape",
    [
        ("vgg11_bn", 4, "C8S2", (8, 4, 4)),
        ("vgg11_bn", 4, "noRELU_C16S4", (16, 2, 2)),
        ("vgg11_bn", 1, "K5C8S1", (8, 32, 32)),
        ("resnet20", 5, "C8S2", (8, 4, 4)),
    ],
)
def test_bottleneck_stride_and_kernel(arch, cut, option, shape):
    model = build_split_model(arch, 10, cut, 32, bottleneck=option).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model.smashed_shape == shape
    assert model.encoder(x).shape[1:] == shape
    assert model(x).shape == (2, 10)
    n_relu = sum(isinstance(m, nn.ReLU) for m in model.encoder.bottleneck.modules())
    assert (n_relu > 0) == (not option.startswith("noRELU"))


def test_bottleneck_stride_must_divide_cut_size():
    with pytest.raises(ValueError, match="bottleneck"):
        build_split_model("vgg11_bn", 10, 7, 48, bottleneck="C8S4")  # 6x6 at the cut


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(arch="vgg16"), ValueError, "arch"),
        (dict(cut=0), ValueError, "cut"),
        (dict(cut=14), ValueError, "cut"),
        (dict(arch="resnet20", cut=11), ValueError, "cut"),
        (dict(image_size=16), ValueError, "image_size"),
        (dict(image_size=32.0), TypeError, "image_size"),
        (dict(num_classes=0), ValueError, "num_classes"),
        (dict(cut=1, extra_client_layer=True), ValueError, "extra_client_layer"),
    ],
)
def test_factory_rejects_bad_arguments(kwargs, exc, match):
    args = dict(arch="vgg11_bn", num_classes=10, cut=4, image_size=32)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        build_split_model(**args)


@pytest.mark.parametrize(
    "in_ch,in_size,out_size,out_ch",
    [
        (8, 8, 32, 3),
        (8, 16, 32, 3),
        (8, 32, 32, 3),
        (8, 12, 48, 3),
        (8, 16, 64, 3),
        (4, 4, 64, 1),
        (16, 3, 48, 3),
    ],
)
def test_decoder_output_shape(in_ch, in_size, out_size, out_ch):
    torch.manual_seed(0)
    dec = ResDecoder(in_ch, in_size, out_size, out_channels=out_ch, num_blocks=2, width=16)
    out = dec(torch.rand(2, in_ch, in_size, in_size))
    assert out.shape == (2, out_ch, out_size, out_size)
    assert torch.all((out > 0) & (out < 1))
    n_up = sum(isinstance(m, nn.ConvTranspose2d) for m in dec.modules())
    assert n_up == int(math.log2(out_size // in_size))


def test_decoder_default_is_res_norm_n8_c64():
    dec = ResDecoder(8, 8, 32)
    blocks = [m for m in dec.net if type(m).__name__ == "ResBlock"]
    assert len(blocks) == 1 + 8 + 1
    convt = [m for m in dec.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(convt) == 2 and all(
        (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.output_padding)
        == (64, 64, (3, 3), (2, 2), (1, 1), (1, 1))
        for m in convt
    )
    assert len([m for m in ResDecoder(8, 8, 32, num_blocks=4).net if type(m).__name__ == "ResBlock"]) == 6


@pytest.mark.parametrize("in_size,out_size", [(12, 32), (8, 24), (16, 8), (8, 40)])
def test_decoder_rejects_non_power_of_two_ratio(in_size, out_size):
    with pytest.raises(ValueError, match="out_size"):
        ResDecoder(8, in_size, out_size)


def test_decoder_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match="ResDecoder"):
        ResDecoder(8, 8, 32, num_blocks=1, width=8)(torch.rand(2, 8, 16, 16))


@pytest.mark.parametrize("image_size", [32, 48, 64])
def test_critic_output_shape(image_size):
    critic = WGANCritic(3, image_size)
    x = torch.randn(5, 3, image_size, image_size, requires_grad=True)
    score = critic(x)
    assert score.shape == (5,)
    score.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert sum(isinstance(m, nn.InstanceNorm2d) and m.affine for m in critic.modules()) == 2


def test_critic_rejects_wrong_size():
    with pytest.raises(ValueError, match="WGANCritic"):
        WGANCritic(3, 32)(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="image_size"):
        WGANCritic(3, 4)
