# shellcheck shell=bash
# Shared code of the launch scripts (sourced, never run): option parsing and checking, printing or
# running gcloud commands, and the commands themselves (create, set up, prepare, train, delete), so
# that resume.sh runs exactly what create.sh, setup.sh and train.sh run. See launch/README.md.
#
# Storage: the trainer writes metrics.jsonl, config.json and prepared data with local file I/O, so
# the bucket of a gs://BUCKET/PATH given to --workdir or --data is mounted with gcsfuse on the
# workers that use it at $HD_MOUNT_ROOT/BUCKET (--mount-root, default /mnt/gcs), and the trainer
# gets $HD_MOUNT_ROOT/BUCKET/PATH.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "error: the launch scripts need bash >= 4.4, this is bash ${BASH_VERSION}" >&2
  exit 2
fi

# Paths on every TPU VM worker. Single-quoted on purpose: $HOME is expanded by the remote shell.
# shellcheck disable=SC2016
readonly HD_REMOTE_SRC='$HOME/hybriddiff' HD_REMOTE_VENV='$HOME/hybriddiff-venv' \
  HD_REMOTE_LOGS='$HOME/hybriddiff-logs'
readonly HD_REMOTE_TARBALL='hybriddiff-src.tar.gz'
readonly HD_METADATA='http://metadata.google.internal/computeMetadata/v1/instance/attributes'
# Cloud Storage FUSE from Google's apt repository, as its installation guide does
# (cloud.google.com/storage/docs/cloud-storage-fuse/install).
readonly HD_APT_KEY_URL='https://packages.cloud.google.com/apt/doc/apt-key.gpg' \
  HD_APT_KEYRING='/usr/share/keyrings/cloud.google.asc' \
  HD_APT_SOURCE='/etc/apt/sources.list.d/gcsfuse.list'
# Mount flags: --implicit-dirs shows directories that exist only as object-name prefixes (written by
# gcloud storage or Orbax); --rename-dir-limit lets Orbax commit a checkpoint by renaming its
# temporary directory on a bucket without hierarchical namespace (copy and delete, not atomic).
readonly HD_GCSFUSE_FLAGS='--implicit-dirs --rename-dir-limit=200000'

# Option values, filled by hd_parse (flags are 0/1); read by the scripts that source this file.
# shellcheck disable=SC2034
{
  HD_NAME='' HD_ZONE='' HD_PROJECT='' HD_ACCELERATOR='' HD_VERSION='' HD_SPOT=0 HD_PREEMPTIBLE=0
  HD_REPO='' HD_REF='main' HD_TARBALL='' HD_PYTHON='3.12' HD_CONFIG='' HD_DATA='' HD_WORKDIR=''
  HD_MOUNT_ROOT='/mnt/gcs' HD_DRY_RUN=0
  HD_ENV=()
  HD_EXTRA=()
  HD_LOCATION=()
  HD_DESCRIBE=()
}

hd_die() {
  echo "error: $*" >&2
  exit 2
}

# Help line of one option ("--opt=VALUE  text").
hd_option_help() {
  case $1 in
    name) echo "--name=NAME          TPU VM name (lowercase letters, digits, hyphens)" ;;
    zone) echo "--zone=ZONE          zone of the TPU VM, e.g. us-central2-b" ;;
    project) echo "--project=PROJECT    Google Cloud project (default: gcloud's configured one)" ;;
    accelerator) echo "--accelerator=TYPE   slice type: v4-8, v4-32, v5p-8, v5p-32, v6e-8, v6e-32, ..." ;;
    version) echo "--version=RUNTIME    TPU software version (default from the accelerator:" \
      "v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5, v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e)" ;;
    spot) echo "--spot               create a Spot TPU VM (cheaper; may be preempted at any time)" ;;
    preemptible) echo "--preemptible        create a preemptible TPU VM (legacy; at most 24 h)" ;;
    repo) echo "--repo=URL           git URL to install hybriddiff from (or --tarball)" ;;
    ref) echo "--ref=REF            branch, tag or commit of --repo (default: main)" ;;
    tarball) echo "--tarball=FILE       source tarball to copy to every worker instead of --repo," \
      "made with: git archive --format=tar.gz -o FILE HEAD" ;;
    python) echo "--python=VERSION     Python of the virtual environment, >= 3.11 (default: 3.12)" ;;
    config) echo "--config=FILE        experiment config relative to the repository, e.g. configs/owt_gamma_flat.py" ;;
    data) echo "--data=gs://...      prepared data in Cloud Storage (written by prepare.sh), mounted with" \
      "gcsfuse; or an absolute path on the workers" ;;
    workdir) echo "--workdir=gs://...   run directory in Cloud Storage (checkpoints, metrics), mounted with" \
      "gcsfuse on every worker; or an absolute path on the workers; keep it to resume" ;;
    mount-root) echo "--mount-root=DIR     where the workers mount a bucket: DIR/BUCKET (default: /mnt/gcs)" ;;
    env) echo "--env=KEY=VALUE      environment variable for the trainer on every host (repeatable)" ;;
    --) echo "-- ARGS...           further arguments of the hybriddiff command, e.g. --config.train.batch_size=256" ;;
    dry-run) echo "--dry-run            print the gcloud commands, one per line, and run nothing" ;;
    help) echo "--help               show this help" ;;
    *) hd_die "internal: no help for option '$1'" ;;
  esac
}

