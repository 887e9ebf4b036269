"""Real DALI (CPU) and the PyTorch loader over files written by hand: sharding, labels,
pixels against a Pillow decode, resumption, bad input."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from partialfc.data.dataset_index import open_dataset
from partialfc.data.loader import batches_per_epoch
from partialfc.data.recordio import RecordIOError
from partialfc.data.torch_loader import TorchLoader
from tests.data_helpers import (hand_image_payload, jpeg_bytes, smooth_image, write_hand_rec,
                                write_header_dataset, write_unique_label_dataset)

N = 203  # not a multiple of any batch or world size used below


@pytest.fixture(scope="module")
def unique(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("unique") / "u"
    write_unique_label_dataset(prefix, N)
    return open_dataset(prefix)


def dali_loader(*args, **kwargs):
    pytest.importorskip("nvidia.dali")
    from partialfc.data.dali_loader import DaliLoader
    return DaliLoader(*args, device="cpu", **kwargs)


def torch_loader(*args, **kwargs):
    return TorchLoader(*args, device="cpu", num_workers=0, **kwargs)


LOADERS = [pytest.param(dali_loader, marks=pytest.mark.required, id="dali"), pytest.param(torch_loader, id="torch")]


def pillow_reference(keys) -> torch.Tensor:
    """The contract's normalisation of a Pillow decode of the test JPEGs, (N, 3, 112, 112)."""
    decoded = [np.asarray(Image.open(io.BytesIO(jpeg_bytes(smooth_image(k)))).convert("RGB")) for k in keys]
    return torch.from_numpy(np.stack(decoded).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)


