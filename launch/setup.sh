#!/usr/bin/env bash
# Installs gcsfuse, and hybriddiff with the TPU JAX wheel, on every worker of a TPU VM.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

spec="name= zone= project= repo= ref= tarball= python= dry-run help"
help=$(hd_usage "$spec" \
  "Installs on every worker (--worker=all): Cloud Storage FUSE (gcsfuse, from Google's apt
repository, unless installed; train.sh and prepare.sh mount buckets with it), a Python virtual
environment made with uv (\$HOME/hybriddiff-venv; TPU VM images ship Python 3.10, hybriddiff needs
>= 3.11), the TPU JAX wheel (pip install -U \"jax[tpu]\") and the package (pip install -e) from a git URL or a tarball
copied with scp. Safe to rerun: it updates the checkout and the environment." \
  "  launch/setup.sh --name=hd-v4 --zone=us-central2-b --repo=https://github.com/OWNER/hybriddiff.git --ref=main
  git archive --format=tar.gz -o hybriddiff.tar.gz HEAD
  launch/setup.sh --name=hd-v4 --zone=us-central2-b --tarball=hybriddiff.tar.gz")
hd_parse "$spec" "$help" "$@"
hd_check_location
hd_check_source
hd_setup
