"""PNG and JPEG films (`pacs-ai classify`, `pacs-ai evaluate`): the model input is the same
whatever bit depth the export used."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pacs_ai.config import FilterPolicy
from pacs_ai.film.film_input import prepare, read_picture
from pacs_ai.film.pixels import display_array
from pacs_ai.model.preprocessing import equalize_histogram
from testbed.environment import SAMPLE_DICOMS

MAX_PIXELS = 10**8


@pytest.fixture(scope="module")
def film_8bit() -> np.ndarray:
    """A real film's display values as an 8-bit picture."""
    import pydicom

    display = display_array(pydicom.dcmread(SAMPLE_DICOMS / "dx_normal_pa_16bit.dcm"))
    return np.round(display * 255).astype(np.uint8)


def model_input_of(path) -> np.ndarray:
    prepared = prepare(path, FilterPolicy(), MAX_PIXELS)
    assert prepared.status == "ok", prepared.reason
    return prepared.model_input


@pytest.mark.parametrize("scale, bits", [(257, "16-bit full range"), (16, "12-bit values")])
def test_a_16_bit_png_gives_the_8_bit_pictures_model_input(tmp_path, film_8bit, scale, bits):
    eight = tmp_path / "film8.png"
    sixteen = tmp_path / "film16.png"
    Image.fromarray(film_8bit).save(eight)
    Image.fromarray(film_8bit.astype(np.uint16) * scale).save(sixteen)
    assert Image.open(sixteen).mode.startswith("I;16"), bits  # Pillow reads it as 16-bit

    # The values are kept, not clipped to 8 bits (which left 99 % of a 16-bit film white).
    values = read_picture(sixteen, MAX_PIXELS)
    assert values.max() == int(film_8bit.max()) * scale
    # The same picture, so the same model input (the histogram equalisation takes out the scale;
    # the resize's float rounding may split a tie or two).
    assert np.abs(model_input_of(sixteen) - model_input_of(eight)).max() < 1e-3


def test_an_8_bit_rgb_export_reads_as_its_grey(tmp_path, film_8bit):
    grey, rgb = tmp_path / "grey.png", tmp_path / "rgb.png"
    Image.fromarray(film_8bit).save(grey)
    Image.fromarray(np.stack([film_8bit] * 3, axis=-1)).save(rgb)
    assert np.array_equal(model_input_of(rgb), model_input_of(grey))


def test_the_equalisation_is_blind_to_a_linear_scale():
    # why the 16-bit picture needs no rescaling of its own before the model input
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(equalize_histogram(values), equalize_histogram(values * 257 + 3))


def test_a_jpeg_stored_turned_is_read_upright_as_a_viewer_shows_it(tmp_path, film_8bit):
    upright, turned = tmp_path / "upright.jpg", tmp_path / "turned.jpg"
    Image.fromarray(film_8bit).save(upright, quality=95)
    # stored rotated a quarter turn, with EXIF Orientation 6 ("rotate 90 CW to display")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(film_8bit)).save(turned, quality=95, exif=exif)
    assert read_picture(turned, MAX_PIXELS).shape == film_8bit.shape
    # the same picture up to JPEG's losses
    assert np.abs(model_input_of(turned) - model_input_of(upright)).mean() < 0.02


def on_transparent_canvas(film: np.ndarray, under: int) -> tuple[np.ndarray, np.ndarray]:
    """The film on a canvas a fifth larger, its border transparent over grey `under`: the
    grey and the alpha."""
    rows, columns = film.shape
    top, left = rows // 10, columns // 10
    grey = np.full((rows + 2 * top, columns + 2 * left), under, dtype=np.uint8)
    grey[top:top + rows, left:left + columns] = film
    alpha = np.zeros_like(grey)
    alpha[top:top + rows, left:left + columns] = 255
    return grey, alpha


@pytest.mark.parametrize("under", [255, 0], ids=["white", "black"])
@pytest.mark.parametrize("mode", ["LA", "RGBA", "P", "L", "RGB", "I;16"])
def test_a_transparent_border_is_not_part_of_the_film(tmp_path, film_8bit, mode, under):
    # A viewer's "save image" may put the film on a transparent canvas; whatever grey lies under
    # the transparent border (white from some tools) is no part of the film, so the model input
    # is the film's own. Measured before: the 16 val/ films so bordered changed 4 of 16
    # findings (white) and 2 of 16 (black), probabilities by up to 0.33. Besides an alpha
    # channel, PNG marks transparency with one key grey, colour or palette index (tRNS), as
    # optimisers (optipng, ImageMagick) write a canvas whose transparency is all or nothing.
    film = film_8bit.clip(1, 254)  # the key (0 or 255) is the border's alone
    plain, bordered = tmp_path / "plain.png", tmp_path / "bordered.png"
    Image.fromarray(film).save(plain)
    grey, alpha = on_transparent_canvas(film, under)
    if mode == "LA":
        Image.fromarray(np.dstack([grey, alpha]), "LA").save(bordered)
    elif mode == "RGBA":
        Image.fromarray(np.dstack([grey, grey, grey, alpha]), "RGBA").save(bordered)
    elif mode == "P":
        indexed = Image.fromarray(grey, "P")
        indexed.putpalette(np.repeat(np.arange(256, dtype=np.uint8), 3).tolist())
        indexed.save(bordered, transparency=under)
    elif mode == "L":
        Image.fromarray(grey).save(bordered, transparency=under)
    elif mode == "RGB":
        Image.fromarray(np.dstack([grey] * 3)).save(bordered, transparency=(under,) * 3)
    else:
        Image.fromarray(grey.astype(np.uint16) * 257).save(bordered, transparency=under * 257)
    assert Image.open(bordered).mode == mode
    assert read_picture(bordered, MAX_PIXELS).shape == film.shape
    # exactly the plain PNG's (the 16-bit one up to a tie split by the resize's rounding)
    assert np.abs(model_input_of(bordered) - model_input_of(plain)).max() < (
        1e-3 if mode == "I;16" else 1e-9)


def test_a_pipe_named_as_a_film_is_refused_not_waited_on(tmp_path):
    """`pacs-ai classify PATH` with a FIFO (a folder walk skips them; a named path does not):
    reading it would block until a writer came, which is never."""
    import os
    import threading

    fifo = tmp_path / "film.dcm"
    os.mkfifo(fifo)
    outcome = {}
    reader = threading.Thread(target=lambda: outcome.update(
        prepared=prepare(fifo, FilterPolicy(), MAX_PIXELS)), daemon=True)
    reader.start()
    reader.join(timeout=20)
    if reader.is_alive():  # unblock the reader before failing
        with open(fifo, "wb"):
            pass
    assert not reader.is_alive(), "prepare waited on the pipe"
    prepared = outcome["prepared"]
    assert prepared.status == "error" and prepared.reason.startswith("unreadable: not a regular")
