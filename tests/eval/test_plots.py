"""lmadapt.eval.plots: every plot writes a real, non-blank PNG, atomically, into directories it creates."""

import os

import numpy as np
import pytest
from matplotlib.image import imread

from lmadapt.eval.plots import heatmap, loss_across_versions, training_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_real_png(path: str, min_bytes: int = 5_000, min_std: float = 0.05, min_colours: int = 8) -> np.ndarray:
    """The file is a PNG of plausible size whose pixels are not (nearly) uniform."""
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert min_bytes < os.path.getsize(path) < 5_000_000
    img = imread(path)  # float RGB(A) in [0, 1]
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert 100 <= img.shape[0] <= 4000 and 100 <= img.shape[1] <= 4000
    rgb = img[..., :3]
    # A blank (all white) image has std 0 and a single colour; a plot has axes, text and coloured marks.
    assert rgb.std() > min_std, f"image looks blank: pixel std {rgb.std():.4f}"
    colours = np.unique((rgb * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) >= min_colours, f"only {len(colours)} distinct colours"
    # Only the target exists in its directory: the temp file was renamed, not left behind.
    assert [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp-")] == []
    return rgb


def test_heatmap(tmp_path):
    R = [[0.90, 0.30, 0.20], [0.70, 0.85, 0.40], [0.60, 0.75, float("nan")]]
    path = str(tmp_path / "new" / "dir" / "heatmap.png")  # parents do not exist yet
    out = heatmap(R, ["v0", "v1", "v2"], ["a", "b", "c"], path, title="accuracy", fmt=".2f")
    assert out == path
    rgb = assert_real_png(path, min_std=0.1)
    # The viridis cells are strongly coloured (not just black text on white): some pixels are far from grey.
    saturation = rgb.max(axis=2) - rgb.min(axis=2)
    assert (saturation > 0.3).mean() > 0.1


def test_heatmap_overwrites_and_handles_a_constant_matrix(tmp_path):
    path = str(tmp_path / "h.png")
    heatmap([[1.0, 2.0]], ["v"], ["a", "b"], path, title="first")
    first = os.path.getsize(path)
    heatmap(np.ones((2, 2)), ["v0", "v1"], ["a", "b"], path, title="constant", cmap="magma_r")
    assert_real_png(path, min_bytes=3_000, min_std=0.02)
    assert os.path.getsize(path) != first
    assert os.listdir(tmp_path) == ["h.png"]


def test_heatmap_rejects_mismatched_names(tmp_path):
    with pytest.raises(ValueError, match="row names"):
        heatmap([[1.0, 2.0]], ["v0", "v1"], ["a", "b"], str(tmp_path / "x.png"), title="t")
    with pytest.raises(ValueError, match="2-D"):
        heatmap([1.0, 2.0], ["v0"], ["a", "b"], str(tmp_path / "x.png"), title="t")
    assert not os.path.exists(tmp_path / "x.png")


def test_loss_across_versions(tmp_path):
    scores = {"shakespeare": [3.2, 2.1, 2.4, 2.6], "wiki": [3.5, 3.4, 2.2, 2.5], "code": [4.0, None, 3.9, 2.0]}
    path = str(tmp_path / "plots" / "loss.png")
    assert loss_across_versions(scores, ["base", "v1", "v2", "v3"], path) == path
    assert_real_png(path)
    with pytest.raises(ValueError, match="has 2 scores for 4 versions"):
        loss_across_versions({"a": [1.0, 2.0]}, ["base", "v1", "v2", "v3"], str(tmp_path / "bad.png"))


def test_training_curves(tmp_path):
    steps = np.arange(0, 200, 10)
    runs = {
        "v1": [(int(s), float(4.0 * np.exp(-s / 80) + 1.0)) for s in steps],
        "v2": [(int(s), float(3.0 * np.exp(-s / 50) + 1.2)) for s in steps[::-1]],  # unsorted on purpose
        "empty": [],
    }
    path = str(tmp_path / "curves.png")
    assert training_curves(runs, path, logy=True, title="train") == path
    assert_real_png(path)
    with pytest.raises(ValueError, match="at least one run"):
        training_curves({"empty": []}, str(tmp_path / "none.png"))
