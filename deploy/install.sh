#!/usr/bin/env bash
# Installs pacs-ai as a systemd service. Run from a checkout (or unpacked release) as root:
#
#   sudo deploy/install.sh                 install or upgrade (idempotent)
#   sudo deploy/install.sh --uninstall     remove program and unit; keep spool, config, user
#
# What it does, in order:
#   1. system user and group `pacs-ai` (no login, home = the spool);
#   2. <prefix>/venv: a Python virtual environment with torch and this checkout (pip install);
#   3. <prefix>/models/pacs-ai-pneumonia.pt: the shipped model (or --model FILE, which later
#      plain upgrades keep);
#   4. /etc/pacs-ai/pacs-ai.toml from deploy/pacs-ai.toml, ONLY if absent (never overwritten;
#      the new example always lands in <prefix>/share/pacs-ai.toml.example to compare with);
#   5. /var/lib/pacs-ai, the spool (kept by --uninstall);
#   6. /etc/systemd/system/pacs-ai.service, enabled; restarted only if it was already running;
#   7. /usr/local/bin/pacs-ai, a link to the program, so `pacs-ai status` works in a shell;
#   8. a check that the service user can run the program (runuser), with what to fix if not.
#
# Without systemd running (no /run/systemd/system: a container, another init system), or with
# --no-systemd, the unit is installed but no systemctl is run; it says how to start by hand.
# --destdir DIR puts every path under DIR and runs no useradd/chown/systemctl (it prints them):
# for packaging and for the test suite (tests/test_deploy.py).
set -euo pipefail

PREFIX=/opt/pacs-ai
DESTDIR=""
PYTHON=""
VENV_FROM=""
MODEL_SOURCE=""
ACTION=install
ENABLE=1
SYSTEMD=auto
CHECK_AS=""

SERVICE_USER=pacs-ai
CONFIG_DIR=/etc/pacs-ai
STATE_DIR=/var/lib/pacs-ai
UNIT_DIR=/etc/systemd/system
UNIT_NAME=pacs-ai.service
BIN_LINK=/usr/local/bin/pacs-ai
MODEL_FILENAME=pacs-ai-pneumonia.pt
TORCH_REQUIREMENT="torch==2.13.0"
# The CPU-only PyTorch build (~200 MB) instead of PyPI's default with CUDA libraries (GBs).
TORCH_INDEX=https://download.pytorch.org/whl/cpu
MARKER=.pacs-ai-install  # in <prefix>: proof that --uninstall may delete the folder

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
usage: deploy/install.sh [options]

  --prefix DIR       program folder (default $PREFIX)
  --python PYTHON    Python 3.11+ for the virtual environment (default python3.11, else python3)
  --venv-from DIR    use this existing virtual environment (with pacs-ai installed) instead of
                     creating one: <prefix>/venv becomes a link to it and pip is not run
  --torch-index URL  extra package index for PyTorch (default $TORCH_INDEX,
                     the CPU-only build); "none": only pip's configured indexes (PIP_INDEX_URL ...)
  --model FILE       install this model file instead of deploy/models/$MODEL_FILENAME;
                     later upgrades without --model keep it
  --no-enable        install the unit but do not enable it
  --no-systemd       install the unit file but run no systemctl (the default when systemd is
                     not running here); prints how to start the service by hand
  --check-as USER    with --destdir: check that USER can run the installed program (a scratch
                     root has no $SERVICE_USER user; a real install checks $SERVICE_USER)
  --destdir DIR      install under DIR as a scratch root; run no useradd, chown or systemctl
                     (print them instead)
  --uninstall        stop and remove the program, the unit and the link; keep the config
                     ($CONFIG_DIR), the spool ($STATE_DIR) and the user
  -h, --help         this text
EOF
}

