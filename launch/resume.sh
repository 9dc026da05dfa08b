#!/usr/bin/env bash
# Resumes a run after a preemption: re-creates the TPU VM if it is gone or preempted, installs
# hybriddiff again, and restarts training with the same --workdir (the trainer restores the newest
# checkpoint there).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

spec="name= zone= project= accelerator= version= spot preemptible repo= ref= tarball= python= config= workdir= data= env= mount-root= dry-run help --"
help=$(hd_usage "$spec" \
  "Looks up the state of the TPU VM. PREEMPTED, TERMINATED, STOPPED or SUSPENDED: deletes it.
Deleted or missing: creates it and runs the setup, with the same commands as create.sh and
setup.sh. Then starts training as train.sh does; READY with training still running: the train step
refuses to start a second copy and the script fails. Any other state (CREATING, ...): fails, rerun
later. --dry-run prints every command with the conditions as comments." \
  "  launch/resume.sh --name=hd-v4 --zone=us-central2-b --accelerator=v4-32 --spot \\
      --repo=https://github.com/OWNER/hybriddiff.git --config=configs/owt_gamma_flat.py \\
      --workdir=gs://my-bucket/runs/owt_gamma_flat --data=gs://my-bucket/data/owt")
hd_parse "$spec" "$help" "$@"
hd_check_location
hd_check_create
hd_check_source
hd_check_config
hd_require workdir
hd_check_storage workdir
if [[ -n $HD_DATA ]]; then
  hd_check_storage data
fi
hd_check_mount_root
hd_check_env

if ((HD_DRY_RUN)); then
  hd_describe_command
  hd_format "${HD_DESCRIBE[@]}"
  hd_note "if the state is PREEMPTED, TERMINATED, STOPPED or SUSPENDED:"
  hd_delete_tpu
  hd_note "if the TPU VM was deleted or does not exist:"
  hd_create_tpu
  hd_setup
  hd_note "in every case:"
  hd_train
  exit 0
fi

state=$(hd_tpu_state)
case $state in
  READY)
    echo "TPU VM $HD_NAME is READY: restarting training only" >&2
    ;;
  PREEMPTED | TERMINATED | STOPPED | SUSPENDED)
    echo "TPU VM $HD_NAME is $state: re-creating it" >&2
    hd_delete_tpu
    hd_create_tpu
    hd_setup
    ;;
  '')
    echo "TPU VM $HD_NAME does not exist: creating it" >&2
    hd_create_tpu
    hd_setup
    ;;
  *)
    hd_die "TPU VM $HD_NAME is $state; rerun when it is READY or PREEMPTED"
    ;;
esac
hd_train
