#!/usr/bin/env bash
# How the numbers in docs/benchmark-log.md were taken on a lent GPU machine (see ../shared/DEVICE.md for
# getting the SmolLM2 GGUF there as /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf and WikiText into .data/).
#   bash benchmarks/run_gpu.sh bench     # evaluation, training and pruning speed
#   bash benchmarks/run_gpu.sh quality   # SmolLM2 pruning table
#   bash benchmarks/run_gpu.sh recover   # SmolLM2 main job at density 1.0, 0.5, 0.1 (DENSITIES="0.1" for one)
#   bash benchmarks/run_gpu.sh multi     # the same main job on 1 GPU and on 2 (--parallel fsdp, ddp)
#   bash benchmarks/run_gpu.sh recipes "today@0.1 kd@0.1"   # recovery recipes at the user's budget, in parallel
#   bash benchmarks/run_gpu.sh sparse    # 2:4 kernels against dense bf16 (opt-1.3b, opt-6.7b shapes)
#   bash benchmarks/run_gpu.sh decode    # issue 24's sparse decode kernels: gathers, tuning, tables, torchao 2:4
#   bash benchmarks/run_gpu.sh updates   # issue 26: one gradual update's cost per criterion, sequential and at once
#   bash benchmarks/run_gpu.sh generate  # issue 24: --generate on a SmolLM2 export, both kernels, both KV caches
#   bash benchmarks/run_gpu.sh running   # the detached runs still going (what `watch` waits for)
set -u
GGUF=${GGUF:-/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf}
DATA=${DATA:-.data}
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
main_job() {  # $1 density, $2 output dir, rest: extra flags
  local density=$1 out=$2; shift 2
  python3 extreme_compression_experiment.py --model "$GGUF" --sparsity "$density" --batch-size 8 --epochs 2 \
    --train-source "$DATA/wiki.valid.raw" --eval-source "$DATA" --calibration-source "$DATA/wiki.valid.raw" \
    --eval-batch-size 8 --output-dir "$out" "$@"
}
# The runs still going, by their own command lines only (anchored): a call whose command line names the script or
# the experiment (a `watch` chained with a pgrep of its own) would otherwise match itself and wait out its limit
RUNNING="^(timeout [0-9]+ )?python3 extreme_compression_experiment|^bash [^ ]*run_gpu.sh (recipes|sweep)"
MIX="$DATA/wiki.valid.raw,$DATA/fallback-train"  # WikiText-2 valid + the public-domain fallback text (~2.3M tokens)
declare -A RECIPE=(  # --loss etc. of each recipe; the user's budget (5 epochs × 10,000 samples × 512 = 25.6M tokens) unless
                    # one names --epochs or is `measured` at 0.5 (its row trains 2 epochs)
  [today]="--loss ce --train-source $DATA/wiki.valid.raw --holdout 0"  # the recipe before this change
  [ce]="--loss ce --train-source $MIX"
  [kd]="--loss kd --train-source $MIX"
  [cekd]="--loss ce+kd --train-source $MIX"
  [kd-lr1e-4]="--loss kd --train-source $MIX --lr 1e-4"
  [cekd-lr1e-4]="--loss ce+kd --train-source $MIX --lr 1e-4"
  [kd-valid-lr1e-4]="--loss kd --train-source $DATA/wiki.valid.raw --lr 1e-4"  # in-domain text, as RECOVERY-NOTES
  [ikd-lr1e-4]="--loss kd --train-source $MIX --lr 1e-4 --schedule iterative"
  [owlkd-lr1e-4]="--loss kd --train-source $MIX --lr 1e-4 --layer-density owl"
  [kd-valid-lr3e-4]="--loss kd --train-source $DATA/wiki.valid.raw --lr 3e-4"
  [sqh-valid-lr1e-4]="--loss kd --kd-hidden-weight 1 --train-source $DATA/wiki.valid.raw --lr 1e-4"  # + SquareHead
  [ikd-valid-lr1e-4]="--loss kd --train-source $DATA/wiki.valid.raw --lr 1e-4 --schedule iterative"
  [owlkd-valid-lr1e-4]="--loss kd --train-source $DATA/wiki.valid.raw --lr 1e-4 --layer-density owl"
  [cekd-valid-lr1e-4]="--loss ce+kd --train-source $DATA/wiki.valid.raw --lr 1e-4"
  [owlkd-valid-lr3e-4]="--loss kd --train-source $DATA/wiki.valid.raw --lr 3e-4 --layer-density owl"
  [owlkd-valid-lr3e-4-1ep]="--loss kd --train-source $DATA/wiki.valid.raw --lr 3e-4 --layer-density owl --epochs 1"
  [owlkd-valid-lr6e-4-1ep]="--loss kd --train-source $DATA/wiki.valid.raw --lr 6e-4 --layer-density owl --epochs 1"
  [owlcekd-valid-lr3e-4-1ep]="--loss ce+kd --train-source $DATA/wiki.valid.raw --lr 3e-4 --layer-density owl --epochs 1"
  [owlcekd-valid-lr5e-5-1ep]="--loss ce+kd --train-source $DATA/wiki.valid.raw --lr 5e-5 --layer-density owl --epochs 1"
  [ikd-valid-lr3e-4-1ep]="--loss kd --train-source $DATA/wiki.valid.raw --lr 3e-4 --schedule iterative --epochs 1"
  [iowlkd-valid-lr3e-4-1ep]="--loss kd --train-source $DATA/wiki.valid.raw --lr 3e-4 --schedule iterative --layer-density owl --epochs 1"
  [gkd-valid-lr3e-4-1ep]="--loss kd --train-source $DATA/wiki.valid.raw --lr 3e-4 --schedule gradual --epochs 1"
  [genkd-lr3e-4-1ep]="--loss kd --train-source generated:2M --lr 3e-4 --layer-density owl --epochs 1"  # data-free
  [owlkd-valid-lr1e-3-1ep]="--loss kd --train-source $DATA/wiki.valid.raw --lr 1e-3 --layer-density owl --epochs 1"
  [today-1ep]="--loss ce --train-source $DATA/wiki.valid.raw --holdout 0 --epochs 1"
  [iowlkd-valid-lr6e-4-1ep]="--loss kd --train-source $DATA/wiki.valid.raw --lr 6e-4 --schedule iterative --layer-density owl --epochs 1"
  [gkd-valid-lr6e-4-1ep]="--loss kd --train-source $DATA/wiki.valid.raw --lr 6e-4 --schedule gradual --epochs 1"
  [genkd-lr6e-4-1ep]="--loss kd --train-source generated:1M --gen-batch-size 512 --lr 6e-4 --layer-density owl --epochs 1"
  [owlkd-mix-lr6e-4-1ep]="--loss kd --train-source $MIX --lr 6e-4 --layer-density owl --epochs 1"
  [gkd-mix-lr6e-4]="--loss kd --train-source $MIX --lr 6e-4 --schedule gradual"  # the full budget on the mix
  [owlkd-mix-lr6e-4]="--loss kd --train-source $MIX --lr 6e-4 --layer-density owl"
  [iowlkd-mix-lr6e-4]="--loss kd --train-source $MIX --lr 6e-4 --schedule iterative --layer-density owl"
  [ikd-mix-lr6e-4]="--loss kd --train-source $MIX --lr 6e-4 --schedule iterative"
  [kd-mix-lr6e-4]="--loss kd --train-source $MIX --lr 6e-4"  # at 1.0: the dense model under KD
  [ce-mix-lr6e-4]="--loss ce --train-source $MIX --lr 6e-4"  # at 1.0: the dense model under CE
  [cekd-mix-lr5e-5]="--loss ce+kd --train-source $MIX --lr 5e-5"  # near dense (0.5)
  [ce-mix-lr5e-5]="--loss ce --train-source $MIX --lr 5e-5"  # near dense (0.5): CE above the derived lr, on the mix
  [gkd-mix]="--loss kd --train-source $MIX --schedule gradual"  # gradual at the brief's derived lr: the default's question
  [kd-mix-lr5e-5]="--loss kd --train-source $MIX --lr 5e-5"  # 0.5: pure KD at CE+KD's lr
  [icekd-mix-lr5e-5]="--loss ce+kd --train-source $MIX --lr 5e-5 --schedule iterative --density-steps 0.8,0.65,0.5"  # 0.5
  [iowlcekd-mix-lr5e-5]="--loss ce+kd --train-source $MIX --lr 5e-5 --schedule iterative --layer-density owl --density-steps 0.8,0.65,0.5"
  [gcekd-mix-lr5e-5]="--loss ce+kd --train-source $MIX --lr 5e-5 --schedule gradual --density-steps 0.8,0.5"  # 0.5
  [gkd-valid-1ep]="--loss kd --train-source $DATA/wiki.valid.raw --schedule gradual --epochs 1"  # the derived lr
  [owlkd-valid-1ep]="--loss kd --train-source $DATA/wiki.valid.raw --layer-density owl --epochs 1"
  [ce-valid-lr3e-5-1ep]="--loss ce --train-source $DATA/wiki.valid.raw --lr 3e-5 --epochs 1"
  # issue 26: what `--recipe measured` trains with, and its gradual updates by each criterion (BATCH=4, SEED=0/1)
  [measured]="--recipe measured --train-source $MIX"
  [measured-mag]="--recipe measured --train-source $MIX --reprune-method magnitude"
  [measured-sgpt]="--recipe measured --train-source $MIX --reprune-method sparsegpt"
  [measured-wanda]="--recipe measured --train-source $MIX --reprune-method wanda"
  [measured-mag-1ep]="--recipe measured --train-source $MIX --reprune-method magnitude --epochs 1"  # screens
  [measured-sgpt-1ep]="--recipe measured --train-source $MIX --reprune-method sparsegpt --epochs 1"
  [measured-wanda-1ep]="--recipe measured --train-source $MIX --reprune-method wanda --epochs 1"
  [measured-kernels]="--recipe measured --train-source $MIX --kernels sparse"  # + the export through both kernels
  [measured-wanda-owl]="--recipe measured --train-source $MIX --reprune-method wanda --layer-density owl"  # 0.1
  [measured-2ep]="--recipe measured --train-source $MIX --epochs 2 --kernels sparse"  # a shorter budget near dense
  # issue 26's sweeps around the measured recipe (BATCH=4: its lr was 4.24e-4 at 0.1 and 0.3, as at 0.05 still)
  [measured-ramp40]="--recipe measured --train-source $MIX --ramp-end 0.4"
  [measured-ramp80]="--recipe measured --train-source $MIX --ramp-end 0.8"
  [measured-t2]="--recipe measured --train-source $MIX --kd-temperature 2"
  [measured-t4]="--recipe measured --train-source $MIX --kd-temperature 4"
  [measured-lr-half]="--recipe measured --train-source $MIX --lr 2.12e-4"  # half that
  [measured-lr-double]="--recipe measured --train-source $MIX --lr 8.49e-4"  # the 0.3 row's lr (599c3d9)
  [measured-lr4x]="--recipe measured --train-source $MIX --lr 1.7e-3"  # the 0.1 row's lr (599c3d9); 4× the 0.05 row's
  [measured-lr7e-5]="--recipe measured --train-source $MIX --lr 7.07e-5"  # 0.5: twice its old lr (now the row's)
  [measured-lr2x]="--recipe measured --train-source $MIX --lr 3.39e-3"  # 0.1: twice its row's lr (1.7e-3 at batch 4)
  [measured-lr1.4e-4]="--recipe measured --train-source $MIX --lr 1.41e-4"  # 0.5: twice its row's (7.07e-5 at batch 4)
  [measured-warmup500]="--recipe measured --train-source $MIX --warmup-steps 500"
  [measured-stages3]="--recipe measured --train-source $MIX --prune-stages 3"  # 0.3: its last stage at 67% of the steps
  [measured-stages2]="--recipe measured --train-source $MIX --prune-stages 2"  # 0.3: 0.5, then 0.3 from half the steps
  [measured-stages6]="--recipe measured --train-source $MIX --prune-stages 6"  # 0.3: more, smaller (0.3 at 83%)
  [measured-gradual]="--recipe measured --train-source $MIX --schedule gradual --reprune-method wanda \
    --layer-density uniform"  # 0.3: the 0.1 row's schedule (wanda updates along the cubic; the row's OWL off)
  [measured-valid]="--recipe measured --train-source $DATA/wiki.valid.raw"  # the in-domain share: all of it
  [measured-union]="--recipe measured --train-source $DATA/wiki.valid.raw,$DATA/fallback-train/state_union-nltk"  # more
  [measured-patience]="--recipe measured --train-source $MIX --epochs 5 --patience 1 --cooldown-steps 500"  # 0.5
)
# EXTRA: flags appended to every run of `recipes` (e.g. EXTRA="--epochs 1" for a 5.1M-token screen) and `generate`.
# RUN_LIMIT: seconds each run may take (timeout), so that a call's summary and results still come back.
# The table's missing rows (docs/benchmark-log.md, "The table's missing rows"), taken in three calls of one
# warm machine: a run stopped by RUN_LIMIT saves its state (SIGTERM) and the next call's --resume
# continues it exactly; a run with no state starts fresh (SKIP_PRUNE=1: each run prunes what it needs).
#   SKIP_PRUNE=1 RUN_LIMIT=505 EXTRA="--skip-dense-eval --resume" bash benchmarks/run_gpu.sh recipes \
#       "gkd-mix-lr6e-4@0.1 iowlkd-mix-lr6e-4@0.1 today@0.5 ce@0.5"
#   SKIP_PRUNE=1 RUN_LIMIT=530 EXTRA="--skip-dense-eval --resume" bash benchmarks/run_gpu.sh recipes \
#       "gkd-mix-lr6e-4@0.1 iowlkd-mix-lr6e-4@0.1 ce@0.5 ce@1.0"
#   SKIP_PRUNE=1 RUN_LIMIT=420 EXTRA="--skip-dense-eval --resume" bash benchmarks/run_gpu.sh recipes \
#       "kd-mix-lr6e-4@1.0 ce-mix-lr5e-5@0.5 cekd-mix-lr5e-5@0.5"
# "The table completed" (docs/benchmark-log.md), three calls of one warm machine, the same way:
#   SKIP_PRUNE=1 RUN_LIMIT=515 EXTRA="--skip-dense-eval --resume" bash benchmarks/run_gpu.sh recipes \
#       "gkd-mix@0.1 ikd-mix-lr6e-4@0.1 iowlkd-mix-lr6e-4@0.1 today@0.3 gkd-mix-lr6e-4@0.3 kd-mix-lr5e-5@0.5"
#   SKIP_PRUNE=1 RUN_LIMIT=520 EXTRA="--skip-dense-eval --resume" bash benchmarks/run_gpu.sh recipes \
#       "ikd-mix-lr6e-4@0.1 iowlkd-mix-lr6e-4@0.1 gkd-mix-lr6e-4@0.3"
#   SKIP_PRUNE=1 RUN_LIMIT=555 EXTRA="--skip-dense-eval --resume" bash benchmarks/run_gpu.sh recipes \
#       "kd-mix-lr5e-5@0.5 today@0.3 icekd-mix-lr5e-5@0.5"
# "The last rows" (docs/benchmark-log.md), four calls of one warm machine (the first three the same four runs):
#   SKIP_PRUNE=1 RUN_LIMIT=530 EXTRA="--skip-dense-eval --resume" bash benchmarks/run_gpu.sh recipes \
#       "ikd-mix-lr6e-4@0.3 iowlkd-mix-lr6e-4@0.3 gcekd-mix-lr5e-5@0.5 iowlcekd-mix-lr5e-5@0.5"
#   (the same with RUN_LIMIT=555, then RUN_LIMIT=570)
#   SKIP_PRUNE=1 RUN_LIMIT=430 EXTRA="--skip-dense-eval --resume" bash benchmarks/run_gpu.sh recipes "cekd@0.5 today@0.5"
# Issue 26's first screens (docs/benchmark-log.md, "Calibrated gradual updates, first screens"), batch 4, two calls:
#   BATCH=4 SKIP_PRUNE=1 RUN_LIMIT=480 bash benchmarks/run_gpu.sh recipes "measured-mag-1ep@0.1 measured-sgpt-1ep@0.1 \
#       measured-wanda-1ep@0.1 measured-sgpt-1ep@0.05 measured-mag-1ep@0.05 measured-2ep@0.5"
#   BATCH=4 SKIP_PRUNE=1 RUN_LIMIT=345 bash benchmarks/run_gpu.sh recipes \
#       "measured-mag-1ep@0.1 measured-wanda-1ep@0.1 measured-wanda-1ep@0.05"
# Issue 26's full budget at batch 4 (docs/benchmark-log.md, "Wanda updates against magnitude over the full budget"),
# one call of 562 s (magnitude finished in 543 s; wanda, at 3.2 s an update, was at step 3,930 when the machine went):
#   BATCH=4 SKIP_PRUNE=1 SEED=0, "measured-mag@0.1" and "measured-wanda@0.1" started with setsid (as `detach` does)
# Wanda at 0.1, SEED=0 and SEED=1 (docs/benchmark-log.md, "Wanda updates over the full budget, two seeds"): one
# H100 lease, both detached at once in call 3 after `decode` (timeout 360) in call 2, then `watch 555` and `watch 560`
# sent in the same message; 788 s wall each. Then, 25 s of it, `bench_prune.py --updates` and `bench_decode.py two-four`.
# Next: measured@0.05 (the 0.1 row's recipe: wanda updates now), measured-wanda-owl@0.1, measured-ramp40/80@0.1, two
# seeds each; measured@0.3 again (its iterative stages re-prune layer by layer on the GPU only from 5fc5264); and
# `decode` with the whole call (its model table at opt-6.7b 0.1 and the SmolLM2 perplexity were cut at 360 s).
# The session after (1f438df..) got no machine: six starts failed (H100 and H200), 1,411 s of its 1,800 spent on them.
# Its plan, for a lease of ~1,500 s: in the call after staging, SEED=0 OUT=/tmp/res/a detach "measured@0.05" and
# SEED=1 OUT=/tmp/res/b detach "measured-kernels@0.05 measured-2ep@0.5" (two seeds of 0.05; the shorter budget at
# 0.5 against seed 1's 22.62 after epoch 2 of 5; the recovered 0.05 export through both kernels), then watch.
# The session after that (59bd6f8) ran it on an H200 (log: "Density 0.05, a second seed at 0.3, two epochs at 0.5"):
# after staging, SEED=0 OUT=/tmp/res/a detach "measured@0.05 measured@0.3 measured-2ep@0.5" and SEED=1
# OUT=/tmp/res/b detach "measured-kernels@0.05 measured-2ep@0.5", five runs at once (1,257 s wall at most), then
# watch 555, 585, 585 in the same message; then `python3 benchmarks/bench_decode.py fit` alone (41 s).
# The session after that (fc38d6b) ran on an H100 (log: "PDL and q, k, v in one call", "Sweeps at 0.1: twice the
# lr"): call 1 (carry .stage1 .whl) staged and ran `python3 benchmarks/bench_decode.py pdl` alone (119 s); call 2
# (carry .stage2 .data): OUT=/tmp/res DETACHED=sweep detach "measured@0.1 measured-ramp40@0.1 measured-ramp80@0.1
# measured-wanda-owl@0.1 measured-t2@0.1 measured-lr-double@0.1" "measured-patience@0.5", then watch 550, 580, 580.
# Seven runs at once are one too many on an H100 (the OWL screen ran out of memory at its evaluation); the two
# full-budget runs the sweep chose (measured-lr-double, seeds 0 and 1) were in epoch 5 when the 1,800 s ran out.
# The session after that (7c7fa55) ran its plan on an H100 (log: "The decode step compiled", "The fifth epoch at
# 0.1; twice the lr at 0.5"): call 1 (carry .stage1 .whl) staged and ran `timeout 300 python3 benchmarks/bench_decode.py
# pdl --model-only --compile-model --shapes opt-6.7b` alone (96 s; its compiled rows failed on a bug, fixed and run
# again in the lease's last call, 202 s); call 2 (carry .stage2 .data): SEED=0 OUT=/tmp/res/a detach "measured@0.1",
# SEED=1 OUT=/tmp/res/b detach "measured@0.1", OUT=/tmp/res DETACHED=sweep detach "measured@0.3
# measured-lr-double@0.3 measured-lr4x@0.1" "" "measured-lr7e-5@0.5" (the screens, then the 0.5 runs at both
# seeds), watch 550; calls 3, 4: watch 580. Five runs at once at most; all ended inside the lease (1,305 s wall).
# The session after that (599c3d9) ran it on an H100 (log: "--generate with a static cache", "Four times the lr at
# 0.1, twice at 0.3"): call 1 (carry .stage1 .whl) staged; call 2 (carry .stage2 .data): OUT=$OUT/gen timeout 330
# bash benchmarks/run_gpu.sh generate (222 s, the GPU to itself), then SEED=0 OUT=/tmp/res/a and SEED=1
# OUT=/tmp/res/b detach "measured-lr4x@0.1 measured-lr-double@0.3", watch $((575 - SECONDS)); calls 3, 4: watch 580.
# Four runs at once, 1,342-1,367 s wall; the lease ended with 146 s left.
# The session after that (aaa9671) ran it on an H100 (log: "Screens at 0.1: temperature 4, warm-up, WikiText
# alone, twice the lr; fewer stages at 0.3; twice the lr at 0.5"): call 1 (carry .stage1 .whl, kind nvidia-h200; an
# H100 came, its start 118 s of the lease) staged; call 2 (carry .stage2 .data): OUT=/tmp/res DETACHED=sweep detach
# "measured@0.1 measured-t4@0.1 measured-warmup500@0.1 measured-valid@0.1 measured-lr2x@0.1" "measured-stages2@0.3
# measured-stages3@0.3" "measured-lr1.4e-4@0.5", watch; calls 3, 4: watch. Seven runs at once (44,785 MiB of the
# GPU's memory in use as call 3 began), the screens 763-797 s, the 0.3 runs 1,376-1,389 s, the 0.5 runs (after the
# screens) 551-587 s; all ended inside the lease, whose last 300 s went to a `watch` that matched its own call's
# command line (fixed: RUNNING).
# Next: the three screens that beat the row's at 0.1 over the full budget, two seeds each (measured-valid, -lr2x,
# -warmup500: six runs at once, not timed; four took 1,342-1,367 s, six may not fit one lease; wiki.valid alone is
# about 100 passes over its text there). One lease: SEED=0 and SEED=1 detach "measured-valid@0.1 measured-lr2x@0.1"
# (four runs). Another: at 0.3, more, smaller stages and gradual with wanda updates, as 1-epoch screens beside the
# row's: OUT=/tmp/res DETACHED=sweep detach "measured@0.3 measured-stages6@0.3 measured-gradual@0.3"; the better
# of those two then runs at seeds 0 and 1 (the row's own screen is the baseline, never chosen).
# Issue 24's block heights (4c1121e) ran on an H100 with no staging (random OPT weights need no model or wheel):
# call 1 `python3 benchmarks/bench_decode.py rows` (132 s), call 2 `pdl --model-only --compile-model --shapes
# opt-6.7b` (132 s). With the 2-row default (c02ca29, H100, one call of 212 s): that `pdl` call, then `fit
# --rows-per-block 2` and `8` (six calls that found no machine took 871 s of that session's 1,800). Next, on an
# H200 where one comes: `full` (about 350 s), then that same call.
# Still missing: the last two epochs of kd-mix-lr6e-4@1.0 (the dense model under KD); the same recipes
# with --recipe measured (the flags they fill in are these rows', tests/test_recovery.py checks it), and
# at batch 4 (the user's batch: the same samples at lr 4.2e-4, by the √batch rule).
# (iterative at 0.5 needs --density-steps from above 0.5; runs that prune the same uncached model
# at once each prune it, and the first one saved is kept)
# Runs longer than a call (issue 26, "Wanda updates against magnitude over the full budget"): runs started in their own
# process session outlive the call that started them, while the machine stays held. Send the calls in ONE message,
# so that each starts the moment the one before ends (the machine goes back after 30 s idle; a reply read in between
# lost a run twice). From a copy of the checkout, so that the next call's sync leaves it alone:
#   call 1 (carry .stage1 .whl): stage the model's first half and the wheels (../shared/DEVICE.md)
#   call 2 (carry .stage2 .data): cat the halves; cp -r . /tmp/w && cd /tmp/w && export PYTHONPATH=/tmp/site BATCH=4 \
#       SKIP_PRUNE=1; OUT=/tmp/res/a bash benchmarks/run_gpu.sh detach "measured-mag@0.1"; (the same for the others);
#       bash benchmarks/run_gpu.sh watch 560
#   call 3, 4 (no carry): cd /tmp/w && OUT=$OUT bash benchmarks/run_gpu.sh watch 570
# BATCH (default 8) and SEED (default 0; the run folder gets "-seedN" unless it is 0) apply to every run.
recipe() {  # $1 name, $2 density
  local start=$SECONDS
  ${RUN_LIMIT:+timeout $RUN_LIMIT} python3 extreme_compression_experiment.py --model "$GGUF" --sparsity "$2" \
    --batch-size "${BATCH:-8}" --seed "${SEED:-0}" \
    --eval-source "$DATA" --calibration-source "$DATA/wiki.valid.raw" --pruned-dir "${PRUNED:-/tmp/pruned}" \
    --eval-batch-size 8 --output-dir "$(run_dir "$1" "$2")" ${RECIPE[$1]} ${EXTRA:-}
  echo "wall_seconds $((SECONDS - start))"
}
keep_results() {  # every run's json to $OUT/runs.tgz, the detached runs' logs to $OUT/logs.tgz (whole or the last)
  find runs \( -name '*.json' -o -name '*.jsonl' \) 2>/dev/null | tar czf "$OUT/runs.tgz.tmp" -T - \
    && mv "$OUT/runs.tgz.tmp" "$OUT/runs.tgz"
  if [ -d "${WATCH:-/tmp/res}" ]; then
    tar czf "$OUT/logs.tgz.tmp" -C "${WATCH:-/tmp/res}" . && mv "$OUT/logs.tgz.tmp" "$OUT/logs.tgz"
  fi
}
run_dir() { echo "runs/$1-$2${BATCH:+-bs$BATCH}${TAG:-}$([ "${SEED:-0}" = 0 ] || echo "-seed$SEED")"; }
best_screen() {  # $1: screens NAME@DENSITY (TAG=-1ep); the name of the one with the lowest best perplexity, less the first
  for run in ${1#* }; do
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print((r.get('best') or {}).get('perplexity', 1e30), sys.argv[2])" \
      "$(TAG=-1ep run_dir "${run%@*}" "${run#*@}")/results.json" "$run" 2>/dev/null
  done | sort -g | head -1 | cut -d' ' -f2
}
case "${1:-bench}" in
  recipes)  # each NAME@DENSITY of $2 at once on one GPU (pruned first, one density at a time)
    for density in $([ -n "${SKIP_PRUNE:-}" ] || for run in $2; do echo "${run#*@}"; done | sort -u); do
      python3 extreme_compression_experiment.py --model "$GGUF" --sparsity "$density" --prune-only \
        --eval-source "$DATA" --calibration-source "$DATA/wiki.valid.raw" --pruned-dir "${PRUNED:-/tmp/pruned}" \
        --eval-batch-size 8 --output-dir "runs/prune-$density" ${EXTRA:-} 2>&1 | tee "$OUT/prune-$density.log"
    done
    for run in $2; do recipe "${run%@*}" "${run#*@}" > "$OUT/${run/@/_}.log" 2>&1 & done
    wait
    for run in $2; do python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], 'baseline', r['baseline'], 'epochs', [round(e['perplexity'],2) for e in r['epochs']], 'best', r['best'])" "$(run_dir "${run%@*}" "${run#*@}")/results.json" "$run"; grep -h wall_seconds "$OUT/${run/@/_}.log"; done | tee -a "$OUT/summary.txt"
    for run in $2; do for f in results.json metrics.jsonl; do cp "$(run_dir "${run%@*}" "${run#*@}")/$f" "$OUT/${run/@/_}.$f"; done; done ;;
  detach)  # `recipes "$2"` (or DETACHED=sweep: `sweep "$2" "$3" "$4"`) in its own process session: the runs outlive this
            # call (see "Runs longer than a call")
    setsid nohup bash "$0" "${DETACHED:-recipes}" "${@:2}" > "$OUT/detached.log" 2>&1 < /dev/null &
    echo "started: ${*:2} (logs in $OUT)" ;;
  sweep)  # issue 26's sweeps in one go: the screens of $2 (NAME@DENSITY, the first the baseline) at once with
          # --epochs 1 (TAG=-1ep), the full-budget runs of $3 beside them; then the screen with the lowest best
          # perplexity other than the baseline at the full budget (or the runs of $4 where it is given), SEED=0
          # and SEED=1 at once. Logs: $OUT/<part>/.
    mkdir -p "$OUT/screens" "$OUT/along" "$OUT/s0" "$OUT/s1"
    [ -z "${3:-}" ] || OUT="$OUT/along" bash "$0" recipes "$3" &
    along=$!
    TAG=-1ep EXTRA="${EXTRA:-} --epochs 1" OUT="$OUT/screens" bash "$0" recipes "$2"
    best=${4:-$(best_screen "$2")}
    said=$([ -n "${4:-}" ] && echo "then, as asked" || echo "best screen other than the baseline")
    echo "$said: ${best:-none}" | tee -a "$OUT/screens/summary.txt"
    if [ -n "$best" ]; then
      SEED=0 OUT="$OUT/s0" bash "$0" recipes "$best" &
      SEED=1 OUT="$OUT/s1" bash "$0" recipes "$best" &
    fi
    wait ;;
  running)  # the runs `watch` waits for, one per line (pid and command line); exit 1 where none is left
    pgrep -af "$RUNNING" ;;
  watch)  # progress every 90 s for $2 seconds or until no run is left; then every run's json to $OUT/runs.tgz
    end=$((SECONDS + ${2:?watch SECONDS}))
    shopt -s nullglob
    sleep 5  # a `detach` of this same command line has started its python by then
    report=$((SECONDS + 90))
    while [ $SECONDS -lt $end ] && pgrep -f "$RUNNING" > /dev/null; do
      sleep $(( end - SECONDS < 15 ? (end - SECONDS > 0 ? end - SECONDS : 1) : 15 ))
      [ $SECONDS -ge $report ] || [ $SECONDS -ge $end ] || continue
      report=$((SECONDS + 90))
      for log in ${WATCH:-/tmp/res}/*/*.log; do
        echo "$(date +%T) $log: $(tr '\r' '\n' < "$log" | grep -a -E 'Epoch [0-9]+(/|:)' | tail -1 | cut -c1-110)"
      done
      keep_results  # at every report: a call cut at its limit still brings back what the runs have written
    done
    keep_results ;;
  bench)
    python3 benchmarks/bench_eval.py 2>&1 | tee "$OUT/bench_eval.log"
    python3 benchmarks/bench_train.py --smollm2 "$GGUF" 2>&1 | tee "$OUT/bench_train.log"
    python3 benchmarks/bench_prune.py --smollm2 "$GGUF" --data "$DATA" --opt 2>&1 | tee "$OUT/bench_prune.log" ;;
  sparse)
    python3 benchmarks/bench_sparse.py 2>&1 | tee "$OUT/bench_sparse.log" ;;
  decode)  # torchao's wheel carried in .whl (PYTHONPATH=/tmp/site); 6–9 minutes on the H200
    python3 benchmarks/bench_decode.py full --two-four --smol "$GGUF" --text "$DATA/wiki.test.raw" 2>&1 \
      | tee "$OUT/bench_decode.log" ;;
  generate)  # the tool's own --generate on a SmolLM2 export at density ${DENSITY:-0.1}: dense and sparse kernels,
             # each with a dynamic and a static (compiled) KV cache; a GPU of its own, 2–4 minutes. TOKENS: new
             # tokens (128); EXTRA: flags for every command (e.g. --token-length 128 for a small model)
    rm -rf runs/generate-prune runs/generate-dense-* runs/generate-sparse-*  # a warm machine's earlier call
    python3 extreme_compression_experiment.py --model "$GGUF" --sparsity "${DENSITY:-0.1}" --prune-only \
      --eval-source "$DATA" --calibration-source "$DATA/wiki.valid.raw" --pruned-dir "${PRUNED:-/tmp/pruned}" \
      --eval-windows 8 --output-dir runs/generate-prune ${EXTRA:-} 2>&1 | tee "$OUT/generate-prune.log"
    [ -d runs/generate-prune/compressed ] || { echo "no export: see $OUT/generate-prune.log"; exit 1; }
    for kernels in dense sparse; do
      for cache in dynamic static; do
        python3 extreme_compression_experiment.py --eval-only --model runs/generate-prune/compressed ${EXTRA:-} \
          --eval-source "$DATA" --eval-windows 8 --generate "${TOKENS:-128}" --kernels "$kernels" \
          --generate-cache "$cache" --output-dir "runs/generate-$kernels-$cache" 2>&1 \
          | tee "$OUT/generate-$kernels-$cache.log" | grep -a -E "^Generation|Kernels|rror"
      done
    done
    keep_results ;;
  updates)  # 1–2 minutes, on a GPU of its own (before the training runs)
    python3 benchmarks/bench_prune.py --smollm2 "$GGUF" --data "$DATA" --updates 2>&1 | tee "$OUT/updates.log" ;;
  quality)
    python3 benchmarks/bench_prune.py --smollm2 "$GGUF" --data "$DATA" --quality 2>&1 | tee "$OUT/quality.log" ;;
  recover)
    for density in ${DENSITIES:-1.0 0.5 0.1}; do
      main_job "$density" "runs/smollm2-$density" "${@:2}" 2>&1 | tee "$OUT/recover-$density.log"
    done ;;
  multi)
    CUDA_VISIBLE_DEVICES=0 main_job 0.5 runs/one-gpu --epochs 1 "${@:2}" 2>&1 | tee "$OUT/one-gpu.log"
    for parallel in ${PARALLEL:-fsdp ddp}; do  # compare the epoch events' steady_tokens_per_second
      accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        extreme_compression_experiment.py --model "$GGUF" --sparsity 0.5 --batch-size 8 --epochs 1 \
        --train-source "$DATA/wiki.valid.raw" --eval-source "$DATA" --calibration-source "$DATA/wiki.valid.raw" \
        --eval-batch-size 8 --parallel "$parallel" --output-dir "runs/two-gpu-$parallel" "${@:2}" 2>&1 \
        | tee "$OUT/two-gpu-$parallel.log"
    done ;;
esac
