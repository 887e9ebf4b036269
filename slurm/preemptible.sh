# Sourced by the sbatch templates: run the training step so that a preemption warning
# (sbatch --signal=B:USR1@SECONDS) or a time limit ends in a checkpoint and a requeue.
#
# On USR1 (or TERM) the batch shell creates $PARTIALFC_STOP_FILE. The trainer's ranks look
# for it at step boundaries, agree on the same step, write a checkpoint and exit with code
# 3 (EXIT_PREEMPTED). The batch shell then requeues the job; the requeued job runs the same
# command and resumes from the run directory's latest checkpoint on its own.
EXIT_PREEMPTED=3

run_preemptible() {
  export PARTIALFC_STOP_FILE="${PARTIALFC_RUN_DIR}/.stop-request"
  mkdir -p "${PARTIALFC_RUN_DIR}"
  rm -f "${PARTIALFC_STOP_FILE}"
  trap 'echo "[partialfc] $(date -Is) signal received: asking the trainer to checkpoint"; touch "${PARTIALFC_STOP_FILE}"' USR1 TERM
  echo "[partialfc] $(date -Is) job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}"
  "$@" &
  local pid=$! status
  # `wait` returns early when a trapped signal arrives: keep waiting for the step itself.
  while true; do
    wait "$pid"; status=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  if [ "$status" -eq "$EXIT_PREEMPTED" ]; then
    echo "[partialfc] $(date -Is) checkpoint written; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
  fi
  exit "$status"
}
