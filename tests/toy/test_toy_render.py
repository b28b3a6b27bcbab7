"""The toy world: renderer, concept split, contact sheets and partial captions."""

from __future__ import annotations

import random
import re
import time
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from oneword.toy.captions import (
    GENERIC_NOUNS,
    PREFIXES,
    SURFACE_FORMS,
    CaptionSpec,
    caption,
    full_caption,
    named_attributes,
    prompt_for,
)
from oneword.toy.render import (
    ATTRIBUTES,
    BACKGROUND_RGB,
    BACKGROUNDS,
    FILL_RGB,
    FILLS,
    OUTLINE_RGB,
    OUTLINES,
    PATTERNS,
    SCALE_RANGE,
    SHAPES,
    VOCAB,
    Concept,
    Pose,
    all_concepts,
    color_distance,
    contact_sheet,
    pattern_rgb,
    render,
    render_concept_images,
    sample_pose,
    split_concepts,
)

BIG = Pose(x=0.5, y=0.5, scale=0.75, rotation=0.0)
SMALL = Pose(x=0.5, y=0.5, scale=0.45, rotation=12.0)


def _px(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def _near(arr: np.ndarray, rgb, tol: int = 6) -> np.ndarray:
    """Mask of pixels within ``tol`` of ``rgb`` in every channel."""
    return (np.abs(arr - np.asarray(rgb, dtype=np.int16)) <= tol).all(axis=-1)


def _foreground(arr: np.ndarray, bg: str) -> np.ndarray:
    return ~_near(arr, BACKGROUND_RGB[bg], tol=12)


def _most_common(arr: np.ndarray, mask: np.ndarray) -> tuple[int, ...]:
    colours, counts = np.unique(arr[mask].reshape(-1, 3), axis=0, return_counts=True)
    return tuple(int(c) for c in colours[counts.argmax()])


# --------------------------------------------------------------------------------------------------
# Vocabulary


def test_vocabulary_sizes_and_attribute_names():
    assert len(SHAPES) == 8 and len(FILLS) == 8 and len(PATTERNS) == 4
    assert 4 <= len(OUTLINES) <= 6 and 6 <= len(BACKGROUNDS) <= 8
    assert ATTRIBUTES == ("shape", "fill", "pattern", "outline", "background")
    assert set(FILL_RGB) == set(FILLS) and set(OUTLINE_RGB) == set(OUTLINES)
    assert set(BACKGROUND_RGB) == set(BACKGROUNDS)


def test_vocabularies_are_disjoint():
    words = [w for name in ATTRIBUTES for w in VOCAB[name]]
    assert len(words) == len(set(words))


def test_palettes_keep_objects_visible():
    # Delta E (CIE76): fills stand out from every background, outlines from every fill.
    assert min(color_distance(f, b) for f in FILLS for b in BACKGROUNDS) > 40
    assert min(color_distance(f, o) for f in FILLS for o in OUTLINES) > 30
    assert min(color_distance(o, b) for o in OUTLINES for b in BACKGROUNDS) > 20
    assert min(color_distance(f, pattern_rgb(f)) for f in FILLS) > 20


def test_vocabulary_words_are_single_clip_tokens():
    from oneword.tokenizer import load_clip_tokenizer

    tok = load_clip_tokenizer()
    caption_words = {w for forms in SURFACE_FORMS.values() for ws in forms.values() for w in ws}
    words = caption_words | set(GENERIC_NOUNS) | {"outline", "background"}
    split = {w: tok.tokenize(w) for w in sorted(words)}
    assert all(len(pieces) == 1 for pieces in split.values()), split


# --------------------------------------------------------------------------------------------------
# Concepts and poses


def test_concept_validation_slug_and_attributes():
    c = Concept(shape="star", fill="red", pattern="stripes", outline="gold")
    assert c.slug == "red-star-stripes-gold"
    assert Concept.from_slug(c.slug) == c
    assert c.attributes() == {"shape": "star", "fill": "red", "pattern": "stripes", "outline": "gold"}
    assert hash(c) == hash(Concept("star", "red", "stripes", "gold"))
    with pytest.raises(ValueError, match="shape"):
        Concept(shape="blob", fill="red", pattern="solid", outline="gold")
    with pytest.raises(ValueError, match="fill"):
        Concept(shape="star", fill="teal", pattern="solid", outline="gold")  # a background word
    with pytest.raises(ValueError, match="outline"):
        Concept(shape="star", fill="red", pattern="solid", outline="none")
    with pytest.raises(ValueError, match="pattern"):
        Concept(shape="star", fill="red", pattern="plaid", outline="black")


@pytest.mark.parametrize("make_rng", [random.Random, np.random.default_rng])
def test_sample_pose_in_range_and_deterministic(make_rng):
    poses = [sample_pose(r) for r in [make_rng(3)] for _ in range(200)]
    again = [sample_pose(r) for r in [make_rng(3)] for _ in range(200)]
    assert poses == again
    for p in poses:
        assert all(isinstance(v, float) for v in (p.x, p.y, p.scale, p.rotation))
        assert SCALE_RANGE[0] <= p.scale <= SCALE_RANGE[1] and -30 <= p.rotation <= 30
        reach = 0.5 * p.scale
        assert reach < p.x < 1 - reach and reach < p.y < 1 - reach
    assert len({p.x for p in poses}) == len(poses)


# --------------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize("size", [32, 48, 64])
def test_render_mode_size_and_determinism(size):
    c = Concept("heart", "pink", "dots", "black")
    pose = sample_pose(random.Random(0))
    a = render(c, "teal", pose, size=size)
    b = render(c, "teal", pose, size=size)
    assert a.mode == "RGB" and a.size == (size, size)
    assert a.tobytes() == b.tobytes()
    other = render(c, "teal", sample_pose(random.Random(1)), size=size)
    assert other.tobytes() != a.tobytes()


def test_render_rejects_unknown_background():
    with pytest.raises(ValueError, match="background"):
        render(Concept("star", "red", "solid", "gold"), "red", BIG)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_renders_and_shapes_differ(shape):
    c = Concept(shape, "yellow", "solid", "black")
    arr = _px(render(c, "navy", BIG))
    fg = _foreground(arr, "navy")
    assert 0.15 < fg.mean() < 0.7  # a sizeable object, inside the frame
    assert not fg[0].any() and not fg[-1].any() and not fg[:, 0].any() and not fg[:, -1].any()
    for other in SHAPES:
        if other != shape:
            fg2 = _foreground(_px(render(Concept(other, "yellow", "solid", "black"), "navy", BIG)), "navy")
            iou = (fg & fg2).sum() / (fg | fg2).sum()
            assert iou < 0.9, (shape, other, iou)


@pytest.mark.parametrize("fill", FILLS)
def test_solid_fill_is_the_dominant_object_colour(fill):
    for bg in ("gray", "maroon"):
        arr = _px(render(Concept("square", fill, "solid", "silver"), bg, BIG))
        dominant = _most_common(arr, _foreground(arr, bg))
        assert np.abs(np.subtract(dominant, FILL_RGB[fill])).max() <= 3, (fill, bg, dominant)


@pytest.mark.parametrize("pattern", PATTERNS[1:])
@pytest.mark.parametrize("fill", ["red", "blue", "white"])
def test_patterns_show_fill_and_tone(pattern, fill):
    # teal: white's pattern tone (89, 89, 89) is within the background tolerance of gray (80, 80, 85)
    arr = _px(render(Concept("circle", fill, pattern, "black"), "teal", BIG))
    fg = _foreground(arr, "teal")
    fill_frac = _near(arr, FILL_RGB[fill])[fg].mean()
    tone_frac = _near(arr, pattern_rgb(fill))[fg].mean()
    assert fill_frac > 0.2 and tone_frac > 0.08, (fill_frac, tone_frac)
    # The fill stays a main colour (a checkerboard is half and half; the others cover less).
    assert fill_frac > tone_frac * (0.6 if pattern == "checks" else 1.0)


@pytest.mark.parametrize("fill, outline", [("red", "gold"), ("blue", "black"), ("white", "turquoise")])
def test_a_tone_draws_the_fill_and_outline_off_the_vocabulary(fill, outline):
    from oneword.toy.render import FILL_TONE_TOWARD, OUTLINE_TONE_TOWARD, toned_rgb

    concept = Concept("square", fill, "stripes", outline)
    assert (
        toned_rgb("fill", fill, 0.0) == FILL_RGB[fill]
        and toned_rgb("outline", outline, 0) == OUTLINE_RGB[outline]
    )
    assert pattern_rgb(fill, 0.0) == pattern_rgb(fill)
    half_fill, half_ink = toned_rgb("fill", fill, 0.5), toned_rgb("outline", outline, 0.5)
    for name, part, table, toward in (
        (fill, half_fill, FILL_RGB, FILL_TONE_TOWARD),
        (outline, half_ink, OUTLINE_RGB, OUTLINE_TONE_TOWARD),
    ):  # half way between the colour and its neighbour
        for a, b, mid in zip(table[name], table[toward[name]], part):
            assert min(a, b) <= mid <= max(a, b) and abs(mid - (a + b) / 2) <= 0.5
    arr = _px(render(concept, "navy", BIG, tone=0.5))
    fg = _foreground(arr, "navy")
    assert _near(arr, half_fill)[fg].mean() > 0.2
    assert _near(arr, half_ink, tol=10).sum() >= 40
    assert _near(arr, pattern_rgb(fill, 0.5))[fg].mean() > 0.08
    if fill != "white":  # white has no hue to move: its fill stays white
        assert _near(arr, FILL_RGB[fill])[fg].mean() < 0.01
    assert _near(arr, OUTLINE_RGB[outline], tol=10).sum() < 40
    for bad in (-0.1, 0.6):
        with pytest.raises(ValueError, match="tone must be"):
            render(concept, "navy", BIG, tone=bad)
    with pytest.raises(ValueError, match="part must be"):
        toned_rgb("pattern", fill, 0.5)


def test_toned_concepts_keep_to_backgrounds_their_toned_colours_stand_out_from():
    from oneword.toy.render import MIN_OUTLINE_CONTRAST, backgrounds_for, toned_rgb

    hidden = Concept("circle", "green", "solid", "turquoise")
    assert "teal" in backgrounds_for(hidden) and "teal" not in backgrounds_for(hidden, 0.5)
    for c in all_concepts():
        assert backgrounds_for(c, 0.0) == backgrounds_for(c)
        for tone in (0.25, 0.5):
            colours = (toned_rgb("fill", c.fill, tone), toned_rgb("outline", c.outline, tone))
            allowed = backgrounds_for(c, tone)
            assert len(allowed) >= 3
            for bg in allowed:
                assert min(color_distance(bg, rgb) for rgb in colours) >= MIN_OUTLINE_CONTRAST, (c, tone, bg)
    pairs = render_concept_images(hidden, 6, seed=0, size=32, tone=0.5)
    assert {bg for _, bg in pairs} == set(backgrounds_for(hidden, 0.5))


def test_a_refused_tone_writes_no_concept_folder(tmp_path):
    from oneword.toy.concepts import write_concept_folder

    with pytest.raises(ValueError, match="tone must be"):
        write_concept_folder(Concept("star", "red", "dots", "gold"), tmp_path, tone=0.7)
    assert not any(tmp_path.iterdir())


def test_toned_bench_concepts_differ_only_in_colour():
    from oneword.toy.concepts import load_bench_concepts
    from oneword.toy.render import backgrounds_for

    plain, toned = load_bench_concepts(3, draw=0), load_bench_concepts(3, draw=0, tone=0.5)
    assert [c.name for c in plain] == [c.name for c in toned]
    assert [c.attributes for c in plain] == [c.attributes for c in toned]  # the words a caption can say
    same_backgrounds = [
        backgrounds_for(Concept.from_slug(c.name), 0.5) == backgrounds_for(Concept.from_slug(c.name))
        for c in plain
    ]
    assert True in same_backgrounds and False in same_backgrounds  # draw 0 of 3 has both kinds
    for a, b, same in zip(plain, toned, same_backgrounds):
        for x, y in zip(a.images, b.images):
            diff = np.abs(_px(x.image) - _px(y.image)).max(axis=-1)
            if same:  # the same backgrounds and poses: only the object's colours change
                assert 0.02 < (diff > 0).mean() < 0.9
                assert diff[0, 0] == diff[0, -1] == diff[-1, 0] == diff[-1, -1] == 0
            else:  # fewer backgrounds to cycle through: the references differ everywhere
                assert (diff > 0).mean() > 0.02


def test_patterns_differ_from_each_other():
    arrs = {p: _px(render(Concept("square", "green", p, "gold"), "brown", BIG)) for p in PATTERNS}
    for a, b in combinations(PATTERNS, 2):
        assert (np.abs(arrs[a] - arrs[b]).max(axis=-1) > 30).mean() > 0.05, (a, b)


@pytest.mark.parametrize("outline", OUTLINES)
def test_outline_colour_is_drawn(outline):
    for fill in ("white", "yellow", "blue"):
        arr = _px(render(Concept("diamond", fill, "solid", outline), "olive", BIG))
        assert _near(arr, OUTLINE_RGB[outline], tol=10).sum() >= 40, (fill, outline)


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_background_is_honoured(background):
    img = render(Concept("cross", "orange", "checks", "turquoise"), background, SMALL, size=48)
    arr = _px(img)
    for corner in (arr[0, 0], arr[0, -1], arr[-1, 0], arr[-1, -1]):
        assert tuple(int(v) for v in corner) == BACKGROUND_RGB[background]


def test_render_concept_images_determinism_and_backgrounds():
    c = Concept("star", "purple", "stripes", "gold")
    a = render_concept_images(c, 6, seed=5, size=32)
    b = render_concept_images(c, 6, seed=5, size=32)
    d = render_concept_images(c, 6, seed=6, size=32)
    assert [im.tobytes() for im, _ in a] == [im.tobytes() for im, _ in b]
    assert [bg for _, bg in a] == [bg for _, bg in b]
    assert [im.tobytes() for im, _ in a] != [im.tobytes() for im, _ in d]
    assert len({bg for _, bg in a}) == 6  # one pass through the backgrounds
    assert len({im.tobytes() for im, _ in a}) == 6
    assert all(im.size == (32, 32) and im.mode == "RGB" for im, _ in a)
    only = render_concept_images(c, 4, seed=0, backgrounds=["navy", "olive"], size=32)
    assert sorted(bg for _, bg in only) == ["navy", "navy", "olive", "olive"]
    for im, bg in only:
        arr = _px(im)
        assert _most_common(arr, np.ones(arr.shape[:2], bool)) == BACKGROUND_RGB[bg]
    assert render_concept_images(c, 0, seed=0) == []
    with pytest.raises(ValueError):
        render_concept_images(c, 2, seed=0, backgrounds=["red"])


# --------------------------------------------------------------------------------------------------
# The concept split


def test_all_concepts_is_the_full_product():
    concepts = all_concepts()
    assert len(concepts) == len(set(concepts)) == len(SHAPES) * len(FILLS) * len(PATTERNS) * len(OUTLINES)


def test_split_concepts():
    train, held = split_concepts(seed=0, holdout_fraction=0.1)
    assert held and train
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(all_concepts())
    assert abs(len(held) - 0.1 * len(all_concepts())) <= 1
    for name in ("shape", "fill", "pattern", "outline"):
        assert {getattr(c, name) for c in train} == set(VOCAB[name])
    assert split_concepts(seed=0, holdout_fraction=0.1) == (train, held)
    assert split_concepts(seed=1, holdout_fraction=0.1)[1] != held
    # Even a large hold-out keeps every attribute value in training.
    train9, held9 = split_concepts(seed=2, holdout_fraction=0.9)
    assert len(held9) > 0.8 * len(all_concepts())
    for name in ("shape", "fill", "pattern", "outline"):
        assert {getattr(c, name) for c in train9} == set(VOCAB[name])
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError):
            split_concepts(holdout_fraction=bad)


