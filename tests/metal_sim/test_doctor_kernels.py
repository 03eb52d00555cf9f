"""`zkv-mlx doctor --kernels` runs a kernel variant against the reference (here with the simulator as the GPU)."""

import mlx.core as mx

from zkv_mlx import kernel_check, sysinfo

from . import fake_metal_kernel


def test_doctor_kernels_case_passes_on_simulated_metal(monkeypatch):
    monkeypatch.setattr(mx.fast, "metal_kernel", fake_metal_kernel)
    ok, gb_s = kernel_check._case("int4", 64, 16, two_pass=True, L=512, iters=1)
    assert ok and gb_s > 0


def test_doctor_kernels_without_metal_points_to_the_simulator(capsys):
    assert sysinfo.backend() == "cpu"
    assert kernel_check.run(json_out=False) == 0
    assert "simulator" in capsys.readouterr().out
