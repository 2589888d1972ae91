import logging
import resource

import pytest
import torch

from cegppo.trainer import host_memory

BUFFER_BYTES = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB)


def _page_faults_of_a_fresh_buffer() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = torch.empty(BUFFER_BYTES // 4)
    buffer.fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del buffer
    return faults


@pytest.mark.skipif(host_memory.glibc_version() is None, reason="glibc's allocator only")
def test_a_freed_large_buffer_is_reused_without_page_faults():
    host_memory.keep_freed_host_memory()
    # The heap grows first, twice: an aligned request does not fit the first freed block exactly.
    for _ in range(2):
        _page_faults_of_a_fresh_buffer()
    pages = BUFFER_BYTES // resource.getpagesize()
    assert _page_faults_of_a_fresh_buffer() < pages // 10


def test_off_or_without_glibc_nothing_changes_and_only_an_explicit_request_warns(monkeypatch, caplog):
    monkeypatch.setattr(host_memory, "_kept", False)
    monkeypatch.setattr(host_memory, "glibc_version", lambda: None)
    with caplog.at_level(logging.WARNING):
        assert host_memory.keep_freed_host_memory(False) is False
        assert host_memory.keep_freed_host_memory(None) is False
        assert not caplog.records
        assert host_memory.keep_freed_host_memory(True) is False
    assert "trainer.keep_host_memory=true has no effect" in caplog.text