def test_bench_draws_are_disjoint_held_out_sets(tmp_path):
    from oneword.toy.concepts import write_bench_concepts

    held = set(split_concepts()[1])
    names = [sorted(p.name for p in write_bench_concepts(3, tmp_path / str(d), draw=d)) for d in (0, 1)]
    assert all(len(n) == 3 for n in names) and not set(names[0]) & set(names[1])
    assert {c.slug for c in held} >= set(names[0]) | set(names[1])
    assert names[0] == sorted(
        p.name for p in write_bench_concepts(3, tmp_path / "again")
    )  # draw 0 is the default
    step = len(held) // 3
    for bad in (-1, step - 1):
        with pytest.raises(ValueError, match="draw must be in"):
            write_bench_concepts(3, tmp_path / "bad", draw=bad)


def test_load_bench_concepts_loads_the_draw_and_removes_its_folder(tmp_path, monkeypatch):
    import tempfile

    from oneword.toy.concepts import load_bench_concepts, write_bench_concepts

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    concepts = load_bench_concepts(3, draw=1)
    assert [c.name for c in concepts] == [p.name for p in write_bench_concepts(3, tmp_path / "w", draw=1)]
    assert all(len(c.images) == 5 and c.init == c.attributes["shape"] for c in concepts)
    assert not any((tmp_path / "scratch").iterdir())  # nothing left behind
    with pytest.raises(ValueError, match="draw must be in"):
        load_bench_concepts(3, draw=-1)
    assert not any((tmp_path / "scratch").iterdir())


