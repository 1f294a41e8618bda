# The exact commands behind this folder (2026-11-29, run from the repository root on the 2-core CPU machine, nothing
# else running). /tmp/demo-v3: `dsg demo --out /tmp/demo-v3` (the TopK default); /tmp/demo-btk3: `dsg demo --sae
# experiments/guard-v2/smollm2-135m-layer6-batchtopk --out /tmp/demo-btk3`.
export OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
for m in demo-v3 demo-btk3; do
  for b in 1 8; do
    echo "== $m B$b"; python benchmarks/guard_step.py --model /tmp/$m --batch $b --steps 1000 2>&1 | tail -4
  done
done > guard_step.txt
for m in demo-btk3 demo-v3; do
  python benchmarks/benchmark.py --model /tmp/$m --lengths 256 1024 --batches 1 --rounds 5 --new-tokens 64 \
    --out $m.json --markdown $m.md  # kept as topk.* (demo-v3), batchtopk.* (demo-btk3)
done
