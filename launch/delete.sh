#!/usr/bin/env bash
# Deletes a TPU VM (all hosts of the slice). The run directory in Cloud Storage is kept.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

spec="name= zone= project= dry-run help"
help=$(hd_usage "$spec" \
  "Deletes a Cloud TPU VM without asking. Checkpoints and metrics in gs:// are kept; the gcsfuse
mounts end with the VM. Stop training first (SIGTERM saves a checkpoint): a file the trainer has
not closed yet never reaches the bucket." \
  "  launch/delete.sh --name=hd-v4 --zone=us-central2-b")
hd_parse "$spec" "$help" "$@"
hd_check_location
hd_delete_tpu
