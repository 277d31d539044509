#!/usr/bin/env bash
# Put this checkout's commit (HEAD) on every TPU worker and install it, with the TPU build of
# jax, into a venv there.
#
# Usage: launch/tpu/setup.sh [--dry-run]
#
# The commit travels as a git bundle over gcloud's scp, so private repositories and commits
# not pushed anywhere work; uncommitted changes do not travel (commit them first). Each worker
# gets ~/$REMOTE_DIR at exactly that commit (local edits there are discarded) and ~/$VENV with
# `pip install -e . "$JAX_TPU_SPEC" $PIP_EXTRAS`. Rerun it after every commit you want to run: it is
# incremental, and train.sh / sample.sh refuse to start on workers at another commit.

set -euo pipefail
# shellcheck source=launch/tpu/gcloud.sh
source "$(dirname "$0")/gcloud.sh"

only_common_flags "$@"
mapfile -t where < <(tpu_where)
read -r -a extra <<<"$SSH_FLAGS"
commit=$(local_commit)
if [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]]; then
  echo "warning: uncommitted changes in $REPO_ROOT stay here; the workers get $commit" >&2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bundle="$tmp/segsr_jax.bundle"
show git -C "$REPO_ROOT" bundle create "$bundle" HEAD
if ! ((DRY_RUN)); then git -C "$REPO_ROOT" bundle create -q "$bundle" HEAD; fi
gcloud_do compute tpus tpu-vm scp "$bundle" "$TPU_NAME:segsr_jax.bundle" "${where[@]}" \
  --worker=all "${extra[@]}"

script="$(remote_prelude)
$(remote_vars commit REMOTE_DIR VENV PYTHON JAX_TPU_SPEC PIP_EXTRAS)
$(
  cat <<'EOS'
apt_install() {
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq "$@"
}
if ! command -v "$PYTHON" >/dev/null || ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
  apt_install update
  apt_install install -y git "$PYTHON" "$PYTHON-venv"
fi
src="$HOME/$REMOTE_DIR"
[[ -d "$src/.git" ]] || git init -q "$src"
git -C "$src" fetch -q "$HOME/segsr_jax.bundle" HEAD
git -C "$src" -c advice.detachedHead=false checkout -q --force --detach "$commit"
[[ -x "$HOME/$VENV/bin/python" ]] || "$PYTHON" -m venv "$HOME/$VENV"
"$HOME/$VENV/bin/python" -m pip install -q --upgrade pip
read -r -a extras <<<"$PIP_EXTRAS"
"$HOME/$VENV/bin/python" -m pip install -q -e "$src" "$JAX_TPU_SPEC" "${extras[@]}"
"$HOME/$VENV/bin/python" -c 'import jax, libtpu, segsr_jax; print("jax", jax.__version__)'
echo "worker $WORKER: ready at commit $commit"
EOS
)"
on_workers all "$script"