# --------------------------------------------------------------------------------------------------
# Contact sheets


def test_contact_sheet_size():
    imgs = [render(c, "gray", BIG, size=32) for c in all_concepts()[:10]]
    sheet = contact_sheet(imgs, cols=4, pad=2)
    assert sheet.mode == "RGB" and sheet.size == (4 * 34 + 2, 3 * 34 + 2)
    labelled = contact_sheet(imgs, cols=4, labels=[c.slug for c in all_concepts()[:10]], zoom=2)
    assert labelled.size[0] == 4 * 66 + 2 and labelled.size[1] > 3 * 66 + 2
    with pytest.raises(ValueError):
        contact_sheet([], cols=2)


# --------------------------------------------------------------------------------------------------
# Captions


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _check_caption(spec: CaptionSpec, concept: Concept, background: str) -> None:
    values = {**concept.attributes(), "background": background}
    words = _words(spec.text)
    for name in ATTRIBUTES:
        forms = set(SURFACE_FORMS[name][values[name]])
        if name in spec.named:
            assert spec.named[name] == values[name]
            assert words & forms, (spec, name)
        else:
            assert not words & forms, (spec, name)
    # No other value of any attribute is mentioned either.
    for name in ATTRIBUTES:
        for value, forms in SURFACE_FORMS[name].items():
            if value != values[name]:
                assert not words & set(forms), (spec, name, value)
    if "shape" not in spec.named:
        assert words & set(GENERIC_NOUNS), spec
    assert named_attributes(spec.text) == spec.named
    assert named_attributes(spec) == spec.named


