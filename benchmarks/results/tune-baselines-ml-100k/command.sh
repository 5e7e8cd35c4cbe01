# SASRec and GRU4Rec on ml-100k, tuned at the all-ml-100k grid's settings (properties/bench/all_ml-100k.yaml)
# with the trial budget of the GlobalDiff search (tune-globaldiff-ml-100k: 8 trials, ASHA, search seed 2020),
# one trial at a time (--cpus 1) on a shared 2-core machine.
set -x
export OMP_NUM_THREADS=1
ALL="--MAX_ITEM_LIST_LENGTH=10 --hidden_size=64 --inner_size=256 --n_layers=2 --n_heads=2 --hidden_dropout_prob=0.2 --attn_dropout_prob=0.2 --train_batch_size=512 --eval_batch_size=1024 --epochs=5 --stopping_step=2 --learning_rate=0.001"
mkdir -p benchmarks/runs/tune-baselines
for m in ${MODELS:-SASRec GRU4Rec}; do   # MODELS=GRU4Rec bash command.sh runs one search
  nice -n 10 recbole-diff tune --model $m --dataset ml-100k --space properties/tune/$m.yaml --samples 8 --cpus 1 \
    --scheduler asha --search_seed 2020 --out benchmarks/runs/tune-baselines $ALL > benchmarks/runs/tune-baselines/$m.log 2>&1
done
