import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from medsyn.data import image_transform, load_image_dataset, random_affine


def write_folder(root, classes=("healthy", "tumor"), per_class=3, mode="L", size=20):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (size, size) if mode == "L" else (size, size, 3)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(root / name / f"{i}.png")
    return root


def test_image_folder_keeps_grayscale_and_labels(tmp_path):
    dataset = load_image_dataset(write_folder(tmp_path / "data"))
    assert len(dataset) == 6
    assert dataset.features["label"].names == ["healthy", "tumor"]
    assert dataset[0]["image"].mode == "L"
    assert sorted(dataset["label"]) == [0, 0, 0, 1, 1, 1]
    assert dataset[4]["caption"] == "medical image, tumor"
    assert dataset[0]["source"].endswith("healthy/0.png")


def test_rgb_stays_rgb(tmp_path):
    dataset = load_image_dataset(write_folder(tmp_path / "data", mode="RGB"))
    assert dataset[0]["image"].mode == "RGB"


def test_mixed_channels_rejected_unless_converted(tmp_path):
    root = write_folder(tmp_path / "data")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "tumor" / "rgb.png")
    with pytest.raises(ValueError, match="mixed channel counts"):
        load_image_dataset(root)
    dataset = load_image_dataset(root, channels=1)
    assert {dataset[i]["image"].mode for i in range(len(dataset))} == {"L"}


def test_corrupt_file_raises_or_is_skipped_with_count(tmp_path):
    root = write_folder(tmp_path / "data")
    (root / "healthy" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png: unreadable or corrupt image"):
        load_image_dataset(root)
    with pytest.warns(UserWarning, match="skipped 1 bad inputs of 7"):
        dataset = load_image_dataset(root, on_error="skip")
    assert len(dataset) == 6


def test_empty_folder(tmp_path):
    (tmp_path / "empty" / "healthy").mkdir(parents=True)
    with pytest.raises(ValueError, match="no readable images"):
        load_image_dataset(tmp_path / "empty")


def test_unknown_label_against_class_names(tmp_path):
    root = write_folder(tmp_path / "data", classes=("healthy", "glioma"))
    with pytest.raises(ValueError, match="unknown label 'glioma'"):
        load_image_dataset(root, class_names=["healthy", "tumor"])


def test_csv_and_jsonl_manifests(tmp_path):
    root = write_folder(tmp_path / "data")
    (tmp_path / "m.csv").write_text(
        "path,caption,label,modality\n"
        "data/healthy/0.png,axial T1 brain MRI,healthy,MRI\n"
        "data/tumor/0.png,,tumor,MRI\n"
    )
    dataset = load_image_dataset(tmp_path / "m.csv")
    assert dataset["caption"] == ["axial T1 brain MRI", "MRI, tumor"]
    rows = [{"path": str(root / "tumor" / "1.png"), "text": "a tumor", "label": "tumor"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dataset = load_image_dataset(tmp_path / "m.jsonl", class_names=["healthy", "tumor"])
    assert dataset[0]["caption"] == "a tumor" and dataset[0]["label"] == 1


def test_a_folder_with_a_manifest_at_its_root_is_read_through_it(tmp_path):
    """The shared fundus set's layout: images/<class>/*.png and labels.csv (file, integer label, class_name)."""
    root = tmp_path / "fundus"
    write_folder(root / "images", classes=("cataract", "normal"), mode="RGB")
    (root / "labels.csv").write_text("file,label,class_name\n" + "".join(
        f"images/{name}/{i}.png,{code},{name}\n" for code, name in enumerate(("cataract", "normal")) for i in range(3)))
    dataset = load_image_dataset(root)
    assert dataset.features["label"].names == ["cataract", "normal"]  # class_name, not the folder "images"
    assert sorted(dataset["label"]) == [0, 0, 0, 1, 1, 1] and dataset[0]["image"].mode == "RGB"
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "fundus/images/normal/2.png", "label": "x"}))
    only = load_image_dataset(tmp_path / "metadata.jsonl")
    assert only.features["label"].names == ["x"] and only[0]["source"].endswith("normal/2.png")


