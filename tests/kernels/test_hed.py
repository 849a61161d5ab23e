"""HED annotator layout, loading, strictness and post-processing; Canny; control-image fitting."""


import numpy as np
import pytest
import safetensors.torch
import torch

from dit_control.kernels.canny import canny_edges
from dit_control.kernels.control_image import edges_to_control_rgb, fit_control_image
from dit_control.kernels.hed import (
    HEDCheckpointError,
    HEDNetwork,
    hed_edges,
    hed_expected_shapes,
    load_hed,
    read_hed_file,
)

# Layout of ControlNetHED.pth (lllyasviel/Annotators), read from PixArt-alpha/PixArt-alpha@cac2fd3b
# diffusion/model/hed.py: ControlNetHED_Apache2 = norm [1,3,1,1] + block1..5 = DoubleConvBlock
# (3->64, 2 convs), (64->128, 2), (128->256, 3), (256->512, 3), (512->512, 3); 3×3 convs in
# `convs.<i>`, a 1×1 `projection` to one channel. The reference loads it with strict load_state_dict.
_STAGES = [("block1", 3, 64, 2), ("block2", 64, 128, 2), ("block3", 128, 256, 3),
           ("block4", 256, 512, 3), ("block5", 512, 512, 3)]
RELEASED_LAYOUT = {"norm": (1, 3, 1, 1)}
for _name, _cin, _cout, _n in _STAGES:
    for _i in range(_n):
        RELEASED_LAYOUT[f"{_name}.convs.{_i}.weight"] = (_cout, _cin if _i == 0 else _cout, 3, 3)
        RELEASED_LAYOUT[f"{_name}.convs.{_i}.bias"] = (_cout,)
    RELEASED_LAYOUT[f"{_name}.projection.weight"] = (1, _cout, 1, 1)
    RELEASED_LAYOUT[f"{_name}.projection.bias"] = (1,)
RELEASED_PARAMS = 14_716_168  # 29.4 MB in fp16, the size of the release


def random_hed_state_dict(dtype=torch.float16) -> dict:
    torch.manual_seed(0)
    sd = {k: v.to(dtype) for k, v in HEDNetwork().state_dict().items()}
    sd["norm"] = torch.tensor([120.0, 115.0, 105.0], dtype=dtype).view(1, 3, 1, 1)
    return sd


@pytest.fixture(scope="module")
def fp16_sd():
    return random_hed_state_dict()


def test_layout_matches_release():
    shapes = hed_expected_shapes()
    assert shapes == RELEASED_LAYOUT
    assert list(shapes) == list(RELEASED_LAYOUT)  # same order as the reference module registers them
    count = sum(int(np.prod(s)) for s in shapes.values())
    print(f"HED tensors={len(shapes)} parameters={count:,}")
    assert len(shapes) == 37 and count == RELEASED_PARAMS


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_file_round_trip_and_run(tmp_path, fp16_sd, suffix):
    path = tmp_path / f"ControlNetHED{suffix}"
    if suffix == ".pth":
        torch.save(fp16_sd, path)
    else:
        safetensors.torch.save_file(fp16_sd, str(path))
    net = load_hed(read_hed_file(path))
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in net.parameters())
    assert not net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, fp16_sd[k].float()), k
    image = torch.rand(1, 3, 64, 96)
    sides = net(image * 255)
    assert [tuple(s.shape) for s in sides] == [(1, 1, 64 >> i, 96 >> i) for i in range(5)]
    edges = hed_edges(net, image)
    assert edges.shape == (1, 1, 64, 96) and edges.dtype == torch.float32
    assert torch.isfinite(edges).all() and edges.min() >= 0 and edges.max() <= 1


def test_post_processing_is_mean_of_upsampled_sides_then_sigmoid():
    # Zero convs and side biases b1..b5: every side map is the constant b_i, so edges = sigmoid(mean b).
    sd = {k: torch.zeros(s) for k, s in hed_expected_shapes().items()}
    biases = [2.0, -1.0, 0.5, 3.0, -0.5]
    for i, b in enumerate(biases, 1):
        sd[f"block{i}.projection.bias"] = torch.tensor([b])
    edges = hed_edges(load_hed(sd), torch.rand(2, 3, 37, 50))  # odd sizes: pools floor, maps upsample
    assert edges.shape == (2, 1, 37, 50)
    torch.testing.assert_close(edges, torch.full_like(edges, torch.sigmoid(torch.tensor(0.8)).item()))


def test_norm_is_subtracted_from_image_255():
    # block1 conv0 = identity on channel 0 (centre tap 1), relu, projection reads channel 0:
    # side1 = relu(relu(255·x - norm)), so norm = 255·x gives a zero map.
    sd = {k: torch.zeros(s) for k, s in hed_expected_shapes().items()}
    sd["block1.convs.0.weight"][0, 0, 1, 1] = 1.0
    sd["block1.convs.1.weight"][0, 0, 1, 1] = 1.0
    sd["block1.projection.weight"][0, 0] = 1.0
    sd["norm"] = torch.tensor([51.0, 0.0, 0.0]).view(1, 3, 1, 1)
    net = load_hed(sd)
    image = torch.full((1, 3, 16, 16), 0.2)
    torch.testing.assert_close(net(image * 255)[0], torch.zeros(1, 1, 16, 16), atol=1e-4, rtol=0)
    brighter = torch.full((1, 3, 16, 16), 0.6)  # side1 = 153 - 51 = 102
    torch.testing.assert_close(net(brighter * 255)[0], torch.full((1, 1, 16, 16), 102.0))


