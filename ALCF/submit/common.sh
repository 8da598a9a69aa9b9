#!/usr/bin/env bash
# Shared by pbs.sh and slurm.sh (sourced): run train_alcf.sh, pass the batch system's pre-walltime signal on so the
# run saves a checkpoint and exits cleanly, and resubmit the job until the run's length (TRAIN_TOKENS or
# TRAIN_ITERS) is reached when CHAIN=1.
#
# Variables: TRAIN_SCRIPT (default: train_alcf.sh of this repository), CHAIN (1: resubmit), CHAIN_MAX (at most
# this many jobs in the chain, default 20), CHAIN_INDEX (set by the chain), PYTHON.

SUBMIT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TRAIN_SCRIPT="${TRAIN_SCRIPT:-${SUBMIT_ROOT}/train_alcf.sh}"
SUBMIT_CHILD=""

submit_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    echo "${PYTHON}"
  elif [[ -x "${SUBMIT_ROOT}/.venv/bin/python" ]]; then
    echo "${SUBMIT_ROOT}/.venv/bin/python"
  else
    echo python3
  fi
}

# [[D-]HH:]MM:SS or plain seconds -> seconds.
submit_seconds() {
  local text="$1" days=0 total=0 part
  if [[ "${text}" == *-* ]]; then
    days="${text%%-*}"
    text="${text#*-}"
  fi
  local IFS=:
  for part in ${text}; do
    total=$((total * 60 + 10#${part}))
  done
  echo $((days * 86400 + total))
}

submit_forward() {
  if [[ -n "${SUBMIT_CHILD}" ]] && kill -0 "${SUBMIT_CHILD}" 2>/dev/null; then
    echo "$(basename "$0"): caught SIG$1: asking train_alcf.sh to save a checkpoint and exit"
    kill -USR1 "${SUBMIT_CHILD}" 2>/dev/null || true
  fi
}

# submit_run SIGNAL_AFTER_SECONDS [train_alcf.sh arguments...]: runs train_alcf.sh; sends it SIGUSR1 after the given
# seconds (0: never; Slurm sends its own with --signal) and on SIGUSR1/SIGTERM; returns its exit status.
submit_run() {
  local after="$1" rc
  shift
  trap 'submit_forward USR1' USR1
  trap 'submit_forward TERM' TERM
  bash "${TRAIN_SCRIPT}" "$@" &
  SUBMIT_CHILD=$!
  if ((after > 0)); then
    (
      if ! timeout "${after}" tail --pid="${SUBMIT_CHILD}" -f /dev/null; then
        echo "$(basename "$0"): ${after}s elapsed (walltime minus the margin): asking the run to save and exit"
        kill -USR1 "${SUBMIT_CHILD}" 2>/dev/null || true
      fi
    ) &
  fi
  while :; do
    if wait "${SUBMIT_CHILD}"; then rc=0; else rc=$?; fi
    if ((rc > 128)) && kill -0 "${SUBMIT_CHILD}" 2>/dev/null; then
      continue # a trapped signal interrupted wait; the run goes on (saving)
    fi
    break
  done
  trap - USR1 TERM
  return "${rc}"
}

# submit_chain STATUS RESUBMIT_COMMAND...: with CHAIN=1, runs the command (with CONTINUE=1 and the next
# CHAIN_INDEX in its environment) when the run of RUN_DIR has not reached TRAIN_ITERS, succeeded and made progress.
submit_chain() {
  local rc="$1" start latest target index="${CHAIN_INDEX:-1}" max="${CHAIN_MAX:-20}"
  shift
  if [[ "${CHAIN:-0}" != 1 ]]; then
    return 0
  fi
  if ! read -r start latest target < <(
    PYTHONPATH="${SUBMIT_ROOT}${PYTHONPATH:+:${PYTHONPATH}}" "$(submit_python)" -m megatron_ext.alcf_env progress "${RUN_DIR}"
  ); then
    echo "chain: no progress to read in ${RUN_DIR}; not resubmitting"
    return 0
  fi
  if ((latest >= target)); then
    echo "chain: done, iteration ${latest} of ${target}"
  elif ((rc != 0)); then
    echo "chain: the run failed (status ${rc}) at iteration ${latest} of ${target}; not resubmitting"
  elif ((latest <= start)); then
    echo "chain: no progress in this job (iteration ${latest}); not resubmitting"
  elif ((index >= max)); then
    echo "chain: CHAIN_MAX=${max} jobs reached at iteration ${latest} of ${target}; not resubmitting"
  else
    echo "chain: iteration ${latest} of ${target}; submitting job $((index + 1)): $*"
    (
      unset RUN_DIR # the next job gets its own run folder
      CONTINUE=1 CHAIN_INDEX=$((index + 1)) "$@"
    )
  fi
}
