"""tests/training/scenes.py and metrics.py: deterministic scenes with captions and edge maps; the caption
classifier agrees with ground truth and not with noise, blank or other scenes; edge F1 behaves."""
import numpy as np
import pytest

from dit_control.kernels.canny import canny_edges
from dit_control.tests.training.metrics import (
    DEFAULT_RADIUS,
    _blocks,
    caption_agreement,
    edge_f1,
    image_edge_f1,
    parse_caption,
    read_scene_attributes,
)
from dit_control.tests.training.scenes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    Scene,
    Shape,
    edge_map,
    heldout_captions,
    heldout_scenes,
    render,
    sample,
    training_scene,
)

N = 120


def blocky(img):
    """What the pixel VAE gives back: 8×8 block means."""
    return np.repeat(np.repeat(_blocks(img), 8, 0), 8, 1)


def test_scenes_are_deterministic_and_varied():
    a, b = sample(7), sample(7)
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    scenes = [training_scene(i) for i in range(400)]
    assert {s.background for s in scenes} == set(COLOURS) and len(COLOURS) >= 8
    shapes = [sh for s in scenes for sh in s.shapes]
    assert {sh.kind for sh in shapes} == set(SHAPES) and {sh.position for sh in shapes} == set(POSITIONS)
    assert {len(s.shapes) for s in scenes} == {1, 2, 3} and {sh.size for sh in shapes} == {"small", "big"}
    assert all(sh.colour != s.background for s in scenes for sh in s.shapes)
    assert all(len({sh.position for sh in s.shapes}) == len(s.shapes) for s in scenes)


def test_caption_grammar_and_parser():
    s = Scene("blue", (Shape("circle", "red", "big", "top left"), Shape("star", "orange", "small", "center")))
    assert s.caption == "a big red circle at the top left and a small orange star in the center on a blue background"
    assert Scene("orange", s.shapes[:1]).caption.endswith("on an orange background")
    for i in range(200):
        sc = training_scene(i)
        assert parse_caption(sc.caption) == Scene(sc.background, tuple(Shape(x.kind, x.colour, x.size, x.position)
                                                                        for x in sc.shapes))
    with pytest.raises(ValueError):
        parse_caption("a photo of a cat")


def test_render_is_antialiased_and_edges_are_our_canny_node_math():
    sc, img, edges = sample(3)
    assert img.shape == (256, 256, 3) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
    palette = np.array(list(COLOURS.values())) / 255.0
    d = np.linalg.norm(img.reshape(-1, 1, 3) - palette[None], axis=-1).min(1)
    assert (d > 0.02).sum() > 50            # edge pixels blend two colours
    assert np.array_equal(edges, canny_edges(img, 100, 200)[0, 0].numpy())
    assert set(np.unique(edges)) == {0.0, 1.0} and 0.001 < edges.mean() < 0.05


def test_heldout_captions_are_never_in_the_training_stream():
    held = heldout_captions()
    assert len(held) == len(heldout_scenes()) == 64
    assert not held & {training_scene(i).caption for i in range(3000)}


def test_ground_truth_agrees_with_its_caption():
    scores, blocky_scores, sizes = [], [], []
    for i in range(N):
        sc = training_scene(i)
        img = render(sc)
        scores.append(caption_agreement(img, sc.caption))
        blocky_scores.append(caption_agreement(blocky(img), sc.caption))
        sizes.append(caption_agreement(img, sc.caption, with_size=True))
    assert np.mean(scores) >= 0.98 and np.mean(blocky_scores) >= 0.98 and np.mean(sizes) >= 0.98
    held = [caption_agreement(render(s), s.caption) for s in heldout_scenes()]
    assert np.mean(held) >= 0.98


def test_noise_blank_and_other_scenes_score_near_chance():
    rng = np.random.default_rng(0)
    noise, blank, other = [], [], []
    for i in range(40):
        cap = training_scene(i).caption
        noise.append(caption_agreement(rng.random((256, 256, 3), dtype=np.float32), cap))
        blank.append(caption_agreement(np.full((256, 256, 3), rng.random(3), np.float32), cap))
        other.append(caption_agreement(render(training_scene(10_000 + i)), cap))
    assert np.mean(noise) <= 0.1 and np.mean(blank) <= 0.15 and np.mean(other) <= 0.25


