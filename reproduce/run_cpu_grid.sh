#!/usr/bin/env bash
# The --preset cpu runs of reproduce/RESULTS.md section 2, on CIFAR-10 from ../shared/data (or DATA=...).
# Each step skips what is finished and resumes what is not, so rerunning continues the grid.
#   bash reproduce/run_cpu_grid.sh        (PY=... for another interpreter)
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs/cpu}
# The attacker at the cpu preset: batch 64 for 8 epochs (about 1,250 steps on 10,000 images). With the
# preset's batch of 256 and 4 epochs, 160 steps left the decoder close to the mean image on small data.
ATTACK=(--batch-size 64 --epochs 8)

train() {  # RUN LAMBDA DEFENCE SEED
  [ -f "$1/final.pt" ] && return 0
  local resume=(); [ -f "$1/checkpoint.pt" ] && resume=(--resume)
  "$PY" -m reproduce.train --preset cpu --dataset cifar10 --data-root "$DATA" --defence "$3" --sigma 0.025 \
        --cem-lambda "$2" --seed "$4" --threads 2 --no-progress --out "$1" "${resume[@]}"
}
attack() {  # RUN
  "$PY" -m reproduce.attack --run "$1" --attack decoder --preset cpu --threads 2 --no-progress "${ATTACK[@]}"
}

for lam in 0 16; do train "$RUNS/noise_lam${lam}_seed125" "$lam" noise 125; done
for lam in 0 16; do attack "$RUNS/noise_lam${lam}_seed125"; done
"$PY" -m reproduce.table --table 1 --preset cpu --runs-root "$RUNS" --data-root "$DATA" --attacks decoder \
      --threads 2 --defences noise_arl --attack-args "${ATTACK[*]}" --out reproduce/results/table1_cpu.md