def test_missing_unexpected_and_mismatched_keys_are_all_named(fp16_sd):
    sd = dict(fp16_sd)
    del sd["block3.convs.2.bias"]
    sd["block6.projection.weight"] = torch.zeros(1, 512, 1, 1)
    sd["block2.projection.weight"] = torch.zeros(1, 64, 1, 1)
    with pytest.raises(HEDCheckpointError) as info:
        load_hed(sd)
    msg = str(info.value)
    for fragment in ("block3.convs.2.bias", "block6.projection.weight", "block2.projection.weight",
                     "(1, 128, 1, 1)", "(1, 64, 1, 1)", "expected ControlNetHED.pth (lllyasviel/Annotators)"):
        assert fragment in msg, (fragment, msg)
    assert isinstance(info.value, ValueError)


def test_wrong_model_file_is_rejected():
    with pytest.raises(HEDCheckpointError, match="missing"):
        load_hed({"netVggOne.0.weight": torch.zeros(64, 3, 3, 3)})  # the older BSDS HED network


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_empty_and_truncated_files(tmp_path, fp16_sd, suffix):
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(HEDCheckpointError, match="empty") as info:
        read_hed_file(empty)
    assert "ControlNetHED.pth" in str(info.value)

    whole = tmp_path / f"whole{suffix}"
    if suffix == ".pth":
        torch.save(fp16_sd, whole)
    else:
        safetensors.torch.save_file(fp16_sd, str(whole))
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(HEDCheckpointError, match="truncated") as info:
        read_hed_file(cut)
    assert "ControlNetHED.pth" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(HEDCheckpointError, match="not found"):
        read_hed_file(tmp_path / "nope.pth")


def _square_image():
    img = np.zeros((48, 64, 3), np.uint8)
    img[12:36, 20:44] = (200, 80, 40)
    return img


def test_canny_square_edges_on_border_only():
    img = _square_image()
    edges = canny_edges(img, 100, 200)
    assert edges.shape == (1, 1, 48, 64) and set(edges.unique().tolist()) <= {0.0, 1.0}
    on = edges[0, 0].numpy() > 0
    ys, xs = np.nonzero(on)
    # Every edge pixel lies within one pixel of the square's outline ...
    near = np.zeros_like(on)
    near[11:37, 19:45] = True
    near[14:34, 22:42] = False
    assert near[ys, xs].all()
    # ... and each of the four sides is traced.
    assert on[11:13, 24:40].any(axis=0).all() and on[35:37, 24:40].any(axis=0).all()
    assert on[16:32, 19:21].any(axis=1).all() and on[16:32, 43:45].any(axis=1).all()


def test_canny_tensor_input_matches_array_input():
    img = _square_image()
    tensor = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
    batch = torch.cat([tensor, torch.zeros_like(tensor)])
    edges = canny_edges(batch, 100, 200)
    assert edges.shape == (2, 1, 48, 64)
    assert torch.equal(edges[0], canny_edges(img, 100, 200)[0]) and edges[1].sum() == 0


@pytest.mark.parametrize("src_hw, dst_hw", [((60, 100), (48, 64)), ((100, 60), (64, 48)),
                                            ((90, 120), (64, 64)), ((120, 90), (40, 72))])
def test_fit_center_crop_keeps_aspect(src_hw, dst_hw):
    h, w = src_hw
    image = torch.zeros(1, 3, h, w)
    image[..., h // 2 - 10:h // 2 + 10, w // 2 - 10:w // 2 + 10] = 1.0  # centred 20×20 square
    out = fit_control_image(image, *dst_hw)
    assert out.shape == (1, 3, *dst_hw)
    scale = max(dst_hw[0] / h, dst_hw[1] / w)
    mask = out[0, 0] > 0.5
    rows, cols = mask.any(dim=1).sum().item(), mask.any(dim=0).sum().item()
    # The square stays square (same scale on both axes) and has the cover scale's size.
    assert abs(rows - cols) <= 1 and abs(rows - 20 * scale) <= 1.5, (rows, cols, 20 * scale)


@pytest.mark.parametrize("src_hw, dst_hw", [((60, 100), (48, 80)), ((100, 60), (80, 48)), ((75, 100), (48, 80))])
def test_fit_pixart_app_matches_torchvision(src_hw, dst_hw):
    T = pytest.importorskip("torchvision.transforms")
    image = torch.rand(1, 3, *src_hw)
    ref = T.CenterCrop(list(dst_hw))(T.Resize(min(dst_hw), antialias=True)(image))
    torch.testing.assert_close(fit_control_image(image, *dst_hw, mode="pixart_app"), ref)


def test_fit_resize_and_control_rgb():
    image = torch.rand(2, 3, 30, 50)
    assert fit_control_image(image, 32, 32, mode="resize").shape == (2, 3, 32, 32)
    edges = torch.rand(2, 1, 8, 8)
    rgb = edges_to_control_rgb(edges)
    assert rgb.shape == (2, 3, 8, 8) and torch.equal(rgb[:, 2:], edges)
