#!/usr/bin/env bash
# Starts 'hybriddiff train' on every host of a TPU VM, detached, with one log file per host.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

spec="name= zone= project= config= workdir= data= env= mount-root= dry-run help --"
help=$(hd_usage "$spec" \
  "Starts training on every host (--worker=all). Each host reads the TPU worker id and the worker
list from the metadata server and exports TPU_WORKER_ID and TPU_WORKER_HOSTNAMES, so that
jax.distributed.initialize() joins all hosts of a pod slice; a single host runs alone. Each host
mounts the buckets of --workdir and --data with gcsfuse at MOUNT_ROOT/BUCKET (unless mounted), and
the trainer gets the mounted paths: --workdir=MOUNT_ROOT/BUCKET/PATH and, with --data,
--config.data.prepared_dir=MOUNT_ROOT/BUCKET/PATH. The trainer resumes from the newest checkpoint
in --workdir. Logs: \$HOME/hybriddiff-logs/train-worker<ID>.log on each host." \
  "  launch/train.sh --name=hd-v4 --zone=us-central2-b --config=configs/owt_gamma_flat.py \\
      --workdir=gs://my-bucket/runs/owt_gamma_flat --data=gs://my-bucket/data/owt -- --config.train.batch_size=512")
hd_parse "$spec" "$help" "$@"
hd_check_location
hd_check_config
hd_require workdir
hd_check_storage workdir
if [[ -n $HD_DATA ]]; then
  hd_check_storage data
fi
hd_check_mount_root
hd_check_env
hd_train
