"""The gate check's processing that no training saw (training.unseen_processing): each keeps a
film a film (shape, grey levels 0-255), changes it, and does the same to the same film twice;
the gate check puts each on both sides (children must pass, adults must abstain)."""

import numpy as np
import pytest

from training.unseen_processing import UNSEEN_PROCESSING, local_contrast


def film(rows: int = 224, columns: int = 200) -> np.ndarray:
    """A made-up chest-like picture: two dark lung fields in a brighter body, a gradient."""
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    picture = 60 + 0.4 * y
    for centre in (0.3, 0.7):
        lung = (((x - centre * columns) / (0.15 * columns)) ** 2
                + ((y - 0.5 * rows) / (0.3 * rows)) ** 2)
        picture = np.where(lung < 1, picture - 40, picture)
    return np.clip(picture, 0, 255)


@pytest.mark.parametrize("condition", UNSEEN_PROCESSING, ids=lambda c: c.name)
def test_each_processing_keeps_a_film_a_film_and_changes_it(condition):
    picture = film()
    processed = condition.apply(picture, np.random.default_rng(0))
    again = condition.apply(picture, np.random.default_rng(1))
    assert processed.shape == picture.shape
    assert processed.min() >= 0 and processed.max() <= 255
    assert np.abs(processed - picture).mean() > 1.0, "the processing changed nothing"
    np.testing.assert_array_equal(processed, again)  # no randomness


def test_local_contrast_evens_out_the_regions():
    """Its point: a dark half and a bright half of the same texture come out alike."""
    rng = np.random.default_rng(0)
    texture = rng.normal(0, 10, (200, 200)).astype(np.float32)
    picture = np.clip(texture + np.where(np.arange(200) < 100, 60.0, 190.0)[None, :], 0, 255)
    processed = local_contrast(strength=1.0)(picture, rng)
    before = abs(picture[:, 20:80].mean() - picture[:, 120:180].mean())
    after = abs(processed[:, 20:80].mean() - processed[:, 120:180].mean())
    assert after < before / 5


def test_the_gate_check_puts_each_on_both_sides(monkeypatch, tmp_path):
    """check_sets scores children's films (must pass) and adults' (must abstain) under each."""
    from training import gate_check

    calls = []

    def shifted(paths, condition, cache_dir):
        calls.append((condition.name, tuple(paths), cache_dir))
        return np.zeros((len(paths), 1, 200, 200), np.float32)

    monkeypatch.setattr(gate_check, "cached_shifted_inputs", shifted)
    children, adults = [tmp_path / "c1.jpeg", tmp_path / "c2.jpeg"], [tmp_path / "a1.png"]
    styles = {"children": np.zeros(10, np.float32), "adults": np.zeros(10, np.float32)}
    monkeypatch.setattr(gate_check, "_restyled_inputs",
                        lambda paths, towards: np.zeros((len(paths), 1, 200, 200), np.float32))
    table = gate_check.check_sets(lambda inputs: np.zeros(len(inputs)), children, adults,
                                  styles, samples=None, originals=None)
    for condition in UNSEEN_PROCESSING:
        assert table[f"children {condition.name}"]["side"] == "in"
        assert table[f"children {condition.name}"]["count"] == len(children)
        assert table[f"adults {condition.name}"]["side"] == "out"
        assert table[f"adults {condition.name}"]["count"] == len(adults)
        assert (condition.name, tuple(adults), None) in calls  # computed, not cached
