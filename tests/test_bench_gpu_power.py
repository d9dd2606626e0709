"""bench/gpu_power.py: the summary of nvidia-smi's samples (lines as the H100 printed them), and a
sampler that reports no samples, rather than failing the benchmark, where nvidia-smi is missing."""
import datetime
import shutil

from bench.gpu_power import PowerSampler, parse


def test_summary_of_the_samples_in_the_window_skips_unreadable_lines():
    lines = ["2026/11/24 10:00:00.050, 1980, 70.10, 700.00",  # before the timed work
             "2026/11/24 10:00:00.150, 1657, 661.20, 700.00", "2026/11/24 10:00:00.250, 1980, 300.50, 700.00",
             "2026/11/24 10:00:00.350, 1410, 698.10, 700.00", "2026/11/24 10:00:00.450, [N/A], 60.00, 700.00",
             "2026/11/24 10:00:00.550, 1980, 71.3", "",
             "2026/11/24 10:00:00.650, 1980, 65.00, 700.00"]  # after it
    start = datetime.datetime(2026, 11, 24, 10, 0, 0, 100000).timestamp()
    end = datetime.datetime(2026, 11, 24, 10, 0, 0, 600000).timestamp()
    assert parse(lines, start, end) == dict(sm_mhz=1657, watts=553, limit_w=700, samples=3)
    assert parse(lines)["samples"] == 5
    assert parse([]) == {"samples": 0}


def test_sampler_without_nvidia_smi_reports_no_samples(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no nvidia-smi on it
    assert shutil.which("nvidia-smi") is None
    with PowerSampler(0) as power:
        pass
    assert power.summary() == {"samples": 0}
