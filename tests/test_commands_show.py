"""`stgr show`: a PNG or HTML picture of one record with boxes coloured by their alignment IoU."""
from __future__ import annotations

import pytest
from PIL import Image

from pipeline.cli import main
from stages.commands.show import iou_colour
from tests.record_factory import FINGERPRINTS, SQUARE_BOX, build_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("show") / "run"
    return path, build_run(path, n=6)


def test_png_draws_claims_in_iou_colours(run, tmp_path):
    path, fates = run
    # record 0 cites a circle box shifted by 0.4 (IoU 0: red) and the exact square (IoU 1: green)
    record_id = fates["records"][0]["id"]
    out = tmp_path / "r.png"
    assert main(["show", str(path / "stages" / "align" / FINGERPRINTS["align"]), "--id", record_id, "--out", str(out)]) == 0
    image = Image.open(out).convert("RGB")
    assert image.width > 2 * 360
    # the cited time is 1 s: the one drawn frame's panel holds the claims; scan it for the two colours
    panel = image.crop((8, 30, 8 + 360, 30 + 270))
    colours = {colour for _, colour in panel.getcolors(maxcolors=1 << 20)}
    assert iou_colour(0.0) in colours and iou_colour(1.0) in colours
    assert iou_colour(0.0) != iou_colour(1.0)
    # the square's claim is drawn on the square's left edge
    x = int(SQUARE_BOX[0] * 360)
    y = int((SQUARE_BOX[1] + SQUARE_BOX[3]) / 2 * 270)
    assert panel.getpixel((x, y)) == iou_colour(1.0)


def test_html_is_self_contained_and_lists_claims(run, tmp_path):
    path, fates = run
    record_id = fates["kept"][0]
    out = tmp_path / "r.html"
    assert main(["show", str(path), "--id", record_id, "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("data:image/png;base64,") >= 1 and "src=\"http" not in page
    assert "red circle" in page and "IoU 1.00 with &#x27;blue square&#x27;" in page
    assert f"rgb{iou_colour(1.0)}" in page


def test_errors_name_the_problem(run, tmp_path, capsys):
    path, fates = run
    assert main(["show", str(path), "--id", "nope", "--out", str(tmp_path / "x.png")]) == 2
    assert "no record with id 'nope'" in capsys.readouterr().err
    assert main(["show", str(path), "--id", fates["kept"][0], "--out", str(tmp_path / "x.gif")]) == 2
    assert "suffix picks the format" in capsys.readouterr().err


def test_colour_scale():
    assert iou_colour(0.0)[0] > iou_colour(0.0)[1]  # red
    assert iou_colour(1.0)[1] > iou_colour(1.0)[0]  # green
    assert iou_colour(None) == (150, 150, 150)
