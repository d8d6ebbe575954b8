#!/usr/bin/env bash
# CPU-scale reproduction of the ACT paper (issue 9); `make repro-cpu` / `make repro-alpha`.
#   scripts/repro.sh table2 [OUT]   Madry, TRADES, ACT on 10k CIFAR-10 images (Table 2)
#   scripts/repro.sh table2-seeds [OUT]  seeds 1 and 2 (or SEEDS="1") of Table 2 into OUT-s1,
#                                         OUT-s2 (PGD only), then one report over seed 0 and
#                                         these in OUT/report-seeds
#   scripts/repro.sh alpha  [OUT]   ACT's alpha sweep on Fashion-MNIST, 3 seeds (Table 1)
# The runs of one protocol train side by side, one thread each (on 2 cores this beats running
# them one after another with 2 threads), then each is evaluated and one report is written.
# Running it again resumes unfinished runs and skips finished evaluations.
# AutoAttack runs on 500 test images per model, not the 2,000 of PGD: in fp32 on this CPU its
# targeted and Square stages dominate the evaluation's cost (measured in docs/reproduction.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ACTRAIN=${ACTRAIN:-.venv/bin/actrain}
export OMP_NUM_THREADS=1
protocol=${1:?usage: scripts/repro.sh table2|alpha [OUT]}
SECONDS=0

train() {  # train CONFIG OUT [extra flags]: fresh, resumed, or skipped when finished
  local config=$1 out=$2; shift 2
  if [ -f "$out/final.json" ]; then return 0; fi
  if [ -f "$out/checkpoint.pt" ]; then
    "$ACTRAIN" train --resume "$out" --no-progress > "$out.log" 2>&1
  else
    "$ACTRAIN" train --config "$config" --out "$out" --no-progress "$@" > "$out.log" 2>&1
  fi
}

evaluate() {  # evaluate RUN MODEL NAME N [flags]: one eval JSON in RUN/eval/NAME
  local run=$1 model=$2 name=$3 n=$4; shift 4
  if [ -f "$run/eval/$name/eval.json" ]; then return 0; fi
  "$ACTRAIN" eval "$run" --model "$model" --test-subset "$n" --no-progress \
    --out "$run/eval/$name" "$@" > "$run/eval-$name.log" 2>&1
}

pids=(); jobs_named=()
spawn() {  # spawn NAME FUNCTION ARGS...: in the background, until wait_all
  local name=$1; shift
  "$@" &
  pids+=($!); jobs_named+=("$name")
}
wait_all() {  # wait for every spawned job; one that failed stops the script, named
  local i failed=()
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed+=("${jobs_named[$i]}")
  done
  pids=(); jobs_named=()
  if [ ${#failed[@]} -gt 0 ]; then
    echo "scripts/repro.sh: failed: ${failed[*]} (their .log files say why); run it again to go on" >&2
    exit 1
  fi
}
evaluate_g() {  # PGD-20 x 5 on 2,000 images, then AutoAttack on 500, of a run's G
  evaluate "$1" g pgd20 2000 --attack pgd --steps 20 --restarts 5 --step-size 0.003
  evaluate "$1" g autoattack 500 --attack autoattack
}

case $protocol in
  table2)
    out=${2:-runs/repro-table2}
    mkdir -p "$out"
    for m in madry trades act; do
      spawn "training $out/$m" train "configs/repro/cifar10_w16_$m.yaml" "$out/$m"
    done
    wait_all
    echo "training: ${SECONDS}s"
    for m in madry trades act; do
      spawn "evaluation of $out/$m" evaluate_g "$out/$m"
    done
    wait_all
    evaluate "$out/act" f pgd20-f 2000 --attack pgd --steps 20 --restarts 5 --step-size 0.003
    echo "training + evaluation: ${SECONDS}s"
    "$ACTRAIN" report "$out/madry" "$out/trades" "$out/act" --out "$out/report" --analyze \
      --max-samples 5000
    ;;
  table2-seeds)  # run after table2: its seed-0 runs are the first of the three seeds
    out=${2:-runs/repro-table2}
    for m in madry trades act; do
      [ -f "$out/$m/final.json" ] || { echo "scripts/repro.sh: run 'table2' first ($out/$m is not finished)" >&2; exit 2; }
    done
    seeds=${SEEDS:-1 2}
    for seed in $seeds; do
      mkdir -p "$out-s$seed"
      for m in madry trades act; do
        spawn "training $out-s$seed/$m" train "configs/repro/cifar10_w16_$m.yaml" "$out-s$seed/$m" --seed "$seed"
      done
    done
    wait_all
    echo "training: ${SECONDS}s"
    for seed in $seeds; do
      for m in madry trades act; do
        spawn "evaluation of $out-s$seed/$m" evaluate "$out-s$seed/$m" g pgd20 2000 \
          --attack pgd --steps 20 --restarts 5 --step-size 0.003
      done
      spawn "evaluation of $out-s$seed/act [F]" evaluate "$out-s$seed/act" f pgd20-f 2000 \
        --attack pgd --steps 20 --restarts 5 --step-size 0.003
    done
    wait_all
    echo "training + evaluation: ${SECONDS}s"
    runs=()
    for dir in "$out" $(for s in $seeds; do echo "$out-s$s"; done); do
      runs+=("$dir/madry" "$dir/trades" "$dir/act")
    done
    "$ACTRAIN" report "${runs[@]}" --out "$out/report-seeds" --analyze --max-samples 5000
    report=$out/report-seeds
    ;;
  alpha)  # three seeds: seed 0 in OUT, seeds 1 and 2 in OUT-s1, OUT-s2
    out=${2:-runs/repro-alpha}
    folders=()
    for seed in 0 1 2; do
      dir=$out; [ "$seed" = 0 ] || dir=$out-s$seed
      folders+=("$dir")
      "$ACTRAIN" sweep --param alpha 0.1 0.5 0.9 1.0 \
        --config configs/repro/alpha_fmnist_act.yaml --set seed=$seed --out "$dir" --jobs 2
      for a in 0.1 0.5 0.9 1.0; do
        for model in g f; do
          spawn "evaluation of $dir/alpha-$a [$model]" evaluate "$dir/alpha-$a" "$model" \
            "pgd20-$model" 2000 --attack pgd --steps 20 --restarts 5 --step-size 0.01
        done
        wait_all
      done
    done
    echo "training + evaluation: ${SECONDS}s"
    "$ACTRAIN" report "${folders[@]}" --out "$out/report" --analyze --max-samples 5000
    ;;
  *) echo "scripts/repro.sh: unknown protocol '$protocol' (table2, table2-seeds, alpha)" >&2; exit 2 ;;
esac
echo "done in ${SECONDS}s -> ${report:-$out/report}/report.md"