def test_captions_name_exactly_their_attributes():
    rng = random.Random(0)
    concepts = all_concepts()
    counts = dict.fromkeys(ATTRIBUTES, 0)
    nothing = 0
    n = 1500
    for _ in range(n):
        c, bg = rng.choice(concepts), rng.choice(BACKGROUNDS)
        spec = caption(c, bg, rng)
        _check_caption(spec, c, bg)
        for name in spec.named:
            counts[name] += 1
        nothing += not spec.named
    assert 0.62 < counts["shape"] / n < 0.78
    for name in ("fill", "pattern", "outline", "background"):
        assert 0.42 < counts[name] / n < 0.58, (name, counts[name] / n)
    assert nothing > 0  # sometimes only "an object" / "a thing"


def test_caption_determinism_numpy_rng_and_probabilities():
    c = Concept("moon", "orange", "checks", "silver")
    a = [caption(c, "teal", random.Random(4)).text for _ in range(3)]
    assert len(set(a)) == 1
    rng = np.random.default_rng(0)
    specs = [caption(c, "teal", rng) for _ in range(50)]
    for spec in specs:
        _check_caption(spec, c, "teal")
    everything = caption(c, "teal", random.Random(0), name_prob=dict.fromkeys(ATTRIBUTES, 1.0))
    assert set(everything.named) == set(ATTRIBUTES)
    bare = caption(c, "teal", random.Random(0), name_prob=dict.fromkeys(ATTRIBUTES, 0.0))
    assert bare.named == {} and _words(bare.text) & set(GENERIC_NOUNS)