# Prints the help of the calling script: hd_usage SPEC SUMMARY EXAMPLES.
hd_usage() {
  local spec=$1 summary=$2 examples=$3 option
  printf 'Usage: launch/%s [OPTIONS]\n\n%s\n\nOptions:\n' "$(basename "$0")" "$summary"
  for option in $spec; do
    printf '  %s\n' "$(hd_option_help "${option%=}")"
  done
  printf '\nExamples:\n%s\n' "$examples"
}

# Parses "$@" against SPEC, a space-separated list of option names ("zone=" takes a value, "spot" is
# a flag, "--" accepts trailing arguments). Values go to HD_<NAME>; --help prints HELP and exits 0.
# Both --opt=VALUE and --opt VALUE are accepted.
hd_parse() {
  local spec=" $1 " help=$2 arg option value given
  shift 2
  while (($# > 0)); do
    arg=$1
    shift
    given=0
    case $arg in
      --)
        [[ $spec == *" -- "* ]] || hd_die "$(basename "$0") takes no arguments after '--'"
        for arg in "$@"; do
          case $arg in
            --dry-run | --help) hd_die "$arg must come before '--' (what follows '--' goes to hybriddiff)" ;;
          esac
        done
        HD_EXTRA=("$@")
        return 0
        ;;
      --*=*) option=${arg%%=*} value=${arg#*=} given=1 ;;
      --*) option=$arg value='' ;;
      -h) option=--help value='' ;;
      *) hd_die "unexpected argument '$arg'; options look like --zone=ZONE (see --help)" ;;
    esac
    option=${option#--}
    if [[ $spec == *" $option= "* ]]; then
      if ((!given)); then
        if (($# == 0)) || [[ $1 == --* ]]; then
          hd_die "option --$option needs a value (--$option=VALUE)"
        fi
        value=$1
        shift
      fi
      [[ -n $value ]] || hd_die "option --$option needs a non-empty value"
      if [[ $option == env ]]; then
        HD_ENV+=("$value")
      else
        option=${option//-/_}
        printf -v "HD_${option^^}" '%s' "$value"
      fi
    elif [[ $option == help ]]; then
      printf '%s\n' "$help"
      exit 0
    elif [[ $spec == *" $option "* ]]; then
      ((!given)) || hd_die "option --$option takes no value, got --$option=$value"
      option=${option//-/_}
      printf -v "HD_${option^^}" '%s' 1
    else
      hd_die "unknown option --$option for $(basename "$0") (see --help)"
    fi
  done
}

# Fails unless every named option (e.g. "zone") was given.
hd_require() {
  local option variable
  for option in "$@"; do
    variable=HD_${option^^}
    [[ -n ${!variable} ]] || hd_die "missing required option --$option (see --help)"
  done
}

# hd_match OPTION VALUE REGEX DESCRIPTION: fails with a message naming the option unless VALUE matches.
hd_match() {
  [[ $2 =~ $3 ]] || hd_die "--$1=$2 is not valid: $4"
}

# Checks the options common to all scripts and builds HD_LOCATION (--zone, --project).
hd_check_location() {
  hd_require name zone
  hd_match name "$HD_NAME" '^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$' \
    "use lowercase letters, digits and hyphens, starting with a letter"
  hd_match zone "$HD_ZONE" '^[a-z]+-[a-z]+[0-9]+-[a-z]$' "expected a zone such as us-central2-b"
  HD_LOCATION=("--zone=$HD_ZONE")
  if [[ -n $HD_PROJECT ]]; then
    hd_match project "$HD_PROJECT" '^([a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$' \
      "expected a project id such as my-project-123"
    HD_LOCATION+=("--project=$HD_PROJECT")
  fi
}

# Checks --accelerator, --version, --spot/--preemptible; fills in the default runtime version.
hd_check_create() {
  hd_require accelerator
  hd_match accelerator "$HD_ACCELERATOR" '^v[0-9][a-z0-9]*-[0-9]+$' "expected a type such as v4-32"
  if [[ -z $HD_VERSION ]]; then
    case ${HD_ACCELERATOR%-*} in
      v4) HD_VERSION=tpu-ubuntu2204-base ;;
      v5p) HD_VERSION=v2-alpha-tpuv5 ;;
      v5litepod) HD_VERSION=v2-alpha-tpuv5-lite ;;
      v6e) HD_VERSION=v2-alpha-tpuv6e ;;
      *) hd_die "--accelerator=$HD_ACCELERATOR has no default runtime; pass --version=RUNTIME" ;;
    esac
  fi
  hd_match version "$HD_VERSION" '^[A-Za-z0-9._-]+$' "expected a runtime such as v2-alpha-tpuv6e"
  if ((HD_SPOT && HD_PREEMPTIBLE)); then
    hd_die "--spot and --preemptible are mutually exclusive"
  fi
}

