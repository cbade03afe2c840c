#!/usr/bin/env bash
# The paper's study in one command, at a chosen scale:
#   1. MD pretraining from each teacher
#   2. fine-tuning of each MD student, of each teacher directly (the "better baseline") and from
#      scratch, all with the same recipe
#   3. every metric of analyze.py, each figure with the models the paper compares side by side
#   4. ROOT/report.md (and report.html): the figures, the numbers, the paper's claims tested
#
#   experiments/paper.sh embedded      # CPU, the shipped embedded teacher, minutes
#   experiments/paper.sh imagenette    # one GPU, CLIP, DINO and DeiT ViT-B/16, data/imagenette
#   experiments/paper.sh imagenet      # 8 GPUs (torchrun), the paper's recipe
#   experiments/paper.sh smoke         # every step for a few iterations: checks the pipeline
#
# A scale is a settings file, experiments/scales/SCALE.sh. Results go to ROOT (default
# out/paper_SCALE, a path from the repository root). Environment: ROOT=..., PYTHON=...,
# TEACHERS="clip deit" (a subset of the scale's teachers), SHAPE_TEACHERS="" (the teachers whose own
# decisions shape bias and OOD show before fine-tuning: none).
# A finished step writes ROOT/steps/NAME.done (its seconds and its command) and is skipped when
# the script runs again; Ctrl-C or a SIGTERM to the script stops the step that runs, then the script;
# a stopped training resumes from its checkpoint; an analysis whose command has something new (more
# TEACHERS, other settings) runs again. To redo a step, delete its .done file (and, for a training,
# its folder).
set -euo pipefail
cd "$(dirname "$0")/.."
{  # one block: bash reads all of it before it starts, so editing this file cannot upset a run

SCALE=${1:-}
if [ -z "$SCALE" ] || [ ! -f "experiments/scales/$SCALE.sh" ]; then
  unknown=${SCALE:+"unknown scale '$SCALE'; "}
  echo "error: ${unknown}usage: experiments/paper.sh SCALE, with SCALE one of:" \
       $(ls experiments/scales | sed 's/\.sh$//') >&2
  exit 1
fi
# what a scale may leave out: no sharpness log, no shape bias, no OOD
SHARPNESS_EVERY=0 SHAPE_DATA="" OOD_DATA="" OOD_HUMAN=""
source "experiments/scales/$SCALE.sh"
SHAPE_TEACHERS=${SHAPE_TEACHERS-}  # the environment's (SHAPE_TEACHERS="": none), else the scale's
ROOT=${ROOT:-out/paper_$SCALE}
PYTHON=${PYTHON:-python}

# ---- 0. what the scale needs, said before any work starts
missing=()
if [ "$DATA" != embedded ] && { [ ! -d "$DATA/train" ] || [ ! -d "$DATA/val" ]; }; then
  missing+=("dataset $DATA (train/ and val/ class folders): $DATA_HOW")
fi
if [ -n "$SHAPE_DATA" ] && [ "$SHAPE_DATA" != embedded ] && [ ! -d "$SHAPE_DATA" ]; then
  echo "skipped: shape bias: no $SHAPE_DATA ($SHAPE_HOW)"
  SHAPE_DATA=""
fi
if [ -n "$OOD_DATA" ] && [ ! -d "$OOD_DATA" ]; then
  echo "skipped: OOD accuracy and error consistency: no $OOD_DATA ($OOD_HOW)"
  OOD_DATA=""
fi
if [ -z "$SHAPE_DATA$OOD_DATA" ]; then  # the teachers judged on decisions take part in those two only
  SHAPE_TEACHERS=""
fi
for t in $TEACHERS $SHAPE_TEACHERS; do
  case $t in clip|dino|deit|embedded) ;; *)
    echo "error: unknown teacher '$t' in TEACHERS or SHAPE_TEACHERS: choose from clip dino deit embedded" >&2
    exit 1 ;;
  esac
