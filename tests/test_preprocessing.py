"""The one preprocessing function: shape, range, and what it is robust to."""

import numpy as np
import pytest

from pacs_ai.model.preprocessing import MODEL_INPUT_SIZE, to_model_input


def smooth_film(height=480, width=400, seed=0):
    """A smooth synthetic 'film' (blobs on a gradient) as 12-bit values."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    picture = 0.3 * x + 0.2 * y
    for _ in range(6):
        cy, cx, r = rng.random(3) * [1, 1, 0.3] + [0, 0, 0.05]
        picture += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
    picture -= picture.min()
    return (picture / picture.max() * 4095).astype(np.uint16)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
def test_output_shape_dtype_and_range(dtype):
    film = smooth_film().astype(dtype)
    model_input = to_model_input(film)
    assert model_input.shape == (1, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE)
    assert model_input.dtype == np.float32
    assert 0.0 < model_input.min() and model_input.max() < 1.0
    # equalised: about uniform, so the mean sits near one half
    assert abs(float(model_input.mean()) - 0.5) < 0.02


def test_monotonic_grey_level_changes_give_the_same_input():
    film = smooth_film().astype(np.float64)
    reference = to_model_input(film)
    for transformed in (film / 16.0, np.sqrt(film), film * 3 + 1000, np.log1p(film)):
        assert np.abs(to_model_input(transformed) - reference).mean() < 0.01


def test_bit_depth_and_size_changes_agree():
    film = smooth_film(960, 800)
    eight_bit = (film >> 4).astype(np.uint8)
    small = eight_bit[::4, ::4]
    reference = to_model_input(film)
    assert np.abs(to_model_input(eight_bit) - reference).mean() < 0.01
    assert np.abs(to_model_input(small) - reference).mean() < 0.02


def test_inverted_film_is_not_the_same_picture():
    film = smooth_film()
    assert np.abs(to_model_input(4095 - film) - to_model_input(film)).mean() > 0.2


def test_constant_image_is_mid_grey():
    assert np.allclose(to_model_input(np.zeros((50, 60))), 0.5)


@pytest.mark.parametrize("bad", [np.zeros((3, 10, 10)), np.zeros(10), np.zeros((1, 50)),
                                 np.array([[np.nan, 1.0], [2.0, 3.0]]),
                                 np.array([["a", "b"], ["c", "d"]])])
def test_rejects_what_is_not_a_grayscale_picture(bad):
    with pytest.raises(ValueError):
        to_model_input(bad)
