"""bench/gpu_power.py: the summary of nvidia-smi's samples (lines as the H100 printed them), and a
sampler that reports no samples, rather than failing the benchmark, where nvidia-smi is missing."""
import shutil

from bench.gpu_power import PowerSampler, parse


def test_summary_of_samples_skips_unreadable_lines():
    lines = ["1657, 661.20, 700.00", "1980, 300.50, 700.00", "1410, 698.10, 700.00",
             "[N/A], 60.00, 700.00", "1980, 71.3", ""]
    assert parse(lines) == dict(sm_mhz=1657, watts=553, limit_w=700, samples=3)
    assert parse([]) == {"samples": 0}


def test_sampler_without_nvidia_smi_reports_no_samples(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no nvidia-smi on it
    assert shutil.which("nvidia-smi") is None
    with PowerSampler(0) as power:
        pass
    assert power.summary() == {"samples": 0}
