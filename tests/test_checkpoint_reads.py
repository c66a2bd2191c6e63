"""Reading checkpoint tensors in place: every path gives what safetensors' own loader gives."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_flexgen.memory import checkpoint
from hf_flexgen.memory.checkpoint import ALIGN, CheckpointIndex, direct_buffer, direct_span


@pytest.fixture
def odd_checkpoint(tmp_path):
    """Tensors of odd sizes and mixed dtypes, so most start off any 4096-byte boundary,
    one larger than a page and one empty."""
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g).half(), "b": torch.randn(1031, generator=g),
               "c": torch.randn(77, 129, generator=g).bfloat16(), "d": torch.arange(7, dtype=torch.int64),
               "e": torch.randn(2000, 3, generator=g), "empty": torch.zeros(0, 4)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path


def test_direct_buffer_is_aligned_and_large_enough():
    for nbytes in (0, 1, ALIGN - 1, ALIGN, 3 * ALIGN + 5):
        buffer = direct_buffer(nbytes)
        assert buffer.data_ptr() % ALIGN == 0 and len(buffer) == direct_span(nbytes)
        assert len(buffer) >= nbytes + ALIGN - 1 and len(buffer) % ALIGN == 0


@pytest.mark.parametrize("direct", ["o_direct", "refused", "no_o_direct"])
def test_read_into_matches_safetensors(odd_checkpoint, monkeypatch, direct):
    if direct == "refused":  # the kernel answers EINVAL (e.g. a file system without direct I/O)
        monkeypatch.setattr(checkpoint, "read_direct", lambda *a: False)
    if direct == "no_o_direct":
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    outcomes = []
    if direct == "o_direct":
        real = checkpoint.read_direct
        monkeypatch.setattr(checkpoint, "read_direct", lambda *a: outcomes.append(real(*a)) or outcomes[-1])
    expected = load_file(str(odd_checkpoint))
    index = CheckpointIndex([odd_checkpoint])
    buffers = {name: direct_buffer(loc.nbytes) for name, loc in index.locations.items()}
    for _ in range(2):  # the same buffers again: nothing left over from the first pass matters
        for name, want in expected.items():
            got = index.read_into(name, buffers[name])
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got, want), name
            assert torch.equal(index.read(name), want), name
    assert index.bytes_read == 4 * sum(t.numel() * t.element_size() for t in expected.values())
    index.close()
    if direct == "o_direct" and not any(outcomes):
        pytest.skip(f"the file system of {odd_checkpoint.parent} refuses O_DIRECT: only the fallback ran")


def test_read_into_a_too_small_buffer_still_reads(odd_checkpoint):
    index = CheckpointIndex([odd_checkpoint])
    got = index.read_into("e", direct_buffer(16))
    assert torch.equal(got, load_file(str(odd_checkpoint))["e"])
    index.close()


@pytest.mark.parametrize("sync", ["sync_file_range", "refused", "absent"])
def test_disk_kv_cache_reads_back_what_it_wrote(tmp_path, monkeypatch, sync):
    """The disk KV cache writes each append back at once (sync_file_range, else fdatasync)
    and drops it from the page cache; reads still return exactly what was appended."""
    from hf_flexgen.memory.kv_cache import DiskKVStorage

    if sync == "refused":
        monkeypatch.setattr(checkpoint, "_sync_range", lambda *args: -1)
    elif sync == "absent":
        monkeypatch.setattr(checkpoint, "_sync_range", None)
    storage = DiskKVStorage(tmp_path, torch.device("cpu"))
    try:
        g = torch.Generator().manual_seed(0)
        prompt = [torch.randn(3, 2, 5, 7, generator=g), torch.randn(3, 2, 5, 7, generator=g).half()]
        storage.write(0, prompt, capacity=9)
        steps = []
        for start in range(5, 8):
            step = [torch.randn(3, 2, 1, 7, generator=g), torch.randn(3, 2, 1, 7, generator=g).half()]
            storage.write(start, step, capacity=9)
            steps.append(step)
        keys, values = storage.read(8)
        assert torch.equal(keys, torch.cat([prompt[0], *(s[0] for s in steps)], dim=2))
        assert torch.equal(values, torch.cat([prompt[1], *(s[1] for s in steps)], dim=2))
    finally:
        storage.close()


def test_write_back_of_nothing_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_sync_range", lambda *args: pytest.fail("synced nothing"))
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        checkpoint.write_back(fd, 0, 0)
    finally:
        os.close(fd)


def test_disk_kv_cache_on_a_full_disk_says_so(tmp_path, monkeypatch):
    import errno

    from hf_flexgen.memory.kv_cache import DiskKVStorage

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    storage = DiskKVStorage(tmp_path, torch.device("cpu"))
    try:
        with pytest.raises(OSError, match="no room for a .* KV cache file in the offload directory"):
            storage.write(0, [torch.ones(2, 2, 3, 4)], capacity=8)
    finally:
        storage.close()
