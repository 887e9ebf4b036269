# Sourced by the sbatch templates: run the training step so that a preemption warning
# (sbatch --signal=B:USR1@SECONDS) or a time limit ends in a checkpoint and a requeue.
#
# On USR1 (or TERM) the batch shell creates $PARTIALFC_STOP_FILE. The trainer's ranks look
# for it at step boundaries, agree on the same step, write a checkpoint, rank 0 writes
# $PARTIALFC_STOP_FILE.done, and they exit with code 3. The batch shell requeues the job when
# that marker exists (srun's own exit code is not trusted: a rank terminated while tearing
# down turns it into 143); the requeued job runs the same command and resumes from the run
# directory's latest checkpoint on its own.
run_preemptible() {
  export PARTIALFC_STOP_FILE="${PARTIALFC_RUN_DIR}/.stop-request"
  local done_marker="${PARTIALFC_STOP_FILE}.done"
  mkdir -p "${PARTIALFC_RUN_DIR}"
  rm -f "${PARTIALFC_STOP_FILE}" "${done_marker}"
  trap 'echo "[partialfc] $(date -Is) signal received: asking the trainer to checkpoint"; touch "${PARTIALFC_STOP_FILE}"' USR1 TERM
  echo "[partialfc] $(date -Is) job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}"
  "$@" &
  local pid=$! status
  # `wait` returns early (status > 128) when a trapped signal arrives: keep waiting for the
  # step; once it has exited, one more `wait` returns its real status.
  while true; do
    wait "$pid"; status=$?
    if ! kill -0 "$pid" 2>/dev/null; then
      [ "$status" -gt 128 ] && { wait "$pid"; status=$?; }
      break
    fi
  done
  if [ -f "${done_marker}" ]; then
    echo "[partialfc] $(date -Is) checkpoint written at step $(cat "${done_marker}"); requeueing job ${SLURM_JOB_ID}"
    if scontrol requeue "${SLURM_JOB_ID}"; then
      exit 0
    fi
    echo "[partialfc] requeue of job ${SLURM_JOB_ID} failed: resubmit the same script to resume" >&2
    exit 1
  fi
  exit "$status"
}
