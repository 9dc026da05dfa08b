#!/usr/bin/env bash
# Tokenizes a data set once on worker 0 into Cloud Storage, through a gcsfuse mount of the bucket.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

spec="name= zone= project= config= data= mount-root= dry-run help --"
help=$(hd_usage "$spec" \
  "Mounts the bucket of --data=gs://BUCKET/PATH with gcsfuse on worker 0 at MOUNT_ROOT/BUCKET
(unless mounted) and runs 'hybriddiff prepare --config=FILE --output=MOUNT_ROOT/BUCKET/PATH' there
(the prepared store is written with local file I/O). Arguments after '--' go to 'hybriddiff
prepare' (e.g. --config.data.path=...). Preparation is resumable: rerun the script after a lost
connection." \
  "  launch/prepare.sh --name=hd-v4 --zone=us-central2-b --config=configs/owt_gamma_flat.py --data=gs://my-bucket/data/owt")
hd_parse "$spec" "$help" "$@"
hd_check_location
hd_check_config
hd_require data
hd_check_storage data
hd_check_mount_root
hd_prepare
