#!/usr/bin/env bash
# Check out each reference at its pinned commit into $FIDELITY_DIR/<name>/repo (default /tmp/fidelity), from a
# bare mirror under $MIRROR (<owner>+<name>/repo, what the session's fetch tool writes) or else from GitHub.
# The references' code stays there, outside the project; run_ref.py imports it from there.
set -euo pipefail
DIR=${FIDELITY_DIR:-/tmp/fidelity}
MIRROR=${MIRROR:-/work/.mirror}
while read -r name slug commit; do
  dest=$DIR/$name/repo
  mkdir -p "$dest"
  if [ -d "$MIRROR/${slug/\//+}/repo" ]; then
    git --git-dir="$MIRROR/${slug/\//+}/repo" --work-tree="$dest" checkout "$commit" -- .
  else
    git clone -q "https://github.com/$slug" "$dest" && git -C "$dest" checkout -q "$commit"
  fi
  echo "$commit" > "$DIR/$name/COMMIT"
  echo "$name: $slug @ $commit -> $dest"
done <<'LIST'
ria biomedical-cybernetics/Relative-importance-and-activation-pruning 7bc55b06924659ea977f7804b773ce3ef0d55c2f
dsnot zyxxmu/DSnoT 4c029dfa66cae3dba7f4a77c78a524e272fc638c
pz pprp/Pruner-Zero db70134ed7d4c521a57060fd698f353d04268429
wanda locuslab/wanda 8e8fc87b4a2f9955baa7e76e64d5fce7fa8724a6
LIST
mkdir -p "$DIR/out" "$DIR/logs"