def test_captions_use_varied_templates():
    rng = random.Random(1)
    c = Concept("star", "red", "stripes", "gold")
    texts = {caption(c, "navy", rng).text for _ in range(300)}
    assert len(texts) > 100
    starts = {p for p in PREFIXES if p and any(t.startswith(p + " ") for t in texts)}
    assert len(starts) >= len(PREFIXES) - 1


def test_prompt_for_and_full_caption():
    assert prompt_for({"shape": "star", "background": "teal"}) == ("a photo of a star on a teal background")
    assert prompt_for({"fill": "red"}) == "a photo of a red object"
    assert prompt_for({"pattern": "dots"}, prefix="") == "an object with dots"
    assert prompt_for({}) == "a photo of an object"
    assert prompt_for({"shape": "heart", "pattern": "solid", "outline": "turquoise"}) == (
        "a photo of a solid heart with a turquoise outline"
    )
    c = Concept("star", "red", "stripes", "gold")
    assert full_caption(c, "navy") == (
        "a photo of a red star with stripes and a gold outline on a navy background"
    )
    assert full_caption(Concept("moon", "orange", "solid", "black"), "olive") == (
        "a photo of a solid orange moon with a black outline on an olive background"
    )
    for concept in all_concepts()[::37]:
        for bg in BACKGROUNDS:
            text = full_caption(concept, bg)
            assert named_attributes(text) == {**concept.attributes(), "background": bg}
    with pytest.raises(ValueError):
        prompt_for({"shape": "blob"})
    with pytest.raises(ValueError):
        prompt_for({"colour": "red"})


# --------------------------------------------------------------------------------------------------
# Speed (printed, not asserted)


def test_render_speed_printout(capsys):
    rng = random.Random(0)
    concepts = all_concepts()
    jobs = [(rng.choice(concepts), rng.choice(BACKGROUNDS), sample_pose(rng)) for _ in range(200)]
    start = time.perf_counter()
    for c, bg, pose in jobs:
        render(c, bg, pose, size=64)
    rate = len(jobs) / (time.perf_counter() - start)
    with capsys.disabled():
        print(f"\ntoy render speed: {rate:.0f} images/s at 64 px (one core)")
    assert rate > 0
