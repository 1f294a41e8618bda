cd /work/main && source /work/venv/bin/activate && export DSG_SHARED_DIR=/work/shared && \
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=disabled nice -n 10 \
dsg train-sae --base ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --layer 6 --width 4096 --k 32 \
    --architecture batchtopk \
    --text embedded:sae --tokens 3000000 --seq-len 128 --batch-tokens 2048 --lr 4e-4 --bf16 \
    --eval-text embedded:heldout-wikitext --out /work/sae-train/smollm2-135m-layer6-batchtopk
