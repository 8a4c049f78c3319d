import numpy as np
import pytest
import torch
from PIL import Image

from maskkit.data.augment import ImageAugment
from maskkit.data.images import DataConfig, Digits, ImageFolder, build_image_dataset, collate, labelled_dataset
from maskkit.errors import MaskkitError


def write_folder(root, corrupt: bool = True):
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    if corrupt:
        (root / "dogs" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


def test_digits_are_real_labelled_and_split_without_overlap():
    train, test = Digits("train", 16), Digits("test", 16)
    assert len(train) + len(test) == 1797 and len(test) == 540
    assert train[0]["images"].shape == (3, 16, 16) and 0 <= train[0]["images"].min() <= train[0]["images"].max() <= 1
    assert set(train.labels.tolist()) == set(range(10))
    train_rows = {tuple(x.flatten().tolist()) for x in train.images[:, 0, ::4, ::4]}
    assert sum(tuple(x.flatten().tolist()) in train_rows for x in test.images[:20, 0, ::4, ::4]) < 5


def test_photos_and_mixtures():
    dataset = build_image_dataset(DataConfig(name="photos+digits", photo_crops=10, image_size=32))
    assert len(dataset) == 10 + 1257
    crop = dataset[3]
    assert crop["images"].shape == (3, 32, 32) and crop["index"] == 3
    assert torch.equal(dataset[3]["images"], crop["images"])      # a fixed data set, crop i is always crop i
    assert dataset[12]["index"] == 12


def test_folder_with_classes_skips_a_corrupt_image_and_counts_it(tmp_path, caplog):
    root = write_folder(tmp_path / "images")
    dataset = ImageFolder(str(root), 16)
    assert dataset.classes == ["cats", "dogs"] and len(dataset) == 9
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["images"].shape == (8, 3, 16, 16) and int(batch["skipped"]) == 1
    assert "broken.jpg" in caplog.text


def test_strict_mode_names_the_corrupt_file(tmp_path):
    root = write_folder(tmp_path / "images")
    dataset = ImageFolder(str(root), 16, strict=True)
    with pytest.raises(MaskkitError, match="broken.jpg"):
        [dataset[i] for i in range(len(dataset))]


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(MaskkitError, match="does not exist"):
        ImageFolder(str(tmp_path / "nope"), 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MaskkitError, match="no images"):
        ImageFolder(str(tmp_path / "empty"), 16)
    with pytest.raises(MaskkitError, match="unknown data set 'imagenet'"):
        build_image_dataset(DataConfig(name="imagenet"))
    with pytest.raises(MaskkitError, match="no single labelled data set"):
        labelled_dataset(DataConfig(name="photos"), "train")
    # A mixture is evaluated on its labelled member.
    assert len(labelled_dataset(DataConfig(name="photos+digits"), "test")) == 540


def test_folder_split_is_disjoint_and_labelled(tmp_path):
    root = write_folder(tmp_path / "images", corrupt=False)
    train = labelled_dataset(DataConfig(name="folder", path=str(root), image_size=16), "train")
    test = labelled_dataset(DataConfig(name="folder", path=str(root), image_size=16), "test")
    assert len(train) + len(test) == 8
    assert not set(map(str, train.dataset.files)) & set(map(str, test.dataset.files))


def test_augmentation_depends_only_on_the_sample_seed():
    cfg = DataConfig(image_size=16)
    augment = ImageAugment(cfg)
    images = torch.rand(4, 3, 24, 24)
    seeds = torch.tensor([5, 6, 7, 8])
    full = augment(images, seeds)
    assert full.shape == (4, 3, 16, 16)
    torch.testing.assert_close(augment(images[[1, 3]], seeds[[1, 3]]), full[[1, 3]])
    assert not torch.allclose(augment(images, seeds + 1), full)
    torch.testing.assert_close(augment.denormalize(augment.normalize(images)), images)


def test_full_crop_without_flip_is_identity():
    cfg = DataConfig(image_size=16, crop_scale=[1.0, 1.0], hflip=False)
    augment = ImageAugment(cfg)
    augment.log_ratio = (0.0, 0.0)
    images = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(augment.denormalize(augment(images, torch.tensor([1, 2]))), images, atol=1e-5, rtol=0)
