#!/bin/bash
# Reproduces the rows of docs/reliability.md "Run directories, typed flags, degenerate data"
# (issue 21) and prints each case, its exit status and its error line. Run from the
# repository root:  bash scripts/run_integrity_cases.sh   (PY=path/to/python to choose the
# interpreter). Everything is written under a fresh /tmp/i21cases.* folder.
set -u
PY=${PY:-.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-.}
W=$(mktemp -d /tmp/i21cases.XXXX)
cat > $W/tiny.yaml <<'Y'
demo: {num_classes: 10, num_unseen: 3, num_attributes: 8, attributes_per_class: 3, images_per_class: 12, map_size: 3, feature_dim: 32, embed_dim: 16}
data: {batch_size: 16, eval_batch_size: 32}
optimizer: {learning_rate: 0.003}
train: {iterations: 60, eval_every: 30, log_every: 10, verbose: 0, eval_initial: false}
Y
T="--dataset demo --config $W/tiny.yaml --data-dir $W/data"
case_() { echo "### $1"; shift; "$@" > $W/out.txt 2> $W/err.txt; echo "exit $?"; grep -v '^msdn-tf\|^period\|^step ' $W/err.txt | tail -3; }
$PY -m msdn_tf.train $T --run-dir $W/run --iterations 30 --set train.eval_every=10 > /dev/null 2>&1   # a finished run
case_ "second writer" bash -c "$PY -m msdn_tf.train $T --run-dir $W/two --iterations 600 --set train.eval_every=100 >/dev/null 2>&1 & until [ -e $W/two/.msdn-lock ]; do sleep 1; done; $PY -m msdn_tf.train $T --run-dir $W/two --iterations 30; r=\$?; wait; exit \$r"
ls -a $W/two
case_ "reader while written" bash -c "$PY -m msdn_tf.train $T --run-dir $W/three --iterations 20000 --set train.eval_every=5000 >/dev/null 2>&1 & p=\$!; until [ -e $W/three/.msdn-lock ]; do sleep 1; done; $PY -m msdn_tf.evaluate --run $W/three; r=\$?; kill \$p; wait; exit \$r"
case_ "ctrl-c" bash -c "set -m; $PY -m msdn_tf.train $T --run-dir $W/int --iterations 20000 --set train.eval_every=100 >/dev/null 2>$W/int.err & p=\$!; until [ -e $W/int/checkpoint/state.json ]; do sleep 1; done; sleep 5; kill -INT \$p; wait \$p; r=\$?; cat $W/int.err | grep error >&2; exit \$r"
ls $W/int $W/int/checkpoint
$PY -m msdn_tf.convert --torch-checkpoint tests/fixtures/tiny_msdn.pth --dataset custom --out $W/conv > /dev/null 2>&1
case_ "train into converted run" $PY -m msdn_tf.train $T --run-dir $W/conv
case_ "convert --overwrite onto a trained run" $PY -m msdn_tf.convert --torch-checkpoint tests/fixtures/tiny_msdn.pth --dataset custom --out $W/run --overwrite
ls -a $W/run
case_ "data-dir with #" $PY -m msdn_tf.train $T --data-dir "$W/dd #2" --print-config
grep data_dir $W/out.txt
case_ "data-dir null" $PY -m msdn_tf.train $T --data-dir null --print-config
grep data_dir $W/out.txt
case_ "resume precision" $PY -m msdn_tf.train --run-dir $W/int --resume --precision mixed_bfloat16
case_ "seed" $PY -m msdn_tf.train $T --seed -1
case_ "fusion" $PY -m msdn_tf.train $T --set 'model.fusion_weights=[0,0]'
case_ "bias" $PY -m msdn_tf.train $T --set model.bias=1e30
case_ "demo" $PY -m msdn_tf.train --dataset demo --set demo.num_unseen=40
printf 'train:\n  run_name: caf\xe9\n' > $W/latin1.yaml
case_ "latin1" $PY -m msdn_tf.train $T --config $W/latin1.yaml
case_ "failed run" $PY -m msdn_tf.train $T --run-dir $W/failed --set optimizer.learning_rate=1e30
ls -a $W/failed 2>&1
python3 -c "import json;p='$W/int/checkpoint/state.json';s=json.load(open(p));s['step']='abc';json.dump(s,open(p,'w'))"
case_ "tampered state" $PY -m msdn_tf.train --run-dir $W/int --resume
mkdir -p $W/notmsdn && cp $W/run/config.yaml $W/notmsdn/ && $PY -c "
import keras; i=keras.Input((3,)); keras.Model(i, keras.layers.Lambda(lambda x: x*2)(i)).save('$W/notmsdn/model.keras')" 2>/dev/null
case_ "lambda model" $PY -m msdn_tf.evaluate --run $W/notmsdn