done
# where teacher.py reads each teacher's weights (TEACHERS, and SHAPE_TEACHERS: the classifiers among them whose
# decisions shape bias and OOD compare before fine-tuning): the shipped file, or its download cache
files=$($PYTHON -c "import os, sys, teacher as T
for n in sorted(set(sys.argv[1:])):
    print(n, T.EMBEDDED_TEACHER if n == 'embedded' else
          os.path.join(T.CACHE_DIR, os.path.basename(T.OFFICIAL[n][0])))" $TEACHERS $SHAPE_TEACHERS)
while read -r t file; do
  if [ -n "$t" ] && [ ! -f "$file" ]; then
    without='TEACHERS="..."'
    if [[ " $TEACHERS " != *" $t "* ]]; then
      without='SHAPE_TEACHERS=""'
    fi
    missing+=("teacher $t ($file): $PYTHON -c \"import teacher; teacher.load_model('$t')\"\
 downloads it, or run without it: $without experiments/paper.sh $SCALE")
  fi
done <<< "$files"
if [ ${#missing[@]} -gt 0 ]; then
  printf 'missing: %s\n' "${missing[@]}" >&2
  echo "error: scale '$SCALE' lacks ${#missing[@]} piece(s) above; nothing was run" >&2
  exit 1
fi

mkdir -p "$ROOT/steps"
if [ ! -f "$ROOT/$SCALE.sh" ]; then  # the settings the run began with, for the report
  cp "experiments/scales/$SCALE.sh" "$ROOT/$SCALE.sh"
elif ! cmp -s "experiments/scales/$SCALE.sh" "$ROOT/$SCALE.sh"; then
  echo "warning: experiments/scales/$SCALE.sh changed since $ROOT began ($ROOT/$SCALE.sh);" \
       "finished trainings keep the settings they ran with; analyses with new settings run again"
fi
ran=0
skipped=0

# A stop reaches the step that runs and ends the script after it, even when the step still finishes
# (a Ctrl-C in a training's last iteration): Ctrl-C goes from the terminal to the step itself; a SIGTERM
# to this script (kill, a scheduler) is passed on to the step, which saves and stops as on its own.
child="" stop="" signals=0
on_term() {
  stop=143 signals=$((signals + 1))
  if [ -n "$child" ]; then
    pkill -TERM -P "$child" || true  # the step (run's subshell keeps on to record its status)
  fi
}
trap 'stop=130 signals=$((signals + 1))' INT
trap on_term TERM

# run COMMAND...: COMMAND in the background, waited for (a trapped signal ends a plain `wait` early, a
# foreground command would hold it until the command ends). Returns COMMAND's exit status, which a
# subshell writes to a file: bash loses a child's status when the child ends as a signal cuts the
# `wait` short (1 in 300 tries of a Ctrl-C to a step that ends at once: a later `wait` said 127 or
# 255). The subshell traps INT and TERM to outlive COMMAND, which starts with their default actions
# (an exec resets a caught signal; a background job would start with Ctrl-C ignored).
run() {
  local result="$ROOT/steps/status" status=0
  rm -f "$result"
  ( trap : INT TERM; "$@"; echo $? > "$result.part"; mv "$result.part" "$result" ) &
  child=$!
  while [ ! -f "$result" ] && kill -0 "$child" 2>/dev/null; do
    wait "$child" || status=$?  # again after a signal, until the subshell has ended
  done
  child=""
  if [ -f "$result" ]; then
    status=$(cat "$result")
    rm -f "$result"
  fi
  return "$status"
}

# stopped [STATUS]: end the script here if a stop signal came, else with STATUS if it is not 0
stopped() {
  if [ -n "$stop" ]; then
    echo "stopped by $([ "$stop" = 130 ] && echo Ctrl-C || echo SIGTERM): run experiments/paper.sh $SCALE" \
         "again to go on from here" >&2
    exit "$stop"
  fi
  if [ "${1:-0}" != 0 ]; then
    exit "$1"
  fi
}

# step NAME COMMAND...: run COMMAND unless ROOT/steps/NAME.done says it already finished. The
# seconds of a try that stopped or failed are kept in NAME.spent and added to the next one's.
step() {
  local name=$1 start=$SECONDS status=0 seconds
  local spent="$ROOT/steps/$1.spent"
  shift
  if [ -f "$ROOT/steps/$name.done" ]; then
    echo "== $name: finished before, skipped"
    skipped=$((skipped + 1))
    return
  fi
  stopped  # a signal between two steps
  echo "== $name: $*"
  run "$@" || status=$?
  seconds=$((SECONDS - start + $(cat "$spent" 2>/dev/null || echo 0)))
  if [ "$status" != 0 ]; then
    echo "$seconds" > "$spent"
    stopped "$status"
  fi
  printf '%s\t%s\n' "$seconds" "$*" > "$ROOT/steps/$name.done"
  rm -f "$spent"
  ran=$((ran + 1))
  stopped
}

# train NAME SCRIPT ARGS...: a training step writing to ROOT/NAME, resumed if it had stopped
train() {
  local name=$1 resume=""
  shift
  if [ -f "$ROOT/$name/ckpt.pt" ] && [ ! -f "$ROOT/steps/$name.done" ]; then
    resume=--resume=True
  fi
  step "$name" $LAUNCH "$@" --out_dir="$ROOT/$name" $resume
}

# words COMMAND...: its words one per line, each name of a --labels list as a --label=NAME of its own
words() {
  local word
  for word in "$@"; do
    case $word in
      --labels=*) tr ',' '\n' <<< "${word#--labels=}" | sed 's/^/--label=/' ;;
      *) printf '%s\n' "$word" ;;
    esac
  done
}

# analysis NAME COMMAND...: a step whose command names its models and settings: where it has a word
# (a model, a label, an option with its value) that the finished one had not (TEACHERS grew, a setting
# changed), or lacks an option the finished one set, it runs again and replaces its files; a rerun with a
# subset of the models keeps the finished files
analysis() {
  local name=$1 done_file="$ROOT/steps/$1.done" before now word
  if [ -f "$done_file" ]; then
    # both split at spaces, as the .done file keeps the command (a path with a space: the same words on both)
    before=$(set -f; words $(cut -f2- "$done_file"))
    now=$(set -f; words ${*:2})
    word=$(grep -vxF -f <(echo "$before") <<< "$now" | head -1 || true)
    if [ -n "$word" ]; then
      echo "== $name: its command has '$word', which the finished one ($done_file) had not: run again"
      rm "$done_file"
    else
      word=$(grep -o '^--[a-z_]*=' <<< "$before" | grep -v '^--label=' \
             | grep -vxF -f <(grep -o '^--[a-z_]*=' <<< "$now") | head -1 || true)
      if [ -n "$word" ]; then
        echo "== $name: the finished one ($done_file) set ${word%=}, which its command does not: run again"
        rm "$done_file"
      fi
    fi
  fi
  step "$@"
}

join() { local IFS=,; echo "$*"; }

# ---- 1. MD pretraining from each teacher
for t in $TEACHERS; do
  train "md_$t" train_md.py $MD_ARGS --teacher="$t" --data_dir="$DATA"
done

# ---- 2. fine-tuning: each MD student, each teacher directly, and from scratch; the better
# baseline's teacher (CLIP, or the first one standing in for it) also at FD's higher lr
FT="$FT_ARGS --data_dir=$DATA --hessian_every=$SHARPNESS_EVERY"
for t in $TEACHERS; do
  train "ft_md_$t" finetune.py $FT --init="$ROOT/md_$t/ckpt.pt"
  train "ft_$t" finetune.py $FT --init="$t"
done
baseline=$(for t in $TEACHERS; do echo "$t"; done | grep -x clip || echo "${TEACHERS%% *}")
earlier=$(cd "$ROOT/steps" && ls ft_*_fd_lr.done 2>/dev/null | head -1 || true)
if [ "$baseline" != clip ] && [ -n "$earlier" ]; then  # a rerun without CLIP: the finished one stands
  baseline=${earlier#ft_}
  baseline=${baseline%_fd_lr.done}
fi
train "ft_${baseline}_fd_lr" finetune.py $FT --init="$baseline" --lr="$FD_LR"
train ft_scratch finetune.py $FT --init=scratch

# ---- 3. every metric; labels name the roles (the report reads them): T, md_T, ft_T, ft_md_T
pre=() pre_labels=() ft=() ft_labels=() logs=()
for t in $TEACHERS; do
  pre+=("$t" "$ROOT/md_$t/ckpt.pt")
  pre_labels+=("$t" "md_$t")
  ft+=("$ROOT/ft_md_$t/ckpt.pt" "$ROOT/ft_$t/ckpt.pt")
  ft_labels+=("ft_md_$t" "ft_$t")
  logs+=("$ROOT/ft_md_$t/sharpness.json" "$ROOT/ft_$t/sharpness.json")
done
ft+=("$ROOT/ft_scratch/ckpt.pt")
ft_labels+=(ft_scratch)
logs+=("$ROOT/ft_scratch/sharpness.json")
PRE=$(join "${pre_labels[@]}")
FINETUNED=$(join "${ft_labels[@]}")
A=$ROOT/analysis
# attention, frequency and spectrum metrics (Figs. 2-6, 10): each teacher next to its MD student
analysis analysis_pretrained $PYTHON analyze.py --metric all "${pre[@]}" --labels="$PRE" \
  --data="$DATA" --out="$A/pretrained" $ANALYZE_ARGS
# the same metrics after fine-tuning: MD student, teacher directly, scratch
analysis analysis_finetuned $PYTHON analyze.py --metric all "${ft[@]}" --labels="$FINETUNED" \
  --data="$DATA" --out="$A/finetuned" $ANALYZE_ARGS
# curvature where fine-tuning ended (Fig. 7): top eigenvalues and trace, loss landscape
analysis hessian $PYTHON analyze.py --metric hessian "${ft[@]}" --labels="$FINETUNED" \
  --data="$DATA" --out="$A/finetuned" $HESSIAN_ARGS
analysis landscape $PYTHON analyze.py --metric landscape "${ft[@]}" --labels="$FINETUNED" \
  --data="$DATA" --out="$A/finetuned" $LANDSCAPE_ARGS
# sharpness during fine-tuning (Fig. 7c/f), where the scale logs it
if [ "$SHARPNESS_EVERY" != 0 ]; then
  analysis sharpness $PYTHON analyze.py --metric sharpness "${logs[@]}" --labels="$FINETUNED" \
    --out="$A/finetuned"
fi
# decisions (Figs. 8a, 11, 12) of the fine-tuned models, and of the teachers that are
# classifiers of these categories (before fine-tuning)
DECIDERS=$(join $SHAPE_TEACHERS "${ft_labels[@]}")
if [ -n "$SHAPE_DATA" ]; then
  analysis shape_bias $PYTHON analyze.py --metric shape_bias $SHAPE_TEACHERS "${ft[@]}" \
    --labels="$DECIDERS" --data="$SHAPE_DATA" --out="$A/finetuned"
fi
if [ -n "$OOD_DATA" ]; then
  analysis ood $PYTHON analyze.py --metric ood $SHAPE_TEACHERS "${ft[@]}" --labels="$DECIDERS" \
    --data="$OOD_DATA" --human="$OOD_HUMAN" --out="$A/finetuned"
fi

# ---- 4. the report (always rewritten: it only reads the files above)
status=0
run $PYTHON analyze.py --metric report "$ROOT" || status=$?
stopped "$status"
echo "done: $ran step(s) ran, $skipped finished before; $((SECONDS / 60)) min $((SECONDS % 60)) s"
exit
}
