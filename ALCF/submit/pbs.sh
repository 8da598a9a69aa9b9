#!/bin/bash -l
# PBS job template (Aurora, Polaris, Sunspot): copy it, set the account, queue, nodes, walltime and filesystems, then
#
#   cd /path/to/repo && MODEL_ARCH=7B TP=2 TRAIN_TOKENS=2T DATA_FILE_LIST=... qsub -V ALCF/submit/pbs.sh
#
# Every train_alcf.sh variable is read from the environment (qsub -V passes yours). SIGNAL_MARGIN_MINS (default 10)
# minutes before the walltime the run is asked to save a checkpoint and exit (PBS has no pre-walltime signal, so a
# timer sends SIGUSR1). CHAIN=1 resubmits this script until the run's length is reached (CONTINUE=1 in later jobs:
# they resume from SAVE). QSUB_ARGS: extra qsub options for the resubmissions (e.g. "-A proj -q prod").
#PBS -N train_alcf
#PBS -A YOUR_PROJECT
#PBS -q debug
#PBS -l select=2
#PBS -l place=scatter
#PBS -l walltime=01:00:00
#PBS -l filesystems=home:flare
#PBS -j oe
#PBS -k doe
set -euo pipefail
cd "${PBS_O_WORKDIR:?submit with qsub from the repository}"
# Site environment, e.g. on Aurora: module load frameworks; on Polaris: module use /soft/modulefiles; module load conda
# shellcheck source=ALCF/submit/common.sh
source "${PBS_O_WORKDIR}/ALCF/submit/common.sh"

walltime="${WALLTIME:-}"
if [[ -z "${walltime}" ]] && command -v qstat >/dev/null 2>&1; then
  walltime="$(qstat -f "${PBS_JOBID}" 2>/dev/null | awk -F' = ' '/Resource_List.walltime/ {print $2}')"
fi
signal_after=0
if [[ -n "${walltime}" ]]; then
  signal_after=$(($(submit_seconds "${walltime}") - 60 * ${SIGNAL_MARGIN_MINS:-10}))
  if ((signal_after <= 0)); then
    signal_after=1
  fi
fi
RUN_DIR="${RUN_DIR:-runs/alcf/$(date +%Y%m%d-%H%M%S)_${PBS_JOBID%%.*}}"
export RUN_DIR
echo "pbs.sh: job ${PBS_JOBID} on $(sort -u "${PBS_NODEFILE}" | wc -l) node(s), walltime ${walltime:-unknown}, run folder ${RUN_DIR}"

rc=0
submit_run "${signal_after}" "$@" || rc=$?
# shellcheck disable=SC2086  # QSUB_ARGS is a list of options
submit_chain "${rc}" qsub -V ${QSUB_ARGS:-} "${JOB_SCRIPT:-${PBS_O_WORKDIR}/ALCF/submit/pbs.sh}"
exit "${rc}"
