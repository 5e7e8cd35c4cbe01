set -x
export OMP_NUM_THREADS=1
for s in asha fifo; do
  recbole-diff tune --model GlobalDiff --backbone SASRec --dataset ml-100k --space ./properties/tune/GlobalDiff.yaml --samples 8 --cpus 2 --scheduler $s --out benchmarks/runs/tune --backbone_checkpoint=<all-ml-100k GlobalDiff@SASRec seed2020>/saved/GlobalDiff-SASRec-backbone-ml-100k-seed2020-Nov-22-2026_13-08-35-d773dd89.pth --diffusion_epochs=20 > $s.log 2>&1
done
