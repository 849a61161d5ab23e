"""Control-image preprocessing nodes (HED, Canny, Fit Control Image) through a real ComfyUI server's HTTP API."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from dit_control.tests.comfy_host import assert_documented, execution_error

OUR_NODES = ("DiTControl_HEDLoader", "DiTControl_HEDSoftEdge", "DiTControl_CannyEdge",
             "DiTControl_FitControlImage")
HED_FILE = "ControlNetHED.pth"
# A landscape test image: black, with a white square (rows 32..63, columns 48..79).
SQUARE_H, SQUARE_W = 96, 128
SQUARE = (slice(32, 64), slice(48, 80))


@pytest.fixture(scope="module")
def square_png(comfy):
    """square.png in the server's input folder (the test owns the server's base directory)."""
    img = np.zeros((SQUARE_H, SQUARE_W, 3), np.uint8)
    img[SQUARE] = 255
    folder = comfy.base_dir / "input"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(folder / "square.png")
    return img


@pytest.fixture(scope="module")
def bad_annotators(models_dir):
    """Wrong files a user might drop into models/annotators (listed: ComfyUI re-lists a folder whose mtime changed)."""
    folder = models_dir / "annotators"
    torch.save({"netVggOne.0.weight": torch.zeros(64, 3, 3, 3)}, folder / "broken.pth")  # the older BSDS HED
    (folder / "empty.pth").write_bytes(b"")
    return {"broken.pth": "missing", "empty.pth": "is empty"}


def pngs(comfy, history):
    return [np.asarray(Image.open(io.BytesIO(data))) for data in comfy.images(history)]


def load_square(node="1"):
    return {node: {"class_type": "LoadImage", "inputs": {"image": "square.png"}}}


def save(node, source, prefix):
    return {node: {"class_type": "SaveImage", "inputs": {"images": source, "filename_prefix": prefix}}}


def hed_graph(name=HED_FILE):
    return {**load_square(),
            "2": {"class_type": "DiTControl_HEDLoader", "inputs": {"hed_name": name}},
            "3": {"class_type": "DiTControl_HEDSoftEdge", "inputs": {"hed_model": ["2", 0], "image": ["1", 0]}},
            **save("4", ["3", 0], "hed/square")}


def test_nodes_are_registered_with_descriptions_and_tooltips(object_info):
    for name in OUR_NODES:
        assert_documented(object_info, name, "DiT Control/PixArt")
        info = object_info[name]
        assert info["output_tooltips"] and all(info["output_tooltips"]), name
    assert object_info["DiTControl_HEDLoader"]["output"] == ["HED_MODEL"]
    for name in OUR_NODES[1:]:
        assert object_info[name]["output"] == ["IMAGE"], name
    loader = object_info["DiTControl_HEDLoader"]["description"]
    for fragment in ("ControlNetHED.pth", "lllyasviel/Annotators", "models/annotators"):
        assert fragment in loader, fragment
    canny = object_info["DiTControl_CannyEdge"]["input"]["required"]
    assert canny["low_threshold"][1]["default"] == 100 and canny["high_threshold"][1]["default"] == 200
    fit = object_info["DiTControl_FitControlImage"]["input"]["required"]
    assert fit["mode"][1]["options"] == ["center_crop", "resize", "pixart_app"]
    assert fit["width"][1]["default"] == 1024 and fit["width"][1]["step"] == 16
    assert "centre crop" in fit["mode"][1]["tooltip"] or "centre-crop" in fit["mode"][1]["tooltip"]


def test_hed_dropdown_lists_annotators_folder(comfy, bad_annotators):
    options = comfy.get("/object_info/DiTControl_HEDLoader")["DiTControl_HEDLoader"]["input"]["required"][
        "hed_name"][1]["options"]
    assert HED_FILE in options
    assert set(bad_annotators) <= set(options)


@pytest.mark.both_hosts
def test_hed_soft_edge_matches_kernel_and_keeps_size(comfy, models_dir, square_png):
    from dit_control.kernels.control_image import edges_to_control_rgb
    from dit_control.kernels.hed import hed_edges, load_hed_file

    (out,) = pngs(comfy, comfy.run_ok(hed_graph()))
    assert out.shape == (SQUARE_H, SQUARE_W, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()

    # The same file and image through the kernels in this process: SaveImage truncates 255·x to uint8.
    net = load_hed_file(models_dir / "annotators" / HED_FILE)
    image = torch.from_numpy(square_png).permute(2, 0, 1)[None].float() / 255.0
    expected = edges_to_control_rgb(hed_edges(net, image))[0].permute(1, 2, 0).numpy()
    expected = np.clip(255.0 * expected, 0, 255).astype(np.uint8)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1

    # The random test weights are no edge detector, but the map must not be degenerate (constant or
    # saturated), or the comparison above would prove little; and the square must change it locally.
    edge = out[..., 0].astype(float)
    assert edge.std() > 10 and 20 < edge.mean() < 235 and (edge < 250).mean() > 0.9, (edge.std(), edge.mean())
    black = hed_edges(net, torch.zeros_like(image))[0, 0].numpy() * 255
    assert np.abs(edge - black)[SQUARE].max() > 40


def test_hed_batch_of_flat_images(comfy):
    g = {"1": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 32, "batch_size": 2, "color": 0x808080}},
         "2": {"class_type": "DiTControl_HEDLoader", "inputs": {"hed_name": HED_FILE}},
         "3": {"class_type": "DiTControl_HEDSoftEdge", "inputs": {"hed_model": ["2", 0], "image": ["1", 0]}},
         **save("4", ["3", 0], "hed/flat")}
    outs = pngs(comfy, comfy.run_ok(g))
    assert len(outs) == 2 and all(o.shape == (32, 48, 3) for o in outs)
    # the same computation twice: the node runs HED on one image per call (rgb.split(1)), same shapes and weights
    assert np.array_equal(outs[0], outs[1])


def test_canny_traces_the_square_border(comfy, square_png):
    g = {**load_square(),
         "2": {"class_type": "DiTControl_CannyEdge",
               "inputs": {"image": ["1", 0], "low_threshold": 100, "high_threshold": 200}},
         **save("3", ["2", 0], "canny/square")}
    (out,) = pngs(comfy, comfy.run_ok(g))
    assert out.shape == (SQUARE_H, SQUARE_W, 3) and set(np.unique(out)) <= {0, 255}
    on = out[..., 0] > 0
    near = np.zeros_like(on)
    near[31:65, 47:81] = True
    near[34:62, 50:78] = False
    assert on.any() and near[on].all()  # every edge pixel lies on the outline: black inside and outside
    assert on[31:33, 52:76].any(axis=0).all() and on[63:65, 52:76].any(axis=0).all()
    assert on[36:60, 47:49].any(axis=1).all() and on[36:60, 79:81].any(axis=1).all()


def test_canny_on_flat_image_is_black(comfy):
    g = {"1": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 24, "batch_size": 2, "color": 0xFF8000}},
         "2": {"class_type": "DiTControl_CannyEdge",
               "inputs": {"image": ["1", 0], "low_threshold": 100, "high_threshold": 200}},
         **save("3", ["2", 0], "canny/flat")}
    outs = pngs(comfy, comfy.run_ok(g))
    assert len(outs) == 2 and all(o.shape == (24, 40, 3) and not o.any() for o in outs)


@pytest.mark.parametrize("mode", ["center_crop", "resize", "pixart_app"])
def test_fit_control_image_gives_requested_size(comfy, square_png, mode):
    from dit_control.kernels.control_image import fit_control_image

    g = {**load_square(),
         "2": {"class_type": "DiTControl_FitControlImage",
               "inputs": {"image": ["1", 0], "width": 64, "height": 64, "mode": mode}},
         **save("3", ["2", 0], f"fit/{mode}")}
    (out,) = pngs(comfy, comfy.run_ok(g))
    assert out.shape == (64, 64, 3)
    image = torch.from_numpy(square_png).permute(2, 0, 1)[None].float() / 255.0
    expected = fit_control_image(image, 64, 64, mode)[0].permute(1, 2, 0).numpy()
    expected = np.clip(255.0 * expected, 0, 255).astype(np.uint8)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    if mode == "center_crop":
        # 128×96 -> cover 64×64 at scale 2/3 (86×64), crop the middle: the square stays square and centred.
        mask = out[..., 0] > 127
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        assert abs(len(rows) - len(cols)) <= 1 and abs(len(rows) - 32 * 2 / 3) <= 1.5
        assert abs((rows[0] + rows[-1]) / 2 - 31.5) <= 1 and abs((cols[0] + cols[-1]) / 2 - 31.5) <= 1


@pytest.mark.both_hosts
@pytest.mark.parametrize("name", ["broken.pth", "empty.pth"])
def test_wrong_hed_file_gives_clear_error_and_server_keeps_serving(comfy, square_png, bad_annotators, name):
    h = comfy.run(hed_graph(name))
    err = execution_error(h)
    assert err is not None and err["node_type"] == "DiTControl_HEDLoader"
    message = err["exception_message"]
    assert "ControlNetHED.pth" in message and bad_annotators[name] in message, message
    comfy.run_ok(hed_graph())


def empty_image(width, height, node="1"):
    return {node: {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": 1,
                                                          "color": 0}}}


def test_fit_refuses_a_strip_it_would_blow_up_and_stretches_it_in_resize_mode(comfy):
    g = {**empty_image(1, 8000),
         "2": {"class_type": "DiTControl_FitControlImage",
               "inputs": {"image": ["1", 0], "width": 8192, "height": 8192, "mode": "center_crop"}},
         **save("3", ["2", 0], "fit/strip")}
    err = execution_error(comfy.run(g))
    message = err and err["exception_message"]
    assert message and "a 1×8000 px image (aspect 8000:1)" in message and "8192×65536000 px" in message \
        and "limit of 256 Mi px" in message and "'resize'" in message, err
    g["2"]["inputs"].update(width=64, height=64, mode="resize")
    (out,) = pngs(comfy, comfy.run(g))
    assert out.shape[:2] == (64, 64)


def test_hed_refuses_an_image_whose_feature_maps_the_memory_cannot_hold(comfy):
    """~800 bytes of feature maps a pixel (kernels/hed.py): a square image past this machine's free memory."""
    import math

    import psutil
    side = 8 * math.ceil(math.sqrt(1.5 * psutil.virtual_memory().available / 800) / 8)
    assert side <= 16384, (f"this machine has {psutil.virtual_memory().available / 2**30:.0f} GiB free: past it "
                           f"needs a {side} px image, over EmptyImage's 16384 (the test is sized for ≤ 140 GiB)")
    g = {**empty_image(side, side),
         "2": {"class_type": "DiTControl_HEDLoader", "inputs": {"hed_name": HED_FILE}},
         "3": {"class_type": "DiTControl_HEDSoftEdge", "inputs": {"hed_model": ["2", 0], "image": ["1", 0]}},
         **save("4", ["3", 0], "hed/huge")}
    err = execution_error(comfy.run(g))
    assert err and f"HED Soft Edge: a {side}×{side} px image needs about" in err["exception_message"] \
        and "Fit Control Image" in err["exception_message"], err