def test_manifest_errors(tmp_path):
    (tmp_path / "nopath.csv").write_text("image,label\na.png,x\n")
    with pytest.raises(ValueError, match=r"no image column, one of \['path', 'file', 'file_name'\]"):
        load_image_dataset(tmp_path / "nopath.csv")
    (tmp_path / "missing.csv").write_text("path\nnowhere.png\n")
    with pytest.raises(ValueError, match="row 1: image file .*nowhere.png does not exist"):
        load_image_dataset(tmp_path / "missing.csv")
    (tmp_path / "bad.jsonl").write_text('{"path": "a.png"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_image_dataset(tmp_path / "bad.jsonl")


def test_npz_like_shared_data(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (5, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 1, 2, 0, 1]), class_names=np.array(["a", "b", "c"]))
    dataset = load_image_dataset(tmp_path / "d.npz")
    assert dataset.features["label"].names == ["a", "b", "c"]
    np.testing.assert_array_equal(np.asarray(dataset[3]["image"]), images[3])


def test_npz_nan_and_bad_labels(tmp_path):
    images = np.zeros((3, 8, 8), np.float32)
    images[1, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", images=images)
    with pytest.raises(ValueError, match=r"images \[1\] contain NaN or Inf"):
        load_image_dataset(tmp_path / "nan.npz")
    np.savez(tmp_path / "lab.npz", images=np.zeros((2, 8, 8), np.uint8), labels=np.array([0, 5]), class_names=np.array(["a"]))
    with pytest.raises(ValueError, match="image 1 has label 5"):
        load_image_dataset(tmp_path / "lab.npz")


def test_dicom_with_rescale_and_window(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.tile(np.arange(0, 200, 10, dtype=np.uint16), (20, 1))
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100  # values -100 .. 280
    ds.WindowCenter, ds.WindowWidth = 90, 380
    ds.PixelData = pixels.tobytes()
    (tmp_path / "scans" / "tumor").mkdir(parents=True)
    ds.save_as(tmp_path / "scans" / "tumor" / "a.dcm", enforce_file_format=True)
    (tmp_path / "scans" / "tumor" / "b.dcm").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="b.dcm: unreadable or corrupt DICOM"):
        load_image_dataset(tmp_path / "scans")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = load_image_dataset(tmp_path / "scans", on_error="skip")
    image = np.asarray(dataset[0]["image"])
    assert image.shape == (20, 20) and image[0, 0] == 0 and image[0, -1] == 255
    assert np.all(np.diff(image[0].astype(int)) > 0)  # the window maps the ramp monotonically


def test_nifti_slices_along_axis(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    volume = np.zeros((12, 10, 6), np.float32)
    volume[2:10, 2:8, 1:5] = np.arange(4)[None, None, :] + 1.0  # slices 0 and 5 are empty
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    dataset = load_image_dataset(tmp_path / "v.nii.gz")
    assert len(dataset) == 4
    assert dataset[0]["image"].size == (10, 12)
    assert dataset[0]["source"].endswith("v.nii.gz#slice=1")
    brightness = [np.asarray(dataset[i]["image"]).max() for i in range(4)]
    assert brightness == sorted(brightness)  # one window for the volume keeps slices comparable
    axial = load_image_dataset(tmp_path / "v.nii.gz", slice_axis=0, skip_empty_slices=False)
    assert len(axial) == 12


def test_image_transform_range_and_channels():
    gray = Image.fromarray(np.array([[0, 255], [128, 64]], np.uint8)).resize((40, 30))
    tensor = image_transform(16)(gray)
    assert tensor.shape == (1, 16, 16)
    assert tensor.min() >= -1 and tensor.max() <= 1
    rgb = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
    assert image_transform(16)(rgb).shape == (3, 16, 16)


def test_random_affine_is_small_seeded_and_optional():
    images = torch.rand(8, 1, 32, 32) * 2 - 1
    a = random_affine(images, generator=torch.Generator().manual_seed(0))
    b = random_affine(images, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(random_affine(images, prob=0.0), images)
    moved = random_affine(images, prob=1.0, generator=torch.Generator().manual_seed(1))
    assert (moved - images).abs().mean() > 0.01
    smooth = torch.linspace(-1, 1, 32).expand(8, 1, 32, 32)
    assert (random_affine(smooth, prob=1.0, generator=torch.Generator().manual_seed(1)) - smooth)[..., 4:-4, 4:-4].abs().max() < 0.3
