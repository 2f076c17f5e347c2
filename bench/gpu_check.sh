#!/usr/bin/env bash
# GPU check of the kernels, for a machine with a CUDA GPU (written for an H200): builds the CUDA
# extension, runs the GPU tests, and times the backends. Everything goes to stdout; step limits add up to 475 s (< 8 minutes).
#   bash bench/gpu_check.sh            (PYTHON=... to pick the interpreter, default .venv/bin/python)
# Exit status: non-zero when any step failed (the later steps still run).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() { echo; echo "=== $* ($(date +%T)) ==="; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || status=1
"$PY" -c "import torch, triton; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())" || status=1

step "build the CUDA extension (csrc/cem_cuda.cu) and check it against the torch backend"
timeout 150 "$PY" -m cem_fast.build --check --cuda || { echo "BUILD/CHECK FAILED"; status=1; }

step "GPU tests (tests/gpu)"
timeout 140 "$PY" -m pytest -q -rs tests/gpu -p no:cacheprovider || { echo "GPU TESTS FAILED"; status=1; }

step "kernel timings (triton.testing.do_bench medians, fp32 unless noted)"
timeout 55 "$PY" - <<'EOF' || { echo "TIMINGS FAILED"; status=1; }
import torch, triton
from triton.testing import do_bench
from cem_fast.backends import torch_backend as tb_torch, triton_backend as tb_triton
try:
    from cem_fast.backends.extension import load_cuda_extension
    cuda_ext = load_cuda_extension()
except Exception as exc:  # the build step above already reported it
    print(f"(CUDA extension unavailable: {type(exc).__name__}: {exc})")
    cuda_ext = None

dev = "cuda"
gen = torch.Generator(device=dev).manual_seed(0)
peak = None
try:  # HBM peak from the device properties (bus width x memory clock x 2 for DDR)
    p = torch.cuda.get_device_properties(0)
    peak = 2 * p.memory_clock_rate * 1e3 * p.memory_bus_width / 8 / 1e9
except Exception:
    pass
print(f"HBM peak ~ {peak:.0f} GB/s" if peak else "HBM peak unknown")

def bench(fn):
    return do_bench(fn, warmup=10, rep=30, return_mode="median")

def row(kind, B, D, C, m, cc, dtype):
    K = C * m
    acc = tb_torch.accumulation_dtype(dtype)
    z = torch.randn(B, D, device=dev, generator=gen).to(dtype)
    labels = torch.randint(0, C, (B,), device=dev, generator=gen)
    cent = torch.randn(K, D, device=dev, generator=gen, dtype=acc)
    es, ea = z.element_size(), cent.element_size()
    if kind == "fwd":
        fns = {"torch": lambda: tb_torch.assign_stats(z, labels, cent, m, cc),
               "triton": lambda: tb_triton.assign_stats(z, labels, cent, m, cc),
               "tri-atom": lambda: tb_triton.assign_stats(z, labels, cent, m, cc, use_atomics=True)}
        if cuda_ext is not None:
            fns["cuda"] = lambda: cuda_ext.assign_stats(z, labels, cent, m, cc)
        # minimal traffic: read z, labels, centroids once; write assign, counts, sqdev
        nbytes = B * D * es + 8 * B + K * D * ea + 8 * B + K * ea + K * D * ea
    else:
        a = tb_torch.assign_stats(z, labels, cent, m, cc)[0]
        coef = torch.randn(K, D, device=dev, generator=gen, dtype=acc)
        fns = {"torch": lambda: tb_torch.scatter_grad(z, a, cent, coef),
               "triton": lambda: tb_triton.scatter_grad(z, a, cent, coef)}
        if cuda_ext is not None:
            fns["cuda"] = lambda: cuda_ext.scatter_grad(z, a, cent, coef)
        nbytes = B * D * es + 8 * B + 2 * K * D * ea + B * D * es
    times = {}
    for name, fn in fns.items():
        try:
            times[name] = bench(fn)
        except Exception as exc:
            print(f"  {name} failed: {type(exc).__name__}: {exc}")
    t0 = times.get("torch")
    cells = []
    for name in ("torch", "triton", "tri-atom", "cuda"):
        t = times.get(name)
        if t is None:
            cells.append(f"{'-':>24}")
            continue
        speed = f"x{t0 / t:5.1f}" if t0 else "   ? "
        cells.append(f"{t * 1e3:8.1f}us {speed} {nbytes / t / 1e6:5.0f}GB/s")
    tag = {torch.float32: "", torch.bfloat16: " bf16", torch.float64: " f64", torch.float16: " f16"}[dtype]
    cond = "cc" if cc else "all"
    print(f"{kind:3} B={B:<5} D={D:<5} C={C:<3} m={m:<2} {cond:3}{tag:5} | " + " | ".join(cells), flush=True)

header = (f"{'':48} | {'torch':>24} | {'triton (deterministic)':>24} | {'triton use_atomics':>24} | "
          f"{'cuda':>24}")
print("cells: median time, speed-up over torch, GB/s of the minimal bytes moved")
print(header)
for kind in ("fwd", "bwd"):
    for B in (128, 1024, 8192):
        for D in (512, 2048):
            for C in (10, 100):
                for m in (3, 10):
                    row(kind, B, D, C, m, True, torch.float32)
print("class_conditional=False (all K clusters are candidates), and bf16 inputs:")
print(header)
for B in (1024, 8192):
    for D in (512, 2048):
        for C, m in ((10, 10), (100, 3)):
            row("fwd", B, D, C, m, False, torch.float32)
for C, m in ((10, 3), (100, 10)):
    row("fwd", 8192, 2048, C, m, True, torch.bfloat16)
    row("bwd", 8192, 2048, C, m, True, torch.bfloat16)
EOF

step "CEMLoss per backend: parity with the float64 reference, no host sync, CUDA graph, timings, refit"
timeout 85 "$PY" bench/gpu_loss_check.py --device cuda || { echo "LOSS CHECK FAILED"; status=1; }

step "training-step overhead of CEM on the GPU (issue 6: target <= 5 %; no authors' checkout on this machine)"
timeout 45 "$PY" bench/train_step.py --device cuda --warmup 3 --steps 30 --rounds 1 || { echo "TRAIN STEP FAILED"; status=1; }

step "done: status $status"
exit $status