# Checks the source options of the setup (exactly one of --repo and --tarball).
hd_check_source() {
  if [[ -n $HD_REPO && -n $HD_TARBALL ]]; then
    hd_die "--repo and --tarball are mutually exclusive"
  fi
  if [[ -z $HD_REPO && -z $HD_TARBALL ]]; then
    hd_die "missing required option --repo=URL or --tarball=FILE (see --help)"
  fi
  if [[ -n $HD_REPO ]]; then
    hd_match repo "$HD_REPO" '^(https://|ssh://|git@)[A-Za-z0-9@:/._~+-]+$' \
      "expected a git URL such as https://github.com/OWNER/hybriddiff.git"
    hd_match ref "$HD_REF" '^[A-Za-z0-9._][A-Za-z0-9._/-]*$' "expected a branch, tag or commit"
  else
    hd_match tarball "$HD_TARBALL" '^[A-Za-z0-9._/~+-]+\.(tar\.gz|tgz)$' "expected a FILE.tar.gz"
    if ((!HD_DRY_RUN)) && [[ ! -f $HD_TARBALL ]]; then
      hd_die "--tarball=$HD_TARBALL: no such file"
    fi
  fi
  hd_match python "$HD_PYTHON" '^3\.(1[1-9]|[2-9][0-9])$' "expected a Python version >= 3.11, e.g. 3.12"
}

hd_check_config() {
  hd_require config
  hd_match config "$HD_CONFIG" '^[A-Za-z0-9_][A-Za-z0-9_./-]*\.py(:[A-Za-z0-9_,=.-]+)?$' \
    "expected a config file relative to the repository, e.g. configs/lm1b_gamma_flat.py"
  [[ $HD_CONFIG != *..* ]] || hd_die "--config=$HD_CONFIG must not contain '..'"
}

