#!/usr/bin/env bash
# Functions for train_alcf.sh: pick the launcher, resolve the variables through the Python schema, launch, forward
# signals. Sourced, not run. Nothing is downloaded and nothing is installed here.
#
# What each variable means, its default and its validation live in megatron_ext/alcf_env.py (one typed schema,
# megatron_ext/config.py; the launch command lines in megatron_ext/launch.py); this file only chooses between
# mpiexec, srun, torchrun and python, and runs the command the resolver prints.

# The repository: where this file lies (a PBS job runs a spooled copy of train_alcf.sh, so not from $0).
ALCF_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

alcf_error() {
  echo "error: $*" >&2
  return 2
}

# Interpreter for the resolver and the ranks: $PYTHON, else the repository's .venv, else python3.
alcf_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    echo "${PYTHON}"
  elif [[ -x "${ALCF_ROOT}/.venv/bin/python" ]]; then
    echo "${ALCF_ROOT}/.venv/bin/python"
  else
    command -v python3 || alcf_error "no python3 on PATH; set PYTHON=/path/to/python"
  fi
}

# The flavour of an MPI launcher from its --version: openmpi or mpich (MPICH, PALS on ALCF, Intel MPI).
alcf_mpi_flavor() {
  local exe="$1" version
  version="$("${exe}" --version 2>&1 || true)"
  if [[ "${version}" == *"Open MPI"* || "${version}" == *"OpenRTE"* ]]; then
    echo openmpi
  else
    echo mpich
  fi
}

# Sets ALCF_LAUNCHER (auto|python|torchrun|mpiexec|srun), ALCF_MPI_EXE and ALCF_MPI_FLAVOR from LAUNCH_WITH and the
# job: PBS -> mpiexec, Slurm -> srun, else auto (the resolver picks torchrun, or python for a single rank).
alcf_pick_launcher() {
  local want="${LAUNCH_WITH:-auto}"
  ALCF_MPI_EXE=mpiexec
  ALCF_MPI_FLAVOR=mpich
  case "${want,,}" in
    auto)
      if [[ -n "${PBS_JOBID:-}" ]]; then
        ALCF_LAUNCHER=mpiexec
      elif [[ -n "${SLURM_JOB_ID:-${SLURM_JOBID:-}}" ]]; then
        ALCF_LAUNCHER=srun
      else
        ALCF_LAUNCHER=auto
      fi
      ;;
    mpiexec | mpirun | mpich | openmpi | pals) ALCF_LAUNCHER=mpiexec ;;
    srun | slurm) ALCF_LAUNCHER=srun ;;
    torchrun) ALCF_LAUNCHER=torchrun ;;
    python) ALCF_LAUNCHER=python ;;
    *)
      alcf_error "LAUNCH_WITH=${want} is not a launcher; expected auto, mpiexec, mpirun, srun, torchrun or python"
      return 2
      ;;
  esac
  if [[ "${ALCF_LAUNCHER}" == mpiexec ]]; then
    local exe
    exe="$(command -v mpiexec || command -v mpirun || true)"
    if [[ -z "${exe}" ]]; then
      if [[ "${DRY_RUN:-0}" == 1 ]]; then
        echo "note: no mpiexec on PATH; showing the MPICH/PALS command (module load the MPI before launching)"
      else
        alcf_error "no mpiexec or mpirun on PATH; expected an MPI launcher (module load cray-pals, or LAUNCH_WITH=torchrun)"
        return 2
      fi
    else
      ALCF_MPI_EXE="$(basename "${exe}")"
      ALCF_MPI_FLAVOR="$(alcf_mpi_flavor "${exe}")"
    fi
  fi
}

# Resolves the variables (and the pass-through arguments) into the run: sets RUN_DIR, LAUNCH_CMD, LAUNCH_SIGNAL,
# DRY_RUN and exports OMP_NUM_THREADS. Prints every variable with its source, the derived sizes and the command.
alcf_resolve() {
  local py emit rc=0
  py="$(alcf_python)" || return 2
  emit="$(mktemp "${TMPDIR:-/tmp}/train_alcf.XXXXXX")"
  PYTHONPATH="${ALCF_ROOT}${PYTHONPATH:+:${PYTHONPATH}}" "${py}" -m megatron_ext.alcf_env resolve \
    --launcher "${ALCF_LAUNCHER}" --mpi-flavor "${ALCF_MPI_FLAVOR}" --mpi-exe "${ALCF_MPI_EXE}" --emit "${emit}" \
    -- "$@" || rc=$?
  if [[ "${rc}" != 0 ]]; then
    rm -f "${emit}"
    return "${rc}"
  fi
  DRY_RUN=1 # stays so when the resolver printed help and wrote nothing
  # shellcheck disable=SC1090  # written by megatron_ext.alcf_env.emit_shell (shlex-quoted)
  source "${emit}"
  rm -f "${emit}"
}

