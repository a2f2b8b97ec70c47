"""Output files: large writes bypass the page cache (O_DIRECT), and the bytes are the same.

Test models are small, so the averaging tests never reach the direct path; these use
tensors of several MiB at unaligned offsets, and compare with the page-cache path.
"""

from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import leftovers, oracle_mean, run_cli
from safetensors.torch import load_file, save_file

from ckpt_avg import write

MiB = 1 << 20


def _places(tmp_path: Path) -> list[Path]:
    places = [tmp_path]
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        places.append(shm)  # tmpfs: O_DIRECT refused on older kernels, accepted on newer
    return places


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "page-cache"])
def test_writes_at_any_offset_land_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool) -> None:
    if not direct:
        monkeypatch.setattr(write, "_open_direct", lambda path, fd: None)
    rng = random.Random(3)
    for place in _places(tmp_path):
        path = place / f"ckpt-avg-test-{os.getpid()}-{direct}.bin"
        expected = bytearray(24 * MiB + 123)
        file = write.open_temp(str(path))
        try:
            file.truncate(len(expected))
            writes = [(0, 100), (100, 3 * MiB + 7), (15 * MiB + 5, 9 * MiB + 118), (3 * MiB + 107, 2 * MiB)]
            writes += [(rng.randrange(0, 20 * MiB), rng.randrange(1, 4 * MiB)) for _ in range(6)]
            writes.append((0, 100))  # the header, rewritten last as the safetensors writer does
            for offset, size in writes:
                data = rng.randbytes(size)
                file.pwrite(data, offset)
                expected[offset : offset + size] = data
            write.finish_file(file)
        except BaseException:
            file.close()
            raise
        try:
            assert path.read_bytes() == bytes(expected)
        finally:
            path.unlink()
        if not direct:
            assert file.direct_bytes == 0


def test_large_writes_bypass_the_page_cache_where_the_file_system_allows(tmp_path: Path) -> None:
    path = tmp_path / "probe.bin"
    with write.open_temp(str(path)) as file:
        file.write(b"x" * 10)
        file.write(os.urandom(5 * MiB))  # starts unaligned: head and tail go through the cache
        direct_fd = file._direct_fd
        direct = file.direct_bytes
    if direct_fd is None:
        pytest.skip(f"{tmp_path}: this file system refuses O_DIRECT")  # the page-cache path is tested above
    assert 4 * MiB < direct <= 5 * MiB
    assert path.stat().st_size == 5 * MiB + 10


def _direct_supported(directory: Path) -> bool:
    with write.open_temp(str(directory / "probe")) as file:
        supported = file._direct_fd is not None
    (directory / "probe").unlink()
    return supported


def _checkpoints(directory: Path, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    directory.mkdir()
    generator = torch.Generator().manual_seed(11)
    states = []
    for epoch in range(3):
        state = {
            "a.small": torch.randn(7, generator=generator).to(dtype),
            "b.large": torch.randn(700_001, generator=generator).to(dtype),  # several MiB, odd length
            "c.larger": torch.randn(1201, 2003, generator=generator).to(dtype),  # more than the bounce buffer
            "d.tail": torch.randn(5, generator=generator).to(dtype),
        }
        save_file(state, directory / f"epoch_{epoch}.safetensors")
        states.append(state)
    return states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_averages_are_exact_and_identical_to_the_page_cache_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    states = _checkpoints(tmp_path / "ckpts", dtype)
    expected = {key: oracle_mean([s[key] for s in states]) for key in states[0]}
    outputs = ["avg.safetensors", "avg.pt", "shards/"]
    (tmp_path / "direct").mkdir()
    (tmp_path / "cached").mkdir()
    bypassed = []
    close = write.OutputFile.close

    def recording_close(self: write.OutputFile) -> None:
        bypassed.append(self.direct_bytes)
        close(self)

    monkeypatch.setattr(write.OutputFile, "close", recording_close)
    for output in outputs:
        run_cli(
            str(tmp_path / "ckpts"),
            "-o",
            f"{tmp_path}/direct/{output}",
            *(["--max-shard-size", "6MB"] if output.endswith("/") else []),
        )
    if _direct_supported(tmp_path):
        written = sum(path.stat().st_size for path in (tmp_path / "direct").rglob("*") if path.is_file())
        assert sum(bypassed) > 0.9 * written  # all but the headers and the unaligned edges
    monkeypatch.setattr(write, "_open_direct", lambda path, fd: None)
    for output in outputs:
        run_cli(
            str(tmp_path / "ckpts"),
            "-o",
            f"{tmp_path}/cached/{output}",
            *(["--max-shard-size", "6MB"] if output.endswith("/") else []),
        )
    for path in sorted((tmp_path / "direct").rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (tmp_path / "cached" / path.relative_to(tmp_path / "direct")).read_bytes()
    single = load_file(tmp_path / "direct" / "avg.safetensors")
    loaded = torch.load(tmp_path / "direct" / "avg.pt", weights_only=True)
    shards = {}
    for shard in sorted((tmp_path / "direct" / "shards").glob("*.safetensors")):
        shards.update(load_file(shard))
    assert len(list((tmp_path / "direct" / "shards").glob("*.safetensors"))) > 1
    for key, mean in expected.items():
        assert torch.equal(single[key], mean), key
        assert torch.equal(loaded[key], mean), key
        assert torch.equal(shards[key], mean), key
    with zipfile.ZipFile(tmp_path / "direct" / "avg.pt") as archive:
        assert archive.testzip() is None  # every record's CRC matches its bytes
    assert leftovers(tmp_path / "direct") == []
