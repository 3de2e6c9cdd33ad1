#!/usr/bin/env bash
# `make bench-peers`: Concrete-ML's FHE logistic regression next to ours, same data, same model.
#
# Concrete-ML pins torch 2.3.1, numpy 1.26 and scikit-learn 1.5, so it lives in its own venv
# (.bench-peers/venv, ~6 GB with torch's CUDA wheels; gitignored) and never in the main .venv,
# `make test` or `make bench`. Steps: install Concrete-ML (once), run bench/peers/concrete_lr.py
# there (writes the split and the float weights), run bench/peers/ours_lr.py in the main venv on
# that data, and write docs/peers.md with bench/peers/report.py. If Concrete-ML cannot be
# installed or run, docs/peers.md says why (with the error) and shows our numbers alone.
#
# Environment: CML_VERSION (default 1.9.0), PYTHON (interpreter for the peer venv, default
# python3), MAIN_PY (default .venv/bin/python), OUT_MD (default docs/peers.md), PEERS_WORK
# (default .bench-peers: the venv, logs and JSON results), PEERS_ROUNDS (default 3), PEERS_OURS
# (head: measure crypto/ as committed at HEAD, exported with `git archive`, so the page is
# reproducible while others edit the tree; worktree: the working copy; default head).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 1
WORK="${PEERS_WORK:-.bench-peers}"
VENV="$WORK/venv"
CML_VERSION="${CML_VERSION:-1.9.0}"
PYTHON="${PYTHON:-python3}"
MAIN_PY="${MAIN_PY:-$ROOT/.venv/bin/python}"
OUT_MD="${OUT_MD:-docs/peers.md}"
mkdir -p "$WORK"
ROUNDS="${PEERS_ROUNDS:-3}"
rm -f "$WORK"/concrete_lr*.json "$WORK"/ours_lr*.json "$WORK/lr_data.npz"

fail_json() {  # $1: reason (markdown), written as the Concrete-ML result
  "$PYTHON" -c 'import json,sys; print(json.dumps({"engine": "Concrete-ML", "error": sys.argv[1]}))' "$1" \
    > "$WORK/concrete_lr.1.json"
}

if [ ! -x "$MAIN_PY" ]; then
  echo "main venv missing: running make install" >&2
  make install || exit 1
fi

install_s=""
cml_ok=1
if ! "$VENV/bin/python" -c "import concrete.ml" 2>/dev/null; then
  free_gb=$(df -Pk "$ROOT" | awk 'NR==2 {print int($4 / 1048576)}')
  echo "disk: ${free_gb} GB free at $ROOT (need ~10 GB for Concrete-ML + torch CUDA wheels)"
  if [ "$free_gb" -lt 10 ]; then
    fail_json "Not installed: only ${free_gb} GB free on the disk, and \`pip install concrete-ml==$CML_VERSION\` needs ~6 GB (torch 2.3.1 with its CUDA wheels) plus download space."
    cml_ok=0
  else
    t0=$(date +%s)
    "$PYTHON" -m venv "$VENV" && "$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1
    echo "installing concrete-ml==$CML_VERSION into $VENV (log: $WORK/install.log) ..."
    if ! "$VENV/bin/pip" install "concrete-ml==$CML_VERSION" > "$WORK/install.log" 2>&1; then
      fail_json "\`$VENV/bin/pip install concrete-ml==$CML_VERSION\` failed:

\`\`\`
$(tail -n 25 "$WORK/install.log")
\`\`\`"
      cml_ok=0
    fi
    install_s=$(( $(date +%s) - t0 ))
  fi
fi

OURS_SRC_ARGS=()
ours_desc=""
if [ "${PEERS_OURS:-head}" = head ]; then
  rev=$(git rev-parse --short HEAD)
  rm -rf "$WORK/head-src" && mkdir -p "$WORK/head-src"
  git archive HEAD crypto | tar -x -C "$WORK/head-src" || exit 1
  OURS_SRC_ARGS=(--src "$WORK/head-src")
  ours_desc="commit $rev (crypto/ exported from HEAD)"
fi

# Alternate the two sides so that load from other users of the machine hits both alike;
# report.py takes the median of each metric over the rounds.
for i in $(seq 1 "$ROUNDS"); do
  if [ "$cml_ok" = 1 ]; then
    echo "round $i/$ROUNDS: Concrete-ML (bench/peers/concrete_lr.py) ..."
    if ! "$VENV/bin/python" bench/peers/concrete_lr.py --out "$WORK/concrete_lr.$i.json" \
        --data "$WORK/lr_data.npz" > "$WORK/concrete_lr.log" 2>&1; then
      rm -f "$WORK"/concrete_lr*.json
      fail_json "Installed, but \`bench/peers/concrete_lr.py\` failed:

\`\`\`
$(tail -n 25 "$WORK/concrete_lr.log")
\`\`\`"
      cml_ok=0
    fi
  fi
  echo "round $i/$ROUNDS: ours (bench/peers/ours_lr.py) ..."
  "$MAIN_PY" bench/peers/ours_lr.py --data "$WORK/lr_data.npz" --out "$WORK/ours_lr.$i.json" "${OURS_SRC_ARGS[@]}" \
    > "$WORK/ours_lr.log" 2>&1 || { tail -n 25 "$WORK/ours_lr.log" >&2; exit 1; }
done

venv_size=$(du -sh "$VENV" 2>/dev/null | cut -f1)
"$MAIN_PY" bench/peers/report.py --cml "$WORK"/concrete_lr.*.json --ours "$WORK"/ours_lr.*.json \
  --out "$OUT_MD" --ours-src "$ours_desc" --venv-size "${venv_size:-?}" --install-seconds "$install_s"
echo "wrote $OUT_MD"
