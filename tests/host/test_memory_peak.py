"""host.memory_peak: the anonymous peak a job logs sees memory held and freed between samples'
ends, and leaves memory-mapped files out (the resident high-water mark counts them)."""

import mmap
import time

import numpy as np

from kolors_story.host.memory_peak import AnonymousPeak, resident_high_water_gib, status_kib

MIB = 2**20


def test_the_anonymous_peak_sees_memory_freed_before_the_end(tmp_path):
    peak = AnonymousPeak(interval_s=0.02).start()
    held = np.ones(400 * MIB, dtype=np.uint8)  # touched: resident
    time.sleep(0.2)
    before = peak.peak_kib
    del held
    assert peak.stop() >= 0.38 and before * 1024 >= 380 * MIB


def test_mapped_file_pages_count_in_rss_but_not_as_anonymous(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"\1" * (300 * MIB))
    baseline = status_kib("RssAnon")
    peak = AnonymousPeak(interval_s=0.02).start()
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert sum(mapped[i] for i in range(0, len(mapped), 4096)) == len(mapped) // 4096  # every page read
        time.sleep(0.1)
        mapped_kib = status_kib("RssFile")
    anonymous_kib = peak.stop() * MIB
    assert mapped_kib * 1024 >= 290 * MIB and resident_high_water_gib()[0] * MIB >= mapped_kib
    assert (anonymous_kib - baseline) * 1024 < 50 * MIB
