#!/bin/bash -l
# Slurm job template (NERSC Perlmutter and similar): copy it, set the account, QOS, nodes, time and licenses, then
#
#   cd /path/to/repo && MODEL_ARCH=7B TP=2 TRAIN_TOKENS=2T DATA_FILE_LIST=... sbatch ALCF/submit/slurm.sh
#
# sbatch exports your environment (every train_alcf.sh variable). --signal=B:USR1@600 makes Slurm signal this script
# 10 minutes before the time limit; it is passed on so the run saves a checkpoint and exits. CHAIN=1 resubmits this
# script until the run's length is reached (CONTINUE=1 in later jobs). SBATCH_ARGS: extra sbatch options for them.
#SBATCH --job-name=train_alcf
#SBATCH --account=YOUR_ACCOUNT
#SBATCH --qos=regular
#SBATCH --constraint=gpu
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=01:00:00
#SBATCH --licenses=scratch,cfs
#SBATCH --signal=B:USR1@600
#SBATCH --output=%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:?submit with sbatch from the repository}"
# Site environment, e.g. on Perlmutter: module load pytorch
# shellcheck source=ALCF/submit/common.sh
source "${SLURM_SUBMIT_DIR}/ALCF/submit/common.sh"

RUN_DIR="${RUN_DIR:-runs/alcf/$(date +%Y%m%d-%H%M%S)_${SLURM_JOB_ID}}"
export RUN_DIR
echo "slurm.sh: job ${SLURM_JOB_ID} on ${SLURM_JOB_NUM_NODES:-?} node(s), run folder ${RUN_DIR}"

rc=0
submit_run 0 "$@" || rc=$?
# shellcheck disable=SC2086  # SBATCH_ARGS is a list of options
submit_chain "${rc}" sbatch ${SBATCH_ARGS:-} "${JOB_SCRIPT:-${SLURM_SUBMIT_DIR}/ALCF/submit/slurm.sh}"
exit "${rc}"
