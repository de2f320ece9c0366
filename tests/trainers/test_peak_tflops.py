"""The MFU denominator: the dense peak of the exact GPU part and precision, read from the device's name, and
None (never a neighbour's figure) for a part the table lacks or a name that does not say which part it is."""
from __future__ import annotations

import pytest
import torch

from llmsys.trainers.observe import PEAK_TFLOPS, device_peak_tflops, gpu_part, peak_tflops_for


@pytest.mark.parametrize("name, part", [
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 SXM5 80GB", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100-PCIE-40GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA L40S", "L40S"),
])
def test_names_drivers_report_map_to_their_part(name, part):
    assert gpu_part(name)[0] == part


@pytest.mark.parametrize("name", [
    "NVIDIA H100",          # SXM or PCIe? their peaks differ by 30%
    "NVIDIA GH200 480GB",   # contains "H200" but is not one
    "NVIDIA L40",           # not the L40S
    "NVIDIA A10G",
    "NVIDIA GeForce RTX 4090",
])
def test_unknown_or_ambiguous_parts_get_no_peak(name):
    peak, why = peak_tflops_for(name, "bf16")
    assert peak is None and name in why


def test_the_precision_picks_the_column():
    assert peak_tflops_for("NVIDIA H100 PCIe", "bf16")[0] == 756.5
    assert peak_tflops_for("NVIDIA H100 PCIe", "fp16")[0] == 756.5
    assert peak_tflops_for("NVIDIA H100 NVL", "bf16")[0] == 835.5
    assert peak_tflops_for("NVIDIA H200", "bf16")[0] == 989.4
    assert peak_tflops_for("NVIDIA A100-SXM4-40GB", "tf32")[0] == 156.0
    assert peak_tflops_for("NVIDIA L40S", "fp32")[0] == 91.6
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        peak_tflops_for("NVIDIA H200", "int8")


def test_table_is_dense_and_ordered():
    # Dense figures: no entry is a with-sparsity number (2x); tensor-core bf16 > tf32 > CUDA-core fp32.
    for part, peaks in PEAK_TFLOPS.items():
        assert set(peaks) == {"bf16", "tf32", "fp32"}, part
        assert peaks["bf16"] > peaks["tf32"] > 0 and peaks["fp32"] > 0, part
        assert peaks["bf16"] < 1000, part


def test_device_lookup_on_cpu_and_with_override(monkeypatch):
    assert device_peak_tflops(torch.device("cpu"), None) is None
    assert device_peak_tflops(torch.device("cpu"), 3.5, "fp32") == 3.5
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert device_peak_tflops(torch.device("cuda", 0), None) == 756.5
    assert device_peak_tflops(torch.device("cuda", 0), None, "tf32") == 378.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    assert device_peak_tflops(torch.device("cuda", 0), None) is None