alcf_usage() {
  sed -n '2,/^set -euo/p' "${ALCF_ROOT}/train_alcf.sh" | sed -e '$d' -e 's/^# \{0,1\}//'
  echo
  PYTHONPATH="${ALCF_ROOT}${PYTHONPATH:+:${PYTHONPATH}}" "$(alcf_python)" -m megatron_ext.alcf_env docs
  echo
  echo "pretrain_gpt.py flags (passed through): $(alcf_python) ${ALCF_ROOT}/pretrain_gpt.py --help"
}

ALCF_CHILD=""

# Passes a caught signal on to the launcher as the signal its ranks take for "save a checkpoint and exit"
# (SIGUSR1 through mpiexec/mpirun/srun, which forward it; SIGTERM to python). torchrun turns a SIGTERM of its own
# into a SignalException (a traceback, exit 1, the ranks killed 30 s later): its ranks, its children, get the
# signal instead, and torchrun exits with their status once they have saved.
alcf_forward() {
  local sig="$1" ranks=()
  if [[ -z "${ALCF_CHILD}" ]] || ! kill -0 "${ALCF_CHILD}" 2>/dev/null; then
    return 0
  fi
  if [[ "${LAUNCH_CMD[0]##*/}" == torchrun || "${LAUNCH_CMD[*]:1:2}" == "-m torch.distributed.run" ]]; then
    mapfile -t ranks < <(ps -o pid= --ppid "${ALCF_CHILD}" 2>/dev/null | tr -d ' ')
  fi
  if ((${#ranks[@]})); then
    echo "train_alcf.sh: caught SIG${sig}; sending SIG${LAUNCH_SIGNAL} to the ranks (pids ${ranks[*]}): the run saves a checkpoint and exits"
    kill -s "${LAUNCH_SIGNAL}" "${ranks[@]}" 2>/dev/null || true
  else
    echo "train_alcf.sh: caught SIG${sig}; sending SIG${LAUNCH_SIGNAL} to the launcher (pid ${ALCF_CHILD}): the run saves a checkpoint and exits"
    kill -s "${LAUNCH_SIGNAL}" "${ALCF_CHILD}" 2>/dev/null || true
  fi
}

# Runs LAUNCH_CMD with its output also in RUN_DIR/output.log, forwarding USR1/TERM/INT; returns its exit status.
alcf_launch() {
  local log="${RUN_DIR}/output.log" rc fd tee_pid
  echo "train_alcf.sh: launching; output also in ${log}"
  exec {fd}> >(tee -a "${log}")
  tee_pid=$!
  trap 'alcf_forward USR1' USR1
  trap 'alcf_forward TERM' TERM
  trap 'alcf_forward INT' INT
  "${LAUNCH_CMD[@]}" >&"${fd}" 2>&1 &
  ALCF_CHILD=$!
  while :; do
    if wait "${ALCF_CHILD}"; then rc=0; else rc=$?; fi
    # Above 128 may mean "wait was interrupted by a trapped signal" while the launcher still runs (or is a zombie).
    if ((rc > 128)) && kill -0 "${ALCF_CHILD}" 2>/dev/null; then
      continue
    fi
    break
  done
  trap - USR1 TERM INT
  exec {fd}>&-
  wait "${tee_pid}" 2>/dev/null || true
  echo "train_alcf.sh: launcher exited with status ${rc}" | tee -a "${log}"
  return "${rc}"
}

alcf_main() {
  if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
    alcf_usage
    return 0
  fi
  # Relative paths (DATA_FILE_LIST, LOAD, SAVE, runs/) are taken from where the job was submitted.
  if [[ -n "${PBS_JOBID:-}" && -n "${PBS_O_WORKDIR:-}" ]]; then
    cd "${PBS_O_WORKDIR}" || return 2
  fi
  alcf_pick_launcher || return $?
  alcf_resolve "$@" || return $?
  if [[ "${DRY_RUN}" == 1 ]]; then
    return 0
  fi
  alcf_launch
}
