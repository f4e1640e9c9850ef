#!/usr/bin/env bash
# GPU device check (not run by pytest or CI): a real `stgr train` SFT run, its resume, then RL (GSPO
# with a reference model, and GRPO) on CUDA with the tiny model. Prepare, from the repo root:
#   stgr build --run runs/gpu source.num_videos=16 && mkdir -p .gpu && cp -r runs/gpu/dataset .gpu/dataset
#   pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl trl datasets dill \
#     multiprocess hydra-core omegaconf nltk shapely transformers   (plus wheels built for antlr4 and rouge-score)
# then run `bash tests/bench/gpu_train_check.sh` on the GPU machine with .gpu and .whl carried.
# Results of 2026-11-26 on an H100: docs/benchmarks.md.
# Device check: a real SFT and RL (GSPO with a reference model, then GRPO) run of `stgr train` on CUDA.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/install.log 2>&1 || { tail -5 /tmp/install.log; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'trl', trl.__version__)"
stgr tiny-model /tmp/tiny || exit 1
D=$PWD/.gpu/dataset
( time stgr train sft --run /tmp/sft model=tiny model.path=/tmp/tiny data.dir=$D data.max_records=8 \
    trainer.max_steps=60 trainer.logging_steps=10 trainer.learning_rate=5e-4 trainer.save_steps=30 ) 2>&1 | tee $OUT/sft.log | grep -E "^.'loss|Error|real" | cut -c1-120 | tail -10
( time stgr train sft --run /tmp/sft model=tiny model.path=/tmp/tiny data.dir=$D data.max_records=8 \
    trainer.max_steps=80 trainer.logging_steps=10 trainer.learning_rate=5e-4 trainer.save_steps=30 ) 2>&1 | tee $OUT/sft_resume.log | grep -iE "resum|restored|^.'loss|real" | cut -c1-120 | tail -8
ls /tmp/sft /tmp/sft/* | head -20
( time stgr train rl --run /tmp/gspo model=tiny model.path=/tmp/sft/final data.dir=$D data.max_records=8 \
    trainer.max_steps=6 rl.num_generations=4 trainer.per_device_train_batch_size=4 rl.max_completion_length=64 rl.beta=0.04 ) 2>&1 | tee $OUT/gspo.log | grep -oE "'reward': '[^']*'|'kl': '[^']*'|step_time': '[^']*'|Error.*|real.*" | tail -20
( time stgr train rl --run /tmp/grpo model=tiny model.path=/tmp/tiny data.dir=$D data.max_records=8 \
    trainer.max_steps=6 rl.num_generations=4 trainer.per_device_train_batch_size=4 rl.max_completion_length=64 rl.beta=0.0 \
    rl.importance_sampling_level=token rl.epsilon=0.2 rl.epsilon_high=0.28 ) 2>&1 | tee $OUT/grpo.log | grep -oE "'reward': '[^']*'|step_time': '[^']*'|Error.*|real.*" | tail -14
nvidia-smi --query-gpu=memory.used --format=csv,noheader
