"""The plumbing of ``bench/gpu_check.sh``, in the standard library only (it must run whatever torch does).

    python3 bench/gpu_check_runner.py step --name NAME --log FILE --timeout S [--restart] [--skipped-if-ok WHY]
                                           -- CMD...
    python3 bench/gpu_check_runner.py summary --out DIR [--max-lines 40]

``step`` runs CMD with its output appended to FILE, under the smaller of ``--timeout`` (times
``$GPU_CHECK_TIMEOUT_SCALE``, default 1) and what is left before ``$GPU_CHECK_DEADLINE`` (seconds since the
epoch; a step with under 5 s left is SKIPPED), kills its
process group at the limit, and appends ``STEP <name> PASS|FAIL|TIMEOUT|SKIPPED <seconds> s <note>``.
With ``--restart``, a run that exits 3 after printing ``REMAINING a,b`` (``bench/gpu_checks.py``, after a
check that may have poisoned its process) is rerun with ``--checks a,b`` in a fresh process.
``--skipped-if-ok WHY`` reports a successful run as SKIPPED (a CUDA-only step exercised on the CPU).
Its exit status is 0 whatever the step did: a failing step never stops the next.

``summary`` reads every ``*.log`` in DIR and prints (and writes to ``DIR/summary.txt``) at most
``--max-lines`` lines: the machine, each step's status, every check (passes grouped per backend, each
failure on its own line) and the headline numbers (the ``TIME``/``RATIO`` lines that carry a goal). It
exits 1 when a step failed or timed out or a check failed (a missed speed goal is not a failure), else 0.
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
import subprocess
import sys
import time


def _append(log: str, text: str) -> None:
    with open(log, "a") as f:
        f.write(text)


def run_step(args) -> int:
    cmd = list(args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd)
    deadline = float(os.environ.get("GPU_CHECK_DEADLINE", "inf"))
    limit = args.timeout * float(os.environ.get("GPU_CHECK_TIMEOUT_SCALE", "1"))
    start = time.time()
    _append(args.log, f"\n=== {args.name} ({time.strftime('%H:%M:%S')}): {' '.join(cmd)}\n")
    status, note, rc = "PASS", "", 0
    while True:
        left = min(limit - (time.time() - start), deadline - time.time())
        if left < 5:
            status, note = ("SKIPPED", "(time budget spent)") if time.time() - start < 1 else ("TIMEOUT", "(budget)")
            break
        offset = os.path.getsize(args.log)
        with open(args.log, "a") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                status, note, rc = "TIMEOUT", f"(killed after {left:.0f} s)", -9
                break
        with open(args.log) as f:
            f.seek(offset)
            tail = f.read()
        rest = [ln.split(None, 1)[1].strip() for ln in tail.splitlines() if ln.startswith("REMAINING ")]
        if args.restart and rc == 3 and rest:
            cmd = cmd + ["--checks", rest[-1]]
            note = "(restarted after a fatal check)"
            continue
        if rc != 0:
            status, note = "FAIL", f"{note} rc={rc}".strip()
        break
    if status == "PASS" and args.skipped_if_ok:
        status, note = "SKIPPED", f"({args.skipped_if_ok})"
    line = f"STEP {args.name} {status} {time.time() - start:.0f} s {note}".rstrip()
    _append(args.log, line + "\n")
    print(line, flush=True)
    return 0


def _lines(out: str, prefix: str) -> list:
    found = []
    for log in sorted(glob.glob(os.path.join(out, "*.log"))):
        with open(log, errors="replace") as f:
            found += [ln.rstrip("\n") for ln in f if ln.startswith(prefix)]
    return found


def summary(out: str, max_lines: int) -> list:
    lines = [f"GPU check summary ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"]
    lines += [ln.replace("# ", "", 1) for ln in _lines(out, "# device")][:2]
    lines += [ln[5:] for ln in _lines(out, "STEP ")]
    passed, failures = {}, []
    for ln in _lines(out, "CHECK "):
        parts = ln.split(None, 4)
        if len(parts) < 4:
            continue
        _, backend, name, status = parts[:4]
        detail = parts[4] if len(parts) > 4 else ""
        if status == "PASS":
            passed.setdefault(backend, []).append(name)
        elif status == "SKIPPED":
            passed.setdefault(backend, []).append(f"{name}(skipped)")
        else:
            failures.append(f"FAIL {backend} {name}: {detail[:150]}")
    lines += [f"PASS {backend}: {', '.join(names)}" for backend, names in passed.items()]
    lines += failures
    numbers = [ln.split(None, 1)[1] for ln in _lines(out, "TIME ") + _lines(out, "RATIO ") if " goal" in ln]
    lines += [f"  {n}" for n in numbers]
    if len(lines) > max_lines:
        cut = len(lines) - max_lines + 1
        lines = lines[: max_lines - 1] + [f"... {cut} more lines: see the logs"]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("step")
    s.add_argument("--name", required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--timeout", type=float, required=True)
    s.add_argument("--restart", action="store_true")
    s.add_argument("--skipped-if-ok", default=None)
    s.add_argument("cmd", nargs=argparse.REMAINDER)
    m = sub.add_parser("summary")
    m.add_argument("--out", required=True)
    m.add_argument("--max-lines", type=int, default=40)
    args = p.parse_args(argv)
    if args.what == "step":
        return run_step(args)
    text = "\n".join(summary(args.out, args.max_lines))
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    bad = [ln for ln in _lines(args.out, "STEP ") if ln.split()[2] in ("FAIL", "TIMEOUT")]
    bad += [ln for ln in _lines(args.out, "CHECK ") if ln.split()[3:4] == ["FAIL"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
