"""The lung-field estimate of `python -m training explain --lungs` (training/lung_fields.py): two
fields where a frontal film's lungs are, the geometry of a region against them, and the explain
run that reports the figures (an untrained tiny model on synthetic films: the plumbing, not the
figures)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from training.lung_fields import (SCALES, centre_elsewhere, lung_field_mask, polygon_centroid,
                                  region_in_lungs)


def square(x: float, y: float, half: float) -> np.ndarray:
    """A closed square polygon about (x, y), in pixels."""
    return np.array([(x - half, y - half), (x + half, y - half), (x + half, y + half),
                     (x - half, y + half), (x - half, y - half)])


def test_two_lung_fields_either_side_of_the_midline_and_nowhere_else():
    mask = lung_field_mask(200, 200)
    right, left = mask[:, :100], mask[:, 100:]
    assert 0.15 < mask.mean() < 0.35  # a frontal film's lungs: a quarter of it, give or take
    assert 0.8 < right.sum() / left.sum() < 1.25
    assert not mask[:, 90:110].any()  # spine and mediastinum
    assert not mask[:30].any() and not mask[170:].any()  # neck; abdomen
    assert not mask[:, :15].any() and not mask[:, 185:].any()  # beside the chest
    assert mask[100, 50] and mask[100, 150]  # the middle of each lung


def test_the_fields_are_fractions_of_the_frame_so_any_film_size_gets_the_same_shape():
    square_frame = lung_field_mask(200, 200)
    film = lung_field_mask(560, 976)  # a wide film, as the samples are
    assert abs(film.mean() - square_frame.mean()) < 0.005
    squashed = np.asarray(Image.fromarray(film).resize((200, 200), Image.Resampling.NEAREST))
    assert (squashed != square_frame).mean() < 0.01


def test_shrunk_fields_lie_inside_the_drawn_ones_and_grown_ones_around_them():
    small, drawn, large = (lung_field_mask(400, 400, scale) for scale in SCALES)
    assert SCALES[0] < 1.0 == SCALES[1] < SCALES[2]
    assert not (small & ~drawn).any() and not (drawn & ~large).any()
    assert small.sum() < drawn.sum() < large.sum()


def test_polygon_centroid_is_the_centre_of_area():
    assert np.allclose(polygon_centroid(square(30, 70, 5)), [30, 70])
    triangle = np.array([(0, 0), (6, 0), (0, 3), (0, 0)], dtype=float)
    assert np.allclose(polygon_centroid(triangle), [2, 1])


def test_a_region_in_a_lung_below_the_lungs_and_across_a_lungs_edge():
    lungs = lung_field_mask(200, 200)
    in_lung = region_in_lungs(square(55, 100, 8), lungs)
    assert in_lung["centre_inside"] and in_lung["area_inside"] == 1.0
    assert in_lung["centre"] == [0.275, 0.5]
    abdomen = region_in_lungs(square(100, 180, 10), lungs)
    assert not abdomen["centre_inside"] and abdomen["area_inside"] == 0.0
    # the right lung's lateral edge runs near x = 27 at mid-height: half in, half out
    edge = region_in_lungs(square(27, 110, 8), lungs)
    assert 0.2 < edge["area_inside"] < 0.8


def test_a_centre_outside_the_fields_is_named_by_where_it_lies():
    assert centre_elsewhere([0.5, 0.5]) == "between"  # mediastinum
    assert centre_elsewhere([0.5, 0.9]) == "below"  # upper abdomen
    assert centre_elsewhere([0.03, 0.5]) == "beside"  # outside the chest
    assert centre_elsewhere([0.3, 0.1]) == "beside"  # above the apices


def test_explain_with_lungs_reports_the_figures_and_draws_the_fields(tmp_path):
    from testbed.tiny_models import export_untrained_tiny_ensemble
    from training.explain import run_explain

    model = export_untrained_tiny_ensemble(tmp_path / "tiny.pt", ood_threshold=1e9,
                                           threshold=0.0, saliency=True)
    data = tmp_path / "chest_xray"
    (data / "train" / "NORMAL").mkdir(parents=True)
    (data / "train" / "PNEUMONIA").mkdir()
    rng = np.random.default_rng(7)
    names = [f"person{index}_bacteria_{index}.png" for index in range(5)]
    for name in names:
        film = (rng.random((96, 80)) * 255).astype(np.uint8)
        Image.fromarray(film).save(data / "train" / "PNEUMONIA" / name)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"validation": names[:4]}))
    out = tmp_path / "explain"
    summary = run_explain(model, data, out, split, lungs=True)
    lungs = summary["lungs"]
    assert lungs["all"]["count"] == summary["with_region"] == 4
    for scale in SCALES:
        figures = lungs["all"][f"fields x{scale}"]
        assert 0.0 <= figures["share_centre_in_lungs"] <= 1.0
        assert 0.0 <= figures["mean_area_in_lungs"] <= 1.0
    assert lungs["fields_share_of_frame"]["fields x1.0"] == round(
        float(lung_field_mask(200, 200).mean()), 4)
    films = json.loads((out / "explain.json").read_text())["films"]
    assert all("lungs" in film for film in films)
    with Image.open(out / "lung_fields.png") as picture:
        assert picture.size == (800, 800)
    # without --lungs the run is as before
    assert "lungs" not in run_explain(model, data, None, split)
