#!/usr/bin/env bash
# Train from environment variables, as on ALCF systems: inside a PBS job (mpiexec), a Slurm job (srun) or on
# this machine (torchrun over all cores with gloo on a CPU-only laptop). Extra arguments go to pretrain_gpt.py.
#
#   bash train_alcf.sh                                   # tiny model, built-in corpus: ~30 s on 2 CPU cores
#   DRY_RUN=1 MODEL_ARCH=7B TP=2 TRAIN_TOKENS=2T bash train_alcf.sh     # print the command and configuration
#   DATA_FILE_LIST=./data_lists/mix.txt LOAD=/path/ckpt TRAIN_TOKENS=$((22*10**9)) GRAD_ACC_STEPS=16 \
#     LR=0.0002 LR_WARMUP_FRACTION=0.01 bash train_alcf.sh --universal-checkpoint --finetune
#
# Every variable, its default and what it maps to: ALCF/README.md (or the list printed at the start of a run).
# Job templates: ALCF/submit/pbs.sh, ALCF/submit/slurm.sh. Guides: ALCF/notes/.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# `qsub train_alcf.sh` runs a spooled copy: find the repository through the submission folder then.
for dir in "${here}" "${PBS_O_WORKDIR:-}" "${SLURM_SUBMIT_DIR:-}"; do
  if [[ -n "${dir}" && -f "${dir}/ALCF/helpers.sh" ]]; then
    # shellcheck source=ALCF/helpers.sh
    source "${dir}/ALCF/helpers.sh"
    alcf_main "$@"
    exit $?
  fi
done
echo "error: ALCF/helpers.sh not found next to train_alcf.sh or in PBS_O_WORKDIR/SLURM_SUBMIT_DIR" >&2
exit 2