def test_each_attribute_is_read():
    base = Scene("blue", (Shape("circle", "red", "big", "top left"),))
    img = render(base)
    attrs = read_scene_attributes(img, base)
    assert all(attrs.values())
    # a wrong colour also fails the position (no yellow blob at the top left); a wrong position also
    # fails colour and kind (nothing at the bottom right)
    for wrong, keys in ((Scene("green", base.shapes), {"background"}),
                        (Scene("blue", (Shape("circle", "yellow", "big", "top left"),)),
                         {"shape0.colour", "shape0.position"}),
                        (Scene("blue", (Shape("square", "red", "big", "top left"),)), {"shape0.kind"}),
                        (Scene("blue", (Shape("circle", "red", "big", "bottom right"),)),
                         {"shape0.position", "shape0.colour", "shape0.kind", "shape0.size"}),
                        (Scene("blue", (Shape("circle", "red", "small", "top left"),)), {"shape0.size"})):
        got = read_scene_attributes(img, wrong)
        assert {k for k, v in got.items() if not v} == keys, (keys, got)


def test_edge_f1():
    e = edge_map(render(training_scene(5)))
    assert edge_f1(e, e) == 1.0 and edge_f1(np.zeros_like(e), e) == 0.0
    assert edge_f1(np.zeros_like(e), np.zeros_like(e)) == 1.0
    shifted = np.roll(e, 3, axis=1)
    assert edge_f1(shifted, e, radius=DEFAULT_RADIUS) == 1.0 and edge_f1(shifted, e, radius=1) < 0.5
    two = np.zeros((256, 256), np.float32)
    two[40, 20:100] = two[200, 150:230] = 1
    one = two.copy()
    one[200] = 0                                        # recall 1/2, precision 1: F1 2/3
    assert abs(edge_f1(one, two) - 2 / 3) < 0.02
    f_self = [image_edge_f1(blocky(render(training_scene(i))), edge_map(render(training_scene(i))))
              for i in range(30)]
    f_other = [image_edge_f1(render(training_scene(500 + i)), edge_map(render(training_scene(i))))
               for i in range(30)]
    # the ceiling of a perfect model seen through the pixel VAE, and the level of an unrelated picture
    assert np.mean(f_self) >= 0.8 and np.mean(f_other) <= 0.2


def kind_accuracy(images, scenes):
    got = [v for img, sc in zip(images, scenes) for k, v in read_scene_attributes(img, sc).items()
           if k.endswith(".kind")]
    return float(np.mean(got))


def test_kind_reader_survives_ragged_outlines_and_is_not_fooled_by_an_averaged_blob():
    """Generated outlines are ragged. With per-block speckle of σ 0.1 the first reader (coverage cut at 0.5,
    solidity < 0.97 -> star) read 0.69 of these kinds, the template reader all; on the micro model's base
    samples the two read 0.33 and 0.70 (tests/training/README.md). A blob that is the mean of the four kinds' renders
    (what a
    model that ignores kind draws) is read as one kind whatever the caption says: near chance (0.25)."""
    rng = np.random.default_rng(1)
    scenes = [training_scene(i) for i in range(60)]
    speckled = [np.clip(blocky(render(sc)) + np.repeat(np.repeat(rng.normal(0, 0.1, (32, 32, 3)), 8, 0), 8, 1),
                        0, 1).astype(np.float32) for sc in scenes]
    assert kind_accuracy(speckled, scenes) >= 0.9
    averaged = []
    for sc in scenes:
        kinds = [Scene(sc.background, tuple(Shape(k, s.colour, s.size, s.position) for s in sc.shapes))
                 for k in SHAPES]
        averaged.append(np.mean([render(k) for k in kinds], axis=0).astype(np.float32))
    assert kind_accuracy(averaged, scenes) <= 0.4
