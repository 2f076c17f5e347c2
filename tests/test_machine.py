"""The machine a record names: the CPU's model name with its family and model numbers."""

from reproduce.machine import cpu_model, lscpu_model, machine_info

LSCPU = """Architecture:                            x86_64
Vendor ID:                               AuthenticAMD
BIOS Vendor ID:                          QEMU
Model name:                              AMD EPYC
BIOS Model name:                         pc-q35  CPU @ 2.0GHz
CPU family:                              26
Model:                                   2
Thread(s) per core:                      1
"""


def test_lscpu_model_names_the_generation():
    assert lscpu_model(LSCPU) == "AMD EPYC (family 26 model 2)"
    without = "\n".join(line for line in LSCPU.splitlines() if not line.startswith("CPU family"))
    assert lscpu_model(without) == "AMD EPYC"
    assert lscpu_model("Architecture: x86_64\n") is None
    assert lscpu_model("") is None


def test_machine_info_on_this_machine():
    info = machine_info()
    assert info["cpu"] == cpu_model() and info["cpu"]
    assert info["cores"] >= 1 and info["gpu"] is None
