#!/usr/bin/env bash
# The --preset cpu runs behind reproduce/RESULTS.md, on CIFAR-10 from ../shared/data (or DATA=...).
# Every step skips what is finished and resumes what is not, so rerunning continues the grid; the
# steps are ordered so that an interrupted grid leaves the most useful runs finished.
#   bash reproduce/run_cpu_grid.sh        (PY=... for another interpreter, RUNS=... for another root)
# Run layout (the one reproduce.table collects): RUNS/cifar10_vgg11_bn_<defence>_lam<L>_sigma<S>/seed<N>.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs/cpu}
# The attacker at the cpu preset: batch 64 for 8 epochs (about 1,250 steps on 10,000 images). With the
# preset's batch of 256 and 4 epochs, 160 steps left the decoder close to the mean image on small data.
ATTACK="--batch-size 64 --epochs 8"

table() {  # reproduce.table 1 over the given defences/seeds/attacks; trains and attacks what is missing
  "$PY" -m reproduce.table --table 1 --preset cpu --runs-root "$RUNS" --data-root "$DATA" --threads 2 \
        --attack-args "$ATTACK" "$@"
}
arm() {  # SIGMA LAMBDA SEED: one noise arm (not a Table 1 row), trained then attacked
  local run="$RUNS/cifar10_vgg11_bn_noise_lam$2_sigma$1/seed$3"
  if [ ! -f "$run/final.pt" ]; then
    local resume=(); [ -f "$run/config.json" ] && resume=(--resume)  # train starts over a run killed in epoch 1
    "$PY" -m reproduce.train --preset cpu --dataset cifar10 --data-root "$DATA" --defence noise --sigma "$1" \
          --cem-lambda "$2" --seed "$3" --threads 2 --no-progress --out "$run" "${resume[@]}" || return 1
  fi
  attack "$run" decoder "$3" $ATTACK
}
attack() {  # RUN NAME SEED [ARGS...]: run an attack unless its report holds every setting it runs
  local run=$1 name=$2 seed=$3; shift 3
  "$PY" - "$run/attack_$name.json" "$name" "$@" <<'PY' && return 0
import json, sys
try:
    settings = json.load(open(sys.argv[1]))["settings"]
except (OSError, KeyError, ValueError):
    sys.exit(1)
args = sys.argv[3:]
wanted = ("train_time", "infer_time") if sys.argv[2] == "decoder" else ("train_time",)  # reproduce.attack's default
if "--setting" in args:
    chosen = args[args.index("--setting") + 1]
    wanted = ("train_time", "infer_time") if chosen == "both" else (chosen,)
sys.exit(0 if all("metrics" in settings.get(s, {}) for s in wanted) else 1)
PY
  "$PY" -m reproduce.attack --run "$run" --attack "$name" --preset cpu --seed "$seed" --threads 2 --no-progress "$@"
}

# 1. Table 1's Noise_ARL rows (issue 4; issue 5: decoder attack). Plain noise is no Table 1 row: see step 3.
table --defences noise_arl --attacks decoder --out reproduce/results/table1_cpu.md || exit 1
# 2. Figure 4's question: more noise alone against CEM at a lower weight.
arm 0.05 0 125 && arm 0.1 0 125 && arm 0.025 4 125 || exit 1
# 3. noise with and without CEM over three seeds (issue 5: mean and spread). Plain noise is no row of
#    the paper's Table 1, so these arms are trained here; reproduce.summary reads them.
for seed in 126 127; do arm 0.025 0 "$seed" && arm 0.025 16 "$seed" || exit 1; done
# 4. The GAN attack (the cpu preset's budget) on the noise and noise_arl arms, starting from their decoders.
for defence in noise noise_arl; do
  for lam in 0 16; do attack "$RUNS/cifar10_vgg11_bn_${defence}_lam${lam}_sigma0.025/seed125" gan 125 || exit 1; done
done
table --no-run --attacks decoder gan --out reproduce/results/table1_cpu.md
# 5. Seeds for Figure 4's strongest noise-only arm (sigma 0.1), the comparison CEM has to win.
for seed in 126 127; do arm 0.1 0 "$seed" || exit 1; done
# 6. Seeds for noise_arl with and without CEM (about 30 minutes an arm at this preset).
for seed in 126 127; do
  table --defences noise_arl --attacks decoder --seeds "$seed" --out "runs/cpu/table1_noise_arl_seed$seed.md" || exit 1
done
# 7-8. The GAN attack in both settings on all three seeds: Table 1's GAN columns, train- and inference-time
#      (seed 125's train-time attacks are step 4's, so they are skipped here).
for seed in 125 126 127; do
  for defence in noise noise_arl; do
    for lam in 0 16; do
      run="$RUNS/cifar10_vgg11_bn_${defence}_lam${lam}_sigma0.025/seed$seed"
      attack "$run" gan "$seed" && attack "$run" gan "$seed" --setting infer_time || exit 1
    done
  done
done
table --no-run --attacks decoder gan --out reproduce/results/table1_cpu.md
# 9. Seeds for Figure 4's two single-seed arms: CEM at lambda 4, then noise alone at sigma 0.05.
for seed in 126 127; do arm 0.025 4 "$seed" || exit 1; done
for seed in 126 127; do arm 0.05 0 "$seed" || exit 1; done
