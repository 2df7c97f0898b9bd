#!/bin/bash
# Reproduces the rows of docs/reliability.md (training, data, configuration) and prints each
# command, its exit status and its error line. Run from the repository root:
#   bash scripts/reliability_cases.sh            (PY=path/to/python to choose the interpreter)
# The disk-full and read-only cases mount small tmpfs file systems: they need root
# (or a user allowed to mount); everything is written under a fresh /tmp/i14cases.* folder.
set -u
PY=${PY:-.venv/bin/python}
export TF_CPP_MIN_LOG_LEVEL=2
W=$(mktemp -d /tmp/i14cases.XXXX)
cat > $W/tiny.yaml <<'Y'
demo: {num_classes: 10, num_unseen: 3, num_attributes: 8, attributes_per_class: 3, images_per_class: 12, map_size: 3, feature_dim: 32, embed_dim: 16}
data: {batch_size: 16, eval_batch_size: 32}
optimizer: {learning_rate: 0.003}
train: {iterations: 60, eval_every: 30, log_every: 10, verbose: 0}
Y
T="--dataset demo --config $W/tiny.yaml --data-dir $W/data"
case_() { # name, command...
  local name=$1; shift
  echo "### $name"
  echo "\$ $*"
  "$@" > $W/out 2> $W/err; rc=$?
  echo "exit $rc"
  grep -E "^error:|^msdn-tf: removed|left alone" $W/err | cut -c1-400
  [ $rc = 0 ] && tail -1 $W/out | cut -c1-200
}
left() { echo "left: $(cd $1 2>/dev/null && find . -type f | sort | tr '\n' ' ')"; }
# data
$PY -m msdn_tf.train $T --print-config > /dev/null
$PY - <<P
from msdn_tf.config import resolve_config; from msdn_tf.data.registry import load_dataset
d = load_dataset(resolve_config("demo", ["$W/tiny.yaml"], ["data.data_dir=$W/data"]))
print("poison row", int(d.trainval_loc[5]), d.features.path)
open("$W/row", "w").write(str(int(d.trainval_loc[5]))); open("$W/h5", "w").write(d.features.path)
P
cp -r $W/data $W/bad
H5=$W/bad/$(basename $(cat $W/h5))
$PY -c "import h5py; f=h5py.File('$H5','r+'); f['feature_map'][$(cat $W/row),3,0,0]=float('nan'); f.close()"
case_ "NaN in the feature file" $PY -m msdn_tf.train --dataset demo --config $W/tiny.yaml --data-dir $W/bad --run-dir $W/r_nan; left $W/r_nan
case_ "NaN learning rate" $PY -m msdn_tf.train $T --set optimizer.learning_rate=.nan --run-dir $W/r_lr; left $W/r_lr
case_ "negative learning rate" $PY -m msdn_tf.train $T --set optimizer.learning_rate=-1e-4
printf 'optimizer:\n  rho: 1.5\n' > $W/bad.yaml
case_ "rho outside (0,1) in a file" $PY -m msdn_tf.train $T --config $W/bad.yaml
case_ "batch size 0" $PY -m msdn_tf.train $T --set data.batch_size=0
case_ "overflow (learning rate 1e30)" $PY -m msdn_tf.train $T --set optimizer.learning_rate=1e30 --run-dir $W/r_over; left $W/r_over
case_ "a good run" $PY -m msdn_tf.train $T --run-dir $W/run
case_ "--resume --seed 5" $PY -m msdn_tf.train --run-dir $W/run --resume --seed 5
case_ "--resume --set loss.lambda_cal=0.5" $PY -m msdn_tf.train --run-dir $W/run --resume --set loss.lambda_cal=0.5
case_ "--resume --iterations 90" $PY -m msdn_tf.train --run-dir $W/run --resume --iterations 90
$PY -c "import json; print('resumes:', json.load(open('$W/run/results.json'))['resumes'])"
case_ "--resume --iterations 30 (fewer than done)" $PY -m msdn_tf.train --run-dir $W/run --resume --iterations 30
echo hello > $W/afile
case_ "--run-dir naming a file" $PY -m msdn_tf.train $T --run-dir $W/afile
case_ "--data-dir naming a file" $PY -m msdn_tf.train --dataset cub --data-dir $W/afile
case_ "--dataset CUB --print-config" $PY -m msdn_tf.train --dataset CUB --print-config
case_ "--dataset CUB (training)" $PY -m msdn_tf.train --dataset CUB
cp -r $W/run $W/run_corrupt; echo '{"step": 90, "weig' > $W/run_corrupt/checkpoint/state.json
case_ "corrupt state.json" $PY -m msdn_tf.train --run-dir $W/run_corrupt --resume --iterations 120
cp -r $W/run $W/run_missing; rm $W/run_missing/checkpoint/*.weights.*
case_ "missing checkpoint weights" $PY -m msdn_tf.train --run-dir $W/run_missing --resume --iterations 120
# real disk full and read-only file systems (tmpfs)
M=$W/small; mkdir -p $M; mount -t tmpfs -o size=${FULL_SIZE:-7M} tmpfs $M
case_ "disk full during a checkpoint (7 MB tmpfs, default demo)" $PY -m msdn_tf.train --dataset demo --data-dir $W/demo --iterations 200 --set train.eval_every=100 --run-dir $M/run
left $M/run; $PY -c "import json; print('state step', json.load(open('$M/run/checkpoint/state.json'))['step'])"
umount $M
mount -t tmpfs -o size=4500k tmpfs $M
case_ "disk full writing model.keras (4.5 MB tmpfs, default demo)" $PY -m msdn_tf.train --dataset demo --data-dir $W/demo --iterations 100 --set train.eval_every=100 --run-dir $M/run
left $M/run
umount $M
mount -t tmpfs -o size=20M tmpfs $M; mkdir $M/empty; mount -o remount,ro $M
case_ "read-only data folder, demo generation" $PY -m msdn_tf.train $T --run-dir $W/r_ro0 --data-dir $M/empty
case_ "read-only run folder" $PY -m msdn_tf.train $T --run-dir $M/run
umount $M
mount -t tmpfs -o size=20M tmpfs $M; cp -r $W/data $M/data; mount -o remount,ro $M
case_ "read-only data folder, cache build" $PY -m msdn_tf.train $T --run-dir $W/r_ro --set data.cache=true --data-dir $M/data
umount $M
SZ=$(du -sk $W/data | cut -f1); mount -t tmpfs -o size=$((SZ + 40))k tmpfs $M; cp -r $W/data $M/data; df -k $M | tail -1
case_ "disk full during a cache build" $PY -m msdn_tf.train $T --run-dir $W/r_full --set data.cache=true --data-dir $M/data
left $M/data
umount $M
# stale temporaries from a killed prepare
$PY -c "pass" & DEAD=$!; wait $DEAD
STEM=$(basename $(cat $W/h5) .hdf5)
head -c 1000000 /dev/zero > $W/data/$STEM.regions_float16.npy.tmp-$DEAD
case_ "stale *.npy.tmp-PID of a killed prepare" $PY -m msdn_tf.prepare --dataset demo --data-dir $W/data --set demo.num_classes=10 --set demo.num_unseen=3 --set demo.num_attributes=8 --set demo.attributes_per_class=3 --set demo.images_per_class=12 --set demo.map_size=3 --set demo.feature_dim=32 --set demo.embed_dim=16 --no-progress
ls $W/data
echo "workdir $W"
