"""Every command block of README.md runs here, at the smoke preset, so the README cannot drift from the code.

Shell lines are mapped to the smallest run that exercises them (`--preset smoke`, a few images, the shipped
sample instead of `--data-root`); a line that cannot run inside a test says why and checks what it can.
Python blocks run as written after a prelude that defines the names they assume (a tiny encoder, loader...).
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_TRAIN

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# the README's runs are --preset cpu runs, VGG11-BN like Table 1's arms (smoke alone is ResNet-20)
SMOKE_TRAIN = [*TINY_TRAIN[:2], "--arch", "vgg11_bn", *TINY_TRAIN[2:]]
SMALL_ATTACK = [
    "--epochs",
    "1",
    "--max-train-images",
    "16",
    "--max-test-images",
    "20",
    "--no-progress",
    "--threads",
    "1",
]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands() -> list[str]:
    """The shell blocks' commands, continuation lines joined, comments dropped."""
    out = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _drop(args: list[str], *flags: str) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out


def test_readme_has_the_two_commands_first():
    first = _commands()[:2]
    assert [c.split()[:2] for c in first] == [["make", "demo"], ["make", "test"]]


def test_make_and_pip_lines_name_real_targets_and_extras():
    """`make X` and `pip install ".[extra]"` cannot run inside the suite (they build environments; `make test`
    is this suite): each target must exist in the Makefile and each extra in pyproject.toml."""
    makefile = (ROOT / "Makefile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    for cmd in _commands():
        words = shlex.split(cmd)
        if words[0] == "make":
            target = [w for w in words[1:] if "=" not in w][0]
            assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), cmd
        if words[:2] == ["pip", "install"]:
            for extra in re.findall(r"\[([a-z,]+)\]", cmd):
                for name in extra.split(","):
                    assert re.search(rf"^{name} = ", pyproject, flags=re.M), (cmd, name)


@pytest.mark.parametrize("script", sorted({shlex.split(c)[1] for c in _commands() if c.startswith("python bench/")}))
def test_bench_lines_parse(script):
    """The benchmarks take minutes (their numbers live in bench/RESULTS.md); their command lines must parse."""
    proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _client(tmp_path):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.Sigmoid())


def test_reproduce_and_audit_lines_at_the_smoke_preset(tmp_path, monkeypatch):
    from cem_fast.audit import __main__ as audit_cli
    from reproduce import attack, figure, grid, table, train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_model.py").write_text(
        "import torch\n\ndef client_encoder():\n    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.Sigmoid())\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import my_model

        torch.save(my_model.client_encoder().state_dict(), tmp_path / "client.pt")
    finally:
        sys.path.remove(str(tmp_path))
    ran = []
    for cmd in _commands():
        words = shlex.split(cmd)
        if words[:2] != ["python", "-m"]:
            continue
        module, args = words[2], words[3:]
        if module == "reproduce.train":
            rc = train.main([*_drop(args, "--preset", "--dataset", "--data-root"), *SMOKE_TRAIN])
        elif module == "reproduce.attack":
            rc = attack.main([*args, *SMALL_ATTACK])
        elif module == "reproduce.table":
            rc = table.main([*_drop(args, "--data-root", "--preset"), "--preset", "smoke"])
        elif module == "reproduce.figure":
            rc = figure.main(args)
        elif module == "reproduce.grid":  # the CPU study is 21 runs of ~40 minutes: check what it would run
            rc = grid.main([*args, "--dry-run"])
        elif module == "cem_fast.audit":
            rc = audit_cli.main([*args, "--preset", "smoke", "--threads", "1", "--no-progress"])
        else:
            raise AssertionError(f"the README runs a module this test does not know: {cmd}")
        assert rc == 0, cmd
        ran.append(module)
    assert {"reproduce.train", "reproduce.attack", "reproduce.table", "reproduce.figure", "cem_fast.audit"} <= set(ran)
    assert (tmp_path / "audit" / "report.json").is_file() and (tmp_path / "fig5.png").is_file()


def test_python_blocks_run(tmp_path, monkeypatch):
    """The loss example and the audit example, with the names they assume defined on a tiny problem."""
    monkeypatch.chdir(tmp_path)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(96, 3, 16, 16, generator=gen)
    labels = torch.randint(0, 10, (96,), generator=gen)
    mean, std = (
        torch.tensor((0.4914, 0.4822, 0.4465))[:, None, None],
        torch.tensor((0.247, 0.243, 0.261))[:, None, None],
    )
    normalized = (images - mean) / std
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.Sigmoid())
    server = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10))
    prelude = {
        "encoder": encoder,
        "server": server,
        "client_encoder": encoder,
        "epochs": 2,
        "loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(normalized, labels), batch_size=32),
        "opt": torch.optim.SGD([*encoder.parameters(), *server.parameters()], lr=0.05),
        "train_x": normalized[:64],
        "train_y": labels[:64],
        "test_x": normalized[64:],
        "test_y": labels[64:],
    }
    blocks = _blocks("python")
    assert len(blocks) >= 2
    for block in blocks:
        namespace = dict(prelude)
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["report"].worst and (tmp_path / "audit" / "report.json").is_file()
