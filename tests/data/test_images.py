import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskkit.data.augment import ImageAugment
from maskkit.data.common import Indexed, batch_size_of, collate
from maskkit.data.images import DataConfig, Digits, ImageFolder, build_image_dataset, labelled_dataset
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


def truncated_png(path, seed=0):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])   # the header reads, the pixels do not


def test_folder_with_classes_leaves_out_a_corrupt_image_and_names_it_once(tmp_path, caplog):
    root = write_folder(tmp_path / "images")
    dataset = ImageFolder(str(root), 16)
    again = ImageFolder(str(root), 16, split="test")
    assert dataset.classes == ["cats", "dogs"] and len(dataset) == 8 and len(again) < 8
    assert "broken.jpg" not in " ".join(map(str, dataset.files))
    # Named once, however many sets are built from the folder.
    assert len([r for r in caplog.records if "broken.jpg" in r.getMessage()]) == 1


def test_a_file_that_opens_but_does_not_decode_is_dropped_by_collate(tmp_path):
    root = write_folder(tmp_path / "images", corrupt=False)
    truncated_png(root / "dogs" / "truncated.png")
    dataset = Indexed(ImageFolder(str(root), 16))
    assert len(dataset) == 9
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch["images"].shape == (8, 3, 16, 16) and batch_size_of(batch) == 8
    assert [Path(p).name for p in batch["unreadable"]] == ["truncated.png"]
    assert collate([dataset[8]]) == {"unreadable": [str(root / "dogs" / "truncated.png")]}


def test_loose_images_next_to_class_folders_are_refused(tmp_path):
    root = write_folder(tmp_path / "images", corrupt=False)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "loose.png")
    with pytest.raises(MaskkitError, match=r"1 image at its top level next to class sub-folders \(cats, dogs\)"):
        ImageFolder(str(root), 16)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_a_folder_of_only_unreadable_files_fails_before_training(tmp_path, kind):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        if kind == "garbage":
            (root / f"{i}.jpg").write_bytes(b"not a jpeg")
        else:
            truncated_png(root / f"{i}.png", seed=i)
    with pytest.raises(MaskkitError, match=r"none of the 3 image files under .* can be read"):
        ImageFolder(str(root), 16)


@pytest.mark.parametrize("fraction, held", [(0.3, 3), (0.5, 5), (0.6, 6), (0.9, 9)])
def test_eval_split_holds_out_exactly_that_fraction_of_each_class(tmp_path, fraction, held):
    root = tmp_path / "images"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(root / label / f"{i}.png")
    test = ImageFolder(str(root), 16, split="test", eval_split=fraction)
    train = ImageFolder(str(root), 16, split="train", eval_split=fraction)
    assert test.labels.tolist().count(0) == test.labels.tolist().count(1) == held
    assert len(train) == 20 - 2 * held and not set(train.files) & set(test.files)


def test_eval_split_0_pretrains_on_every_image_of_a_labelled_set(tmp_path):
    from maskkit.config import config_from_dict
    from tests.conftest import tiny_config_dict

    root = write_folder(tmp_path / "images", corrupt=False)
    cfg = config_from_dict(tiny_config_dict(data={"name": "folder+digits", "path": str(root), "eval_split": 0}))
    assert len(build_image_dataset(cfg.data, "train")) == 8 + 1797
    assert len(Digits("test", 16, eval_split=0)) == 0


def test_unreadable_held_out_files_are_reported_and_not_counted(tmp_path, caplog):
    root = write_folder(tmp_path / "images", corrupt=False)
    (root / "cats" / "-broken.png").write_bytes(b"nothing")      # sorts first: a held-out position
    test = ImageFolder(str(root), 16, split="test", eval_split=0.5)
    train = ImageFolder(str(root), 16, split="train", eval_split=0.5)
    assert "-broken.png" in caplog.text
    # round(5 / 2) = 3 of the 5 cats are held out, the broken one among them; 2 of the 4 dogs.
    assert (len(test), len(train)) == (2 + 2, 2 + 2)


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


def test_files_that_are_not_images_are_counted_and_named_and_non_ascii_names_work(tmp_path, caplog):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label in ("café", "日本"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / label / f"crème {i}.PNG")
    (root / "café" / "IMG_0001.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")   # an iPhone photo
    (root / "日本" / "notes.txt").write_text("where these came from")
    (root / "labels.csv").write_text("file,label\n")
    (root / "café" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")            # hidden: never an image
    (root / "café" / "._crème 0.PNG").write_bytes(b"\x00\x05\x16\x07")              # macOS's copy of its metadata
    with caplog.at_level("WARNING", logger="maskkit"):
        dataset = ImageFolder(str(root), 16)
    assert dataset.classes == ["café", "日本"] and len(dataset) == 6
    assert [Path(p).name for p in dataset.files[:3]] == ["crème 0.PNG", "crème 1.PNG", "crème 2.PNG"]
    assert "skipped 3 files that are not images (.csv, .heic, .txt" in caplog.text
    assert "IMG_0001.heic" in caplog.text and "notes.txt" in caplog.text and "labels.csv" in caplog.text
    assert ".DS_Store" not in caplog.text and "._crème" not in caplog.text
    (tmp_path / "phone").mkdir()
    (tmp_path / "phone" / "IMG_0002.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.raises(MaskkitError, match=r"no images .* found under .*phone, only 1 other files such as IMG_0002.HEIC"):
        ImageFolder(str(tmp_path / "phone"), 16)