die() { echo "install.sh: error: $*" >&2; exit 1; }
note() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=${2:?--prefix needs a folder}; shift 2 ;;
    --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
    --venv-from) VENV_FROM=${2:?--venv-from needs a folder}; shift 2 ;;
    --model) MODEL_SOURCE=${2:?--model needs a file}; shift 2 ;;
    --torch-index) TORCH_INDEX=${2:?--torch-index needs a URL or none}; shift 2 ;;
    --no-enable) ENABLE=0; shift ;;
    --no-systemd) SYSTEMD=no; shift ;;
    --check-as) CHECK_AS=${2:?--check-as needs a user}; shift 2 ;;
    --destdir) DESTDIR=${2:?--destdir needs a folder}; shift 2 ;;
    --uninstall) ACTION=uninstall; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done

case "$PREFIX" in
  /?*) PREFIX=${PREFIX%/} ;;
  *) die "--prefix must be an absolute path other than /, got '$PREFIX'" ;;
esac
if [ -n "$DESTDIR" ]; then
  mkdir -p "$DESTDIR"
  DESTDIR=$(cd "$DESTDIR" && pwd)
  [ "$DESTDIR" != / ] || die "--destdir / is a real install; leave --destdir out instead"
elif [ "$(id -u)" != 0 ]; then
  die "run as root (sudo deploy/install.sh), or use --destdir DIR for a scratch install"
fi

# Commands that change the real system: printed, not run, under --destdir.
system() {
  if [ -n "$DESTDIR" ]; then
    echo "would run:$(printf " %q" "$@")"
  else
    "$@"
  fi
}

