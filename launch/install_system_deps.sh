#!/usr/bin/env bash
# System packages the integration tests use: a real Slurm (slurmctld, slurmd, client) and
# munge; dlib's 68-point landmark model (libdlib-data) for the dlib face detector.
# Debian/Ubuntu, as root; does nothing when they are already installed.
set -euo pipefail
if command -v sbatch >/dev/null && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ] \
    && [ -f /usr/share/dlib/shape_predictor_68_face_landmarks.dat ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_system_deps.sh: need root to apt-get install slurmctld slurmd slurm-client munge libdlib-data" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge libdlib-data >/dev/null