def record_match(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """bool (2, N): image i equals (row 0) or mirrors (row 1) the record labelled labels[i]."""
    ref = pillow_reference(labels.tolist())
    return torch.stack([(images - ref).abs().amax(dim=(1, 2, 3)) < 0.1,
                        (images.flip(-1) - ref).abs().amax(dim=(1, 2, 3)) < 0.1])


@pytest.mark.parametrize("make", LOADERS)
@pytest.mark.parametrize("world", [2, 3])
def test_each_sample_once_per_epoch_across_ranks(unique, make, world):
    batch = 16
    loaders = [make(unique, batch, rank=r, world_size=world, drop_last=False, seed=3) for r in range(world)]
    expected_batches = batches_per_epoch(N, world, batch, drop_last=False)
    for epoch in range(2):  # DALI rotates shards between epochs
        labels = []
        for loader in loaders:
            batches = list(loader)
            assert len(batches) == len(loader) == expected_batches  # same count on every rank
            for images, lab in batches:
                assert images.dtype == torch.float32 and images.shape[1:] == (3, 112, 112)
                assert lab.dtype == torch.int64 and len(lab) == len(images)
                assert bool(record_match(images, lab).any(dim=0).all())  # pixels are the label's record
            labels += [lab for _, lab in batches]
        assert sorted(torch.cat(labels).tolist()) == list(range(N)), f"epoch {epoch}"


@pytest.mark.parametrize("make", LOADERS)
def test_drop_last_gives_full_equal_batches(unique, make):
    counts = []
    for r in range(3):
        batches = list(make(unique, 16, rank=r, world_size=3, drop_last=True))
        assert all(len(lab) == 16 for _, lab in batches)
        assert len({tuple(lab.tolist()) for _, lab in batches}) == len(batches)
        counts.append(len(batches))
    assert counts == [(N // 3) // 16] * 3


@pytest.mark.required
def test_dali_and_torch_give_same_pixels(unique):
    kwargs = dict(rank=0, world_size=1, shuffle=False, flip=False, drop_last=False)
    dali_images, dali_labels = next(iter(dali_loader(unique, 32, **kwargs)))
    torch_images, torch_labels = next(iter(torch_loader(unique, 32, **kwargs)))
    assert dali_labels.tolist() == torch_labels.tolist() == list(range(32))
    diff = (dali_images - torch_images).abs() * 127.5  # in uint8 levels
    assert diff.max() <= 6 and diff.mean() < 0.5, (diff.max(), diff.mean())
    assert (torch_images - pillow_reference(range(32))).abs().max() < 1e-6


@pytest.mark.required
def test_dali_flip_mirrors_images(unique):
    images, labels = next(iter(dali_loader(unique, 64, rank=0, world_size=1, shuffle=False, flip=True)))
    straight, flipped = record_match(images, labels)
    assert bool((flipped | straight).all()) and 10 < int(flipped.sum()) < 54


@pytest.mark.parametrize("make", LOADERS)
@pytest.mark.parametrize("drop_checkpoint", [False, True])
def test_resume_from_saved_position(unique, make, drop_checkpoint):
    def run():
        return make(unique, 16, rank=1, world_size=2, seed=5)
    first = run()
    reference = [lab for epoch in range(2) for _, lab in first]
    second = run()
    it = iter(second)
    consumed = [next(it)[1] for _ in range(4)]
    state = second.state_dict()
    if drop_checkpoint:
        state.pop("dali_checkpoint", None)
    assert (state["epoch"], state["batches_consumed"]) == (0, 4)
    resumed = run()
    resumed.load_state_dict(state)
    rest = [lab for _, lab in resumed] + [lab for _, lab in resumed]  # rest of epoch 0, then epoch 1
    assert [t.tolist() for t in consumed + rest] == [t.tolist() for t in reference]


def test_position_saved_on_another_layout_keeps_the_samples_consumed(unique):
    """4 batches of 16 on each of 2 ranks = 128 samples; on 3 ranks of 8 that is batch 5 (of 8)."""
    saved = torch_loader(unique, 16, rank=1, world_size=2, seed=5).state_dict()
    saved.update(epoch=1, batches_consumed=4)
    resumed = torch_loader(unique, 8, rank=2, world_size=3, seed=5)
    resumed.load_state_dict(saved)
    assert (resumed.epoch, resumed.batches_consumed) == (1, 128 // 24)
    fresh = torch_loader(unique, 8, rank=2, world_size=3, seed=5)
    epoch_one = [lab.tolist() for epoch in range(2) for _, lab in fresh][len(fresh):]
    assert [lab.tolist() for _, lab in resumed] == epoch_one[128 // 24:]
    saved.update(batches_consumed=len(torch_loader(unique, 16, rank=1, world_size=2)))  # the whole epoch
    resumed.load_state_dict({**saved, "batch_size": 64})
    assert resumed.batches_consumed == len(resumed)


def test_forever_runs_epoch_after_epoch(unique):
    loader = torch_loader(unique, 16, rank=0, world_size=2, seed=1)
    stream = loader.forever()
    got = [next(stream)[1].tolist() for _ in range(2 * len(loader) + 1)]
    again = torch_loader(unique, 16, rank=0, world_size=2, seed=1)
    expected = [lab.tolist() for epoch in range(3) for _, lab in again][:len(got)]
    assert got == expected and (loader.epoch, loader.batches_consumed) == (2, 1)


@pytest.mark.required
def test_header_dataset_is_read_without_header_records(tmp_path):
    labels = [0] * 5 + [1] * 7 + [2] * 4
    write_header_dataset(tmp_path / "h", labels)
    for make in (torch_loader, dali_loader):
        got = torch.cat([lab for _, lab in make(str(tmp_path / "h"), 4, rank=0, world_size=1,
                                                  shuffle=False, drop_last=False)])
        assert got.tolist() == labels


@pytest.mark.required
def test_labels_above_2_24_reach_the_batch_exactly(tmp_path):
    big = [2**24 + 1 + 2 * k for k in range(8)]
    write_hand_rec(tmp_path / "b", [(k, hand_image_payload(float(np.float32(v)), jpeg_bytes(smooth_image(k)),
                                                           key=k, id2=v)) for k, v in enumerate(big)])
    dataset = open_dataset(tmp_path / "b", num_classes=big[-1] + 1)  # sparse labels: the count is stated
    for make in (torch_loader, dali_loader):
        _, labels = next(iter(make(dataset, 8, rank=0, world_size=1, shuffle=False)))
        assert labels.tolist() == big


@pytest.fixture()
def corrupt(tmp_path):
    records = [(k, hand_image_payload(k, jpeg_bytes(smooth_image(k)), key=k)) for k in range(24)]
    broken = jpeg_bytes(smooth_image(99))
    records[13] = (13, hand_image_payload(13, broken[:200] + os.urandom(300), key=13))
    write_hand_rec(tmp_path / "c", records)
    return str(tmp_path / "c")


@pytest.mark.parametrize("make", LOADERS)
def test_corrupt_jpeg_is_named_or_skipped(corrupt, make):
    with pytest.raises(RecordIOError, match=r"c\.rec.*record 13"):
        for _ in make(corrupt, 8, rank=0, world_size=1, shuffle=False):
            pass
    loader = make(corrupt, 8, rank=0, world_size=1, shuffle=False, drop_last=False,
                  on_error="skip", verify_images=True)
    assert [k for k, _ in loader.dataset.skipped] == [13]
    assert sorted(torch.cat([lab for _, lab in loader]).tolist()) == [k for k in range(24) if k != 13]


def test_a_batch_reaches_a_gpu_from_pinned_memory_without_blocking(monkeypatch):
    """``host_to_device`` to a CUDA device (faked: CPU has none): pageable memory is pinned
    first, pinned memory is not copied again, and the copy is ``non_blocking``; to the CPU it
    is a plain copy."""
    from partialfc.data.loader import host_to_device

    copies = []
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: getattr(self, "pinned", False))

    def pin(self):
        out = self.clone()
        out.pinned = True
        return out

    def to(self, device, non_blocking=False):
        copies.append((torch.device(device).type, getattr(self, "pinned", False), non_blocking))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch.Tensor, "to", to)
    pinned = pin(torch.arange(3))
    host_to_device(torch.arange(3), torch.device("cuda"))
    host_to_device(pinned, torch.device("cuda"))
    host_to_device(torch.arange(3), torch.device("cpu"))
    assert copies == [("cuda", True, True), ("cuda", True, True), ("cpu", False, False)]


@pytest.mark.parametrize("make", LOADERS)
def test_every_batch_copy_goes_through_host_to_device(unique, make, monkeypatch):
    """Both loaders hand images and labels to the device through ``host_to_device`` only (the
    DALI labels were a blocking copy from pageable memory), and the torch loader pins its
    batches in its DataLoader when the device is a GPU."""
    import partialfc.data.dali_loader as dali_module
    import partialfc.data.torch_loader as torch_module
    from partialfc.data.loader import host_to_device

    copied = []

    def recorded(tensor, device):
        copied.append(tensor.dtype)
        return host_to_device(tensor, device)

    for module in (dali_module, torch_module):
        monkeypatch.setattr(module, "host_to_device", recorded)
    loader = make(unique, batch_size=16, rank=0, world_size=1)
    batches = list(loader)
    loader.close()
    kinds = {torch.uint8, torch.int64} if make is torch_loader else {torch.int64}  # DALI decodes on its device
    assert len(copied) == len(kinds) * len(batches) and set(copied) == kinds
    assert TorchLoader(unique, 16, 0, 1, device="cuda", num_workers=0).loader.pin_memory