# systemd is running when /run/systemd/system exists (sd_booted(3)); a scratch root plans for
# it (the systemctl commands are printed).
if [ "$SYSTEMD" = auto ]; then
  if [ -n "$DESTDIR" ] || { [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }; then
    SYSTEMD=yes
  else
    SYSTEMD=no
    note "systemd is not running on this machine (no /run/systemd/system): the unit file is" \
      "installed for later, but nothing is enabled or started"
  fi
fi

unit_is_active() {
  [ -z "$DESTDIR" ] && [ "$SYSTEMD" = yes ] && systemctl is-active --quiet "$UNIT_NAME"
}

# The command the unit runs, for starting the service by hand as its user.
by_hand() {
  echo "runuser -u $SERVICE_USER -- $PREFIX/venv/bin/pacs-ai serve --config $CONFIG_DIR/pacs-ai.toml"
}

install_program() {
  local venv=$DESTDIR$PREFIX/venv
  mkdir -p "$DESTDIR$PREFIX"
  if [ -n "$VENV_FROM" ]; then
    local source_venv
    source_venv=$(cd "$VENV_FROM" 2>/dev/null && pwd) || die "--venv-from: no folder '$VENV_FROM'"
    [ -x "$source_venv/bin/pacs-ai" ] \
      || die "--venv-from $source_venv has no bin/pacs-ai; pip install pacs-ai into it first"
    if [ -e "$venv" ] && [ ! -L "$venv" ]; then
      die "$venv is a real virtual environment; remove it first to use --venv-from"
    fi
    ln -sfn "$source_venv" "$venv"
    note "program: $PREFIX/venv -> $source_venv (pip not run)"
  else
    if [ -L "$venv" ]; then
      rm "$venv"  # a --venv-from link from an earlier install; build a real one now
    fi
    if [ ! -x "$venv/bin/python" ]; then
      local python=$PYTHON
      if [ -z "$python" ]; then
        python=python3.11
        command -v "$python" >/dev/null 2>&1 || python=python3
      fi
      command -v "$python" >/dev/null 2>&1 || die "no Python interpreter '$python'; use --python"
      "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$python is older than Python 3.11; give a newer one with --python"
      note "creating virtual environment $PREFIX/venv with $python"
      "$python" -m venv "$venv"
    fi
    local index_args=()
    [ "$TORCH_INDEX" = none ] || index_args=(--extra-index-url "$TORCH_INDEX")
    note "installing $TORCH_REQUIREMENT and pacs-ai from $REPO with pip"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade "${index_args[@]}" \
      "$TORCH_REQUIREMENT" "$REPO" || die "pip install failed (network? see the messages above)"
  fi
  "$venv/bin/pacs-ai" --version >/dev/null \
    || die "$PREFIX/venv/bin/pacs-ai does not run; see the error above"
  echo "pacs-ai installer; remove this folder with deploy/install.sh --uninstall" \
    > "$DESTDIR$PREFIX/$MARKER"
}

# A model installed with --model is the site's choice (a promoted candidate, a model kept back):
# a later plain upgrade keeps it instead of putting the shipped one in its place. This file, next
# to it, holds its SHA-256; --model with the checkout's own shipped file removes it.
SITE_MODEL_MARK=.installed-with-model

sha256_of() { sha256sum < "$1" | cut -d' ' -f1; }

install_model() {
  local shipped=$REPO/deploy/models/$MODEL_FILENAME
  local source=${MODEL_SOURCE:-$shipped}
  local target=$DESTDIR$PREFIX/models/$MODEL_FILENAME
  local mark=$DESTDIR$PREFIX/models/$SITE_MODEL_MARK
  mkdir -p "$DESTDIR$PREFIX/models"
  if [ -z "$MODEL_SOURCE" ] && [ -f "$target" ] && [ -f "$mark" ] \
      && [ "$(sha256_of "$target")" = "$(cat "$mark")" ]; then
    note "model: keeping $PREFIX/models/$MODEL_FILENAME, the site's choice (installed with --model)"
    if [ -f "$shipped" ] && [ "$(sha256_of "$shipped")" != "$(cat "$mark")" ]; then
      note "  this checkout ships another: try it in shadow, then install it with --model $shipped"
    fi
  elif [ -f "$source" ]; then
    install -m 0644 "$source" "$target"
    note "model: $PREFIX/models/$MODEL_FILENAME (from $source)"
    if [ -n "$MODEL_SOURCE" ] && ! [ "$source" -ef "$shipped" ]; then
      sha256_of "$target" > "$mark"
    else
      rm -f "$mark"
    fi
  elif [ -n "$MODEL_SOURCE" ]; then
    die "--model: no file '$MODEL_SOURCE'"
  elif [ -f "$target" ]; then
    note "model: keeping the installed $PREFIX/models/$MODEL_FILENAME (this checkout ships none)"
  else
    MODEL_MISSING=1
    echo "install.sh: WARNING: this checkout has no trained model ($source)." >&2
    echo "  The service will not start until $PREFIX/models/$MODEL_FILENAME exists." >&2
    echo "  Copy a model file there (or rerun with --model FILE), check it with" >&2
    echo "  'pacs-ai model --model $PREFIX/models/$MODEL_FILENAME', then start the service." >&2
  fi
}

# Prints the example config with [model] path set to the installed model (the example's own
# path, commented or not, is replaced; a missing [model] table is added).
config_for_this_install() {
  local model_path=$PREFIX/models/$MODEL_FILENAME
  awk -v model_line="path = \"$model_path\"" '
    /^[[:space:]]*\[/ {
      if (in_model && !done) { print model_line; done = 1 }
      in_model = ($0 ~ /^[[:space:]]*\[model\][[:space:]]*(#.*)?$/)
    }
    in_model && !done && /^[[:space:]]*#?[[:space:]]*path[[:space:]]*=/ {
      print model_line; done = 1; next
    }
    { print }
    END {
      if (in_model && !done) { print model_line; done = 1 }
      if (!done) { print ""; print "[model]"; print model_line }
    }
  ' "$REPO/deploy/pacs-ai.toml"
}

# Whether a config's [listener] lets no caller in: allowed_calling_ae_titles absent or [] and
# accept_any_calling_ae not true. Such a service rejects every association (a config written
# before pacs-ai asked for the choice was open to any caller instead), so say it here too.
config_names_no_caller() {
  awk '
    /^[[:space:]]*\[/ { in_listener = ($0 ~ /^[[:space:]]*\[listener\][[:space:]]*(#.*)?$/) }
    in_listener && /^[[:space:]]*allowed_calling_ae_titles[[:space:]]*=/ {
      value = $0
      sub(/^[^=]*=[[:space:]]*/, "", value)
      sub(/#.*$/, "", value)
      gsub(/[[:space:]]/, "", value)
      if (value != "[]") named = 1
    }
    in_listener && /^[[:space:]]*accept_any_calling_ae[[:space:]]*=[[:space:]]*true/ { any = 1 }
    END { exit (named || any) ? 1 : 0 }
  ' "$1"
}

warn_if_no_caller_named() {
  config_names_no_caller "$DESTDIR$CONFIG_DIR/pacs-ai.toml" || return 0
  echo "install.sh: WARNING: $CONFIG_DIR/pacs-ai.toml names no calling AE title ([listener]" \
    "allowed_calling_ae_titles is empty), so the service rejects every modality until you" \
    "list their AE titles there, or set accept_any_calling_ae = true to take any caller;" \
    "then restart it (deploy/README.md, \"The listener\")." >&2
}

install_config() {
  local example=$REPO/deploy/pacs-ai.toml
  local config=$DESTDIR$CONFIG_DIR/pacs-ai.toml
  [ -f "$example" ] || die "no example config $example in this checkout"
  mkdir -p "$DESTDIR$PREFIX/share"
  config_for_this_install > "$DESTDIR$PREFIX/share/pacs-ai.toml.example"
  mkdir -p "$DESTDIR$CONFIG_DIR"
  chmod 0750 "$DESTDIR$CONFIG_DIR"
  system chown "root:$SERVICE_USER" "$CONFIG_DIR"
  if [ -e "$config" ]; then
    note "config: keeping $CONFIG_DIR/pacs-ai.toml (new example: $PREFIX/share/pacs-ai.toml.example)"
  else
    config_for_this_install > "$config.new"
    chmod 0640 "$config.new"
    mv "$config.new" "$config"
    system chown "root:$SERVICE_USER" "$CONFIG_DIR/pacs-ai.toml"
    note "config: wrote $CONFIG_DIR/pacs-ai.toml; edit AE titles and destinations before starting"
  fi
  warn_if_no_caller_named
}

create_user_and_spool() {
  if [ -n "$DESTDIR" ] || ! id "$SERVICE_USER" >/dev/null 2>&1; then
    system useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
      --shell /usr/sbin/nologin --comment "pacs-ai DICOM listener" "$SERVICE_USER"
  fi
  mkdir -p "$DESTDIR$STATE_DIR"
  chmod 0750 "$DESTDIR$STATE_DIR"
  system chown "$SERVICE_USER:$SERVICE_USER" "$STATE_DIR"
}

install_unit_and_link() {
  mkdir -p "$DESTDIR$UNIT_DIR" "$DESTDIR$PREFIX/share/doc" "$DESTDIR$(dirname "$BIN_LINK")"
  # The unit names /opt/pacs-ai; another --prefix is substituted.
  sed "s|/opt/pacs-ai/|$PREFIX/|g" "$REPO/deploy/$UNIT_NAME" > "$DESTDIR$UNIT_DIR/$UNIT_NAME.new"
  chmod 0644 "$DESTDIR$UNIT_DIR/$UNIT_NAME.new"
  mv "$DESTDIR$UNIT_DIR/$UNIT_NAME.new" "$DESTDIR$UNIT_DIR/$UNIT_NAME"
  install -m 0644 "$REPO/deploy/README.md" "$DESTDIR$PREFIX/share/doc/README.md"
  ln -sfn "$PREFIX/venv/bin/pacs-ai" "$DESTDIR$BIN_LINK"
  if [ "$SYSTEMD" = no ]; then
    note "installed $UNIT_DIR/$UNIT_NAME, the program, the config and the spool; ran no systemctl"
    note "start the service by hand, as its user, from $STATE_DIR (it stops on SIGTERM):"
    note "  cd $STATE_DIR && $(by_hand)"
    note "or under your init system or supervisor with that command (the unit shows its settings)"
    return
  fi
  system systemctl daemon-reload
  if [ "$ENABLE" = 1 ]; then
    system systemctl enable "$UNIT_NAME"
  fi
  if unit_is_active; then
    system systemctl restart "$UNIT_NAME"
    note "service restarted with the new program"
  elif [ "${MODEL_MISSING:-0}" = 1 ]; then
    note "done; install a model (see the warning above), then: systemctl start pacs-ai"
  else
    note "done; edit $CONFIG_DIR/pacs-ai.toml, then: systemctl start pacs-ai"
  fi
}

# The service runs as $SERVICE_USER: a virtual environment it cannot read (made from a Python
# under /root or a home folder of mode 0700, or --venv-from such a place) would install fine and
# then fail at every start with a bare "Permission denied" in the journal.
check_service_user_can_run() {
  local program=$PREFIX/venv/bin/pacs-ai user=${CHECK_AS:-$SERVICE_USER}
  if [ -n "$DESTDIR" ] && [ -z "$CHECK_AS" ]; then
    system runuser -u "$SERVICE_USER" -- "$program" --version
    return
  fi
  command -v runuser >/dev/null 2>&1 \
    || { note "WARNING: no runuser here: not checked that $user can run $program"; return; }
  local output python
  if output=$(cd / && runuser -u "$user" -- "$DESTDIR$program" --version 2>&1); then
    note "checked: the service user $user can run $program"
    return
  fi
  python=$(readlink -f "$DESTDIR$PREFIX/venv/bin/python" 2>/dev/null || true)
  echo "install.sh: error: the service user $user cannot run $program:" >&2
  echo "  $output" >&2
  echo "  Every folder on the way to the virtual environment${python:+ and to the Python it" \
    "was made from ($python)} must be readable and searchable by $user; typically that Python" \
    "or --venv-from is under /root or a home folder (mode 0700)." >&2
  echo "  Fix: rerun install.sh with --python /usr/bin/python3.11 (a system Python; remove" \
    "$PREFIX/venv first), or make those folders searchable (chmod o+x), then run install.sh" \
    "again. The service would not start as it is." >&2
  exit 1
}

uninstall() {
  local prefix_dir=$DESTDIR$PREFIX
  if [ "$SYSTEMD" = no ]; then
    note "systemd not running: no systemctl run; stop the service by hand first if it runs"
    rm -f "$DESTDIR$UNIT_DIR/$UNIT_NAME"
  elif [ -e "$DESTDIR$UNIT_DIR/$UNIT_NAME" ]; then
    # SIGTERM: the service leaves unfinished jobs in the spool for a later install to resume.
    system systemctl disable --now "$UNIT_NAME"
    rm -f "$DESTDIR$UNIT_DIR/$UNIT_NAME"
    system systemctl daemon-reload
    note "removed $UNIT_DIR/$UNIT_NAME"
  fi
  if [ -L "$DESTDIR$BIN_LINK" ] && [ "$(readlink "$DESTDIR$BIN_LINK")" = "$PREFIX/venv/bin/pacs-ai" ]; then
    rm -f "$DESTDIR$BIN_LINK"
  fi
  if [ -d "$prefix_dir" ]; then
    # Only a folder this script made: a mistyped --prefix must never delete anything else.
    [ -f "$prefix_dir/$MARKER" ] \
      || die "$PREFIX was not installed by this script (no $MARKER); not removing it"
    rm -rf -- "$prefix_dir"
    note "removed $PREFIX"
  fi
  note "kept $CONFIG_DIR, $STATE_DIR and the user $SERVICE_USER (remove them by hand if wanted)"
}

if [ "$ACTION" = uninstall ]; then
  uninstall
else
  create_user_and_spool
  install_program
  install_model
  install_config
  check_service_user_can_run
  install_unit_and_link
fi