# hd_check_storage OPTION: a gs:// URL (mounted on the workers) or an absolute path on the workers;
# drops a trailing /. Anything else, e.g. s3://... or a relative path, is an error.
hd_check_storage() {
  local variable=HD_${1^^}
  local value=${!variable}
  [[ $value =~ ^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/[A-Za-z0-9._=-]+)*/?$ ||
    $value =~ ^(/[A-Za-z0-9._=+-]+)+/?$ ]] ||
    hd_die "--$1=$value is not valid: expected a Cloud Storage URL gs://BUCKET/PATH (mounted with" \
      "gcsfuse on the workers) or an absolute path on the workers"
  [[ /$value/ != */../* && /$value/ != */./* ]] ||
    hd_die "--$1=$value must not contain '.' or '..' path components"
  printf -v "$variable" '%s' "${value%/}"
}

# Checks --mount-root: an absolute directory on the workers (no component starts with a dot).
hd_check_mount_root() {
  hd_match mount-root "$HD_MOUNT_ROOT" '^(/[A-Za-z0-9_][A-Za-z0-9._-]*)+$' \
    "expected an absolute directory such as /mnt/gcs"
}

hd_check_env() {
  local pair
  for pair in "${HD_ENV[@]}"; do
    [[ $pair =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || hd_die "--env=$pair is not valid: expected KEY=VALUE"
  done
}

# Shell-quotes one word for printing: bare when safe, else in single quotes; in --flag=VALUE only
# VALUE is quoted, so printed commands read like the gcloud documentation.
hd_quote() {
  local word=$1 squote="'"
  if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$word"
  elif [[ $word =~ ^(--[A-Za-z0-9-]+=)(.+)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    hd_quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${word//$squote/$squote\\$squote$squote}"
  fi
}

# Prints a command as one line that a shell parses back into the same words.
hd_format() {
  local words=() word
  for word in "$@"; do
    words+=("$(hd_quote "$word")")
  done
  printf '%s\n' "${words[*]}"
}

# Prints the command (--dry-run) or echoes it to stderr and runs it.
hd_run() {
  if ((HD_DRY_RUN)); then
    hd_format "$@"
    return 0
  fi
  command -v "$1" >/dev/null || hd_die "$1 not found on PATH: install the Google Cloud CLI (or use --dry-run)"
  printf '+ %s\n' "$(hd_format "$@")" >&2
  "$@"
}

# Comment lines in the --dry-run output (explaining conditional steps); silent otherwise.
hd_note() {
  if ((HD_DRY_RUN)); then
    printf '# %s\n' "$*"
  fi
}

# ------------------------------------------------------------------------------------------------
# The commands.

hd_create_tpu() {
  local args=(create "$HD_NAME" "${HD_LOCATION[@]}" "--accelerator-type=$HD_ACCELERATOR"
    "--version=$HD_VERSION")
  if ((HD_SPOT)); then
    args+=(--spot)
  elif ((HD_PREEMPTIBLE)); then
    args+=(--preemptible)
  fi
  hd_run gcloud compute tpus tpu-vm "${args[@]}"
}

hd_delete_tpu() {
  hd_run gcloud compute tpus tpu-vm delete "$HD_NAME" "${HD_LOCATION[@]}" --quiet
}

# The command that prints the state of the TPU VM.
hd_describe_command() {
  HD_DESCRIBE=(gcloud compute tpus tpu-vm describe "$HD_NAME" "${HD_LOCATION[@]}"
    '--format=value(state)')
}

# Prints the state of the TPU VM (READY, PREEMPTED, ...) or nothing if it does not exist.
hd_tpu_state() {
  local output status=0
  hd_describe_command
  command -v gcloud >/dev/null || hd_die "gcloud not found on PATH: install the Google Cloud CLI (or use --dry-run)"
  printf '+ %s\n' "$(hd_format "${HD_DESCRIBE[@]}")" >&2
  output=$("${HD_DESCRIBE[@]}" 2>&1) || status=$?
  if ((status == 0)); then
    printf '%s\n' "$output"
  elif [[ $output != *NOT_FOUND* && $output != *"not found"* ]]; then
    hd_die "could not describe TPU VM $HD_NAME: $output"
  fi
}

# hd_ssh WORKER COMMAND: runs a shell command on one worker (0) or on every worker (all).
hd_ssh() {
  hd_run gcloud compute tpus tpu-vm ssh "$HD_NAME" "${HD_LOCATION[@]}" "--worker=$1" "--command=$2"
}

# The remote command that installs gcsfuse (unless present), hybriddiff and the TPU JAX wheel in a
# virtual environment.
hd_setup_command() {
  local fetch venv=$HD_REMOTE_VENV src=$HD_REMOTE_SRC apt='sudo apt-get -o DPkg::Lock::Timeout=300'
  if [[ -n $HD_TARBALL ]]; then
    fetch="rm -rf \"$src\"; mkdir -p \"$src\"; tar -xzf \"\$HOME/$HD_REMOTE_TARBALL\" -C \"$src\""
  else
    fetch="git init -q \"$src\"; git -C \"$src\" fetch -q --depth=1 $HD_REPO $HD_REF;"
    fetch+=" git -C \"$src\" checkout -q --force FETCH_HEAD"
  fi
  printf '%s' "set -euo pipefail; if ! command -v gcsfuse >/dev/null; then" \
    " curl -fsSL $HD_APT_KEY_URL | sudo tee $HD_APT_KEYRING >/dev/null;" \
    " echo \"deb [signed-by=$HD_APT_KEYRING] https://packages.cloud.google.com/apt" \
    " gcsfuse-\$(lsb_release -cs) main\" | sudo tee $HD_APT_SOURCE >/dev/null;" \
    " $apt update -q; $apt install -y -q gcsfuse; fi;" \
    " export PATH=\"\$HOME/.local/bin:\$PATH\";" \
    " command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh;" \
    " uv venv --allow-existing --seed --python $HD_PYTHON \"$venv\"; $fetch;" \
    " \"$venv/bin/python\" -m pip install -U \"jax[tpu]\"; \"$venv/bin/python\" -m pip install -e \"$src\""
}

hd_setup() {
  if [[ -n $HD_TARBALL ]]; then
    hd_run gcloud compute tpus tpu-vm scp "$HD_TARBALL" "$HD_NAME:$HD_REMOTE_TARBALL" \
      "${HD_LOCATION[@]}" --worker=all
  fi
  hd_ssh all "$(hd_setup_command)"
}

# hd_worker_path VALUE: where a worker sees --workdir or --data: gs://BUCKET/PATH is
# $HD_MOUNT_ROOT/BUCKET/PATH; a path is itself.
hd_worker_path() {
  if [[ $1 == gs://* ]]; then
    printf '%s/%s' "$HD_MOUNT_ROOT" "${1#gs://}"
  else
    printf '%s' "$1"
  fi
}

# hd_mount_command VALUE...: the remote command that mounts the bucket of every gs:// VALUE (each
# bucket once) at $HD_MOUNT_ROOT/BUCKET, owned by the ssh user; a bucket already mounted there is
# left alone, so running it again (another run, a restart) is harmless.
hd_mount_command() {
  local value bucket mnt seen=' '
  for value in "$@"; do
    [[ $value == gs://* ]] || continue
    bucket=${value#gs://}
    bucket=${bucket%%/*}
    [[ $seen != *" $bucket "* ]] || continue
    seen+="$bucket "
    mnt=$HD_MOUNT_ROOT/$bucket
    printf '%s' " if ! mountpoint -q $mnt; then sudo mkdir -p $mnt;" \
      " sudo chown \"\$(id -u):\$(id -g)\" $mnt; gcsfuse $HD_GCSFUSE_FLAGS $bucket $mnt; fi;"
  done
}

# Arguments after '--', each quoted for the remote shell, as one string (with a leading space).
hd_extra_words() {
  local word
  for word in "${HD_EXTRA[@]}"; do
    printf ' %s' "$(hd_quote "$word")"
  done
}

# Prepares --data on worker 0, writing through the mount.
hd_prepare() {
  hd_ssh 0 "$(printf '%s' "set -euo pipefail;$(hd_mount_command "$HD_DATA") cd \"$HD_REMOTE_SRC\";" \
    " \"$HD_REMOTE_VENV/bin/hybriddiff\" prepare --config=$HD_CONFIG" \
    " --output=$(hd_worker_path "$HD_DATA")$(hd_extra_words)")"
}

# The remote command that starts training on one host, detached, logging to a file per host.
hd_train_command() {
  local pair logs=$HD_REMOTE_LOGS
  local train="\"$HD_REMOTE_VENV/bin/hybriddiff\" train --config=$HD_CONFIG"
  train+=" --workdir=$(hd_worker_path "$HD_WORKDIR")"
  printf '%s' "set -euo pipefail; md=$HD_METADATA;" \
    " id=\$(curl -sf -H Metadata-Flavor:Google \"\$md/agent-worker-number\" || echo 0);" \
    " hosts=\$(curl -sf -H Metadata-Flavor:Google \"\$md/worker-network-endpoints\"" \
    " | tr , \"\\n\" | sed \"s/.*://\" | paste -sd, - || true);" \
    " if [ -n \"\$hosts\" ]; then export TPU_WORKER_ID=\"\$id\" TPU_WORKER_HOSTNAMES=\"\$hosts\"; fi;"
  for pair in "${HD_ENV[@]}"; do
    printf ' export %s=%s;' "${pair%%=*}" "$(hd_quote "${pair#*=}")"
  done
  printf '%s' " logs=\"$logs\"; mkdir -p \"\$logs\";" \
    " if [ -s \"\$logs/train.pid\" ] && kill -0 \"\$(cat \"\$logs/train.pid\")\" 2>/dev/null; then" \
    " echo \"worker \$id: training already runs (pid \$(cat \"\$logs/train.pid\"))\" >&2; exit 1; fi;"
  hd_mount_command "$HD_WORKDIR" "$HD_DATA"
  if [[ -n $HD_DATA ]]; then
    train+=" --config.data.prepared_dir=$(hd_worker_path "$HD_DATA")"
  fi
  train+=$(hd_extra_words)
  printf '%s' " cd \"$HD_REMOTE_SRC\";" \
    " setsid nohup $train > \"\$logs/train-worker\$id.log\" 2>&1 < /dev/null &" \
    " echo \$! > \"\$logs/train.pid\";" \
    " echo \"worker \$id (\$(hostname)): pid \$!, log \$logs/train-worker\$id.log\""
}

hd_train() {
  hd_ssh all "$(hd_train_command)"
}
