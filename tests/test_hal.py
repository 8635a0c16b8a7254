"""HAL backends: real readings where the machine has them, missing-with-reason where not."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from adaptopt.hal import analytic, ncu, nvml, registry
from adaptopt.hal.base import Reading
from adaptopt.hal.perf import EVENTS, PerfBackend, probe_events
from adaptopt.hal.rusage import RusageBackend


def busy_work() -> None:
    """CPU time, fresh pages (page faults) and a sleep (a context switch)."""
    total = 0
    for i in range(200_000):
        total += i
    for _ in range(4):
        np.ones(2_000_000, np.float64).sum()  # 16 MB each: new pages are faulted in
    import time
    time.sleep(0.002)


def test_perf_software_events_are_counted_for_real():
    backend = PerfBackend()
    assert backend.availability().available, backend.availability().reason
    probe = backend.start()
    busy_work()
    readings = probe.stop(runs=1)
    assert readings["task_clock"].value > 0 and readings["task_clock"].unit == "ms/run"
    assert readings["page_faults"].value > 0
    assert readings["context_switches"].value >= 1  # the sleep gives the CPU away
    for name in ("task_clock", "page_faults", "context_switches", "cpu_migrations"):
        assert readings[name].backend == "perf" and readings[name].measured


def test_perf_hardware_events_real_or_missing_with_the_errno():
    status = probe_events()
    readings = PerfBackend().start().stop(runs=1)
    for event in (e for e in EVENTS if e.hardware):
        reading = readings[event.name]
        if status[event.name]:  # this VM: the PMU is not exposed
            assert reading.value is None and reading.missing
            assert "Errno" in reading.reason and "not supported" in reading.reason
        else:  # a machine with a PMU: a real count
            assert reading.value is not None and reading.value >= 0
    ipc = readings["ipc"]
    assert not ipc.measured  # derived, never claimed measured
    if status["cycles"]:
        assert ipc.value is None and ipc.reason


def test_perf_describe_lists_every_event():
    info = PerfBackend().describe()
    assert set(info["events"]) == {e.name for e in EVENTS}
    assert info["events"]["task_clock"] == "available"


def test_rusage_counts_cpu_time_and_reads_the_clock():
    probe = RusageBackend().start()
    busy_work()
    readings = probe.stop(runs=2)
    assert readings["cpu_time"].value > 0
    assert readings["max_rss"].value > 1 and readings["max_rss"].unit == "MiB"
    assert not readings["cpu_utilization"].measured
    mhz = readings["cpu_mhz"]
    assert (mhz.value is not None and mhz.value > 0) or mhz.reason
    assert all(r.backend == "rusage" for r in readings.values())


def test_analytic_readings_are_derived_arithmetic():
    readings = analytic.readings(flops=4e9, bytes_moved=2e9, median_ms=1000.0)
    assert readings["achieved_gflops"] == Reading(4.0, "GFLOP/s", "analytic", False)
    assert readings["achieved_gbs"].value == 2.0
    lower = analytic.readings(1e9, 1e9, 500.0, unknown_nodes=3)
    assert "3 node(s)" in lower["achieved_gflops"].reason
    none = analytic.readings(1e9, 1e9, 0.0)
    assert none["achieved_gflops"].value is None and none["achieved_gflops"].reason


def test_registry_is_explicit_and_gpu_backends_only_for_gpu_targets():
    assert [b.name for b in registry.BACKENDS] == ["perf", "rusage", "analytic", "nvml", "ncu"]
    assert [b.name for b in registry.selected(("perf", "nvml", "ncu", "analytic"), "cpu")] == ["perf", "analytic"]
    assert {b.name for b in registry.selected(("perf", "nvml"), "cuda")} == {"perf", "nvml"}
    assert all(b.live for b in registry.live_available(("perf", "rusage", "analytic"), "cpu"))
    with pytest.raises(KeyError):
        registry.get("papi")
    for entry in registry.describe_all():
        assert isinstance(entry["available"], bool) and entry["reason"]


def test_reading_serialises_with_backend_and_measured():
    assert Reading(None, "count/run", "perf", True, "no PMU").to_dict() == {
        "value": None, "unit": "count/run", "backend": "perf", "measured": True, "reason": "no PMU"}


def _nvml_available() -> bool:
    return nvml.NvmlBackend().availability().available


def test_nvml_says_why_when_unavailable():
    availability = nvml.NvmlBackend().availability()
    if availability.available:
        pytest.skip("NVML works here; covered by the gpu test")
    assert availability.reason and ("nvidia-ml-py" in availability.reason or "NVML" in availability.reason)


@pytest.mark.gpu
@pytest.mark.skipif(not _nvml_available(), reason="no NVIDIA GPU / NVML here")
def test_nvml_samples_during_a_loop():
    probe = nvml.NvmlBackend().start()
    import time
    time.sleep(0.05)
    readings = probe.stop(runs=1)
    assert readings["samples"].value >= 1
    assert readings["sm_clock"].value is None or readings["sm_clock"].value > 0
    assert all(r.backend == "nvml" for r in readings.values())


def test_ncu_unavailable_without_nsight_compute():
    availability = ncu.NcuBackend().availability()
    assert availability.available == (shutil.which("ncu") is not None)
    if not availability.available:
        assert "not on PATH" in availability.reason


def test_ncu_csv_is_averaged_weighted_by_kernel_time():
    header = '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"'
    rows = [
        '"0","k1","gpu__time_duration.sum","nsecond","1,000"',
        '"0","k1","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","80"',
        '"0","k1","lts__t_sector_hit_rate.pct","%","50"',
        '"1","k2","gpu__time_duration.sum","nsecond","3,000"',
        '"1","k2","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","40"',
    ]
    readings = ncu.parse_csv("==PROF== Connected to process\n" + "\n".join([header] + rows))
    assert math.isclose(readings["dram_throughput"].value, (80 * 1000 + 40 * 3000) / 4000)
    assert readings["l2_hit_rate"].value == 50.0
    assert readings["l1_hit_rate"].value is None and "l1tex" in readings["l1_hit_rate"].reason
    assert readings["kernels"].value == 2
