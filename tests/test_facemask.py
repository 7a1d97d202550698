import sys

import pytest
import torch

from e4t.facemask import MaskUnavailable, detect_mask

skimage = pytest.importorskip("skimage.data", reason="scikit-image provides real test photographs")
pytest.importorskip("cv2", reason="the detector is OpenCV's")


def photo(name):
    return torch.from_numpy(getattr(skimage, name)()).float() / 255


def test_finds_the_face_of_a_real_photograph():
    image = photo("astronaut")                       # 512x512, the face centred near (y 114, x 225)
    mask = detect_mask(image, "face")
    assert mask.shape == (512, 512) and set(mask.unique().tolist()) == {0.0, 1.0}
    ys, xs = mask.nonzero(as_tuple=True)
    assert 100 < ys.float().mean() < 130 and 210 < xs.float().mean() < 240    # centred on the detected face
    assert 0.03 < mask.mean() < 0.3


def test_finds_a_cat_face():
    mask = detect_mask(photo("chelsea"), "cat")
    assert mask.shape == (300, 451) and mask.sum() > 0


def test_clear_messages_when_nothing_is_found_or_no_detector(monkeypatch):
    with pytest.raises(MaskUnavailable, match="no face found"):
        detect_mask(torch.full((128, 128, 3), 0.5), "face")
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(MaskUnavailable, match="opencv-python-headless<5"):
        detect_mask(photo("astronaut"), "face")
