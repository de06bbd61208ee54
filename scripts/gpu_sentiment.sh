#!/usr/bin/env bash
# The sentiment unit at GPU scale, for a lent GPU machine (see README "Sentiment neuron", What is
# left): a wider language model with the bound unit, then a reading stage, then the bound unit's
# accuracy on SST-2. Every figure it prints is measured where it runs.
#
# Usage: scripts/gpu_sentiment.sh CORPORA OUTDIR   (charrnn importable, e.g. PYTHONPATH=.)
#   CORPORA: a folder holding the shared corpora (imdb_train_*, amazon_multidomain_*, sst2_*, uci_*).
#   Sizes from the environment: DEVICE (cuda), HIDDEN (1024), LM_TIME (4m), READ_TIME (3m), READ (256).
# SST-2 test is scored once, at the end; nothing trains or chooses on it.
data=${1:?corpora folder}; out=${2:?outdir}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}
step() { echo; echo "=== $1"; shift; "$@" 2>&1; echo "--- exit $?"; }
uci=("$data"/uci_imdb_labelled.tsv "$data"/uci_yelp_labelled.tsv "$data"/uci_amazon_cells_labelled.tsv)

step "machine" $py -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
# 1. the language model with the bound unit, on every review corpus but imdb_train_09 (the steering
#    benchmark's held-out reviews)
step "language model, bound unit, ${HIDDEN:-1024} units, ${LM_TIME:-4m}" \
  $py -m charrnn train "$data"/imdb_train_0[0-8].tsv "$data"/amazon_multidomain_*.tsv --sentiment-unit \
  --device "$dev" --hidden "${HIDDEN:-1024}" --time "${LM_TIME:-4m}" --seq-len 128 --run-dir "$out/lm" -q
step "discover on it (SST-2 train / dev)" \
  $py -m charrnn neuron find "$out/lm" "$data"/sst2_train.tsv --test "$data"/sst2_dev.tsv --no-save --json
# 2. the reading stage: the labeled sentences first (they fall in the training split, which alone
#    the reading pass reads), one review file after them for the language model's validation
step "reading stage, --sentiment-read ${READ:-256}, ${READ_TIME:-3m}" \
  $py -m charrnn train "$data"/sst2_train.tsv "${uci[@]}" "$data"/imdb_train_00.tsv --init-from "$out/lm" \
  --sentiment-unit --sentiment-read "${READ:-256}" --device "$dev" --time "${READ_TIME:-3m}" --seq-len 128 \
  --patience 0 --run-dir "$out/read" -q
step "bound unit on SST-2 dev" \
  $py -m charrnn neuron find "$out/read" "$data"/sst2_train.tsv --test "$data"/sst2_dev.tsv --neuron 0 --no-save --json
step "bound unit on SST-2 test (once)" \
  $py -m charrnn neuron find "$out/read" "$data"/sst2_train.tsv --test "$data"/sst2_test.tsv --neuron 0 --no-save --json
for s in positive negative; do
  step "sample --sentiment $s" $py -m charrnn sample "$out/read" --sentiment $s --temp 0.8 --seed 1 --length 300 \
    --prime "This movie was " --device "$dev"
done
[ -n "${KEEP:-}" ] || rm -f "$out"/*/*.safetensors  # KEEP=1 keeps the checkpoints
