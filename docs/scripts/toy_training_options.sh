#!/usr/bin/env bash
# The training-options study of docs/toy_tutorial.md §7: 4 loss variants x 2 seeds on the toy (run from the repository root).
set -e
python -c "from pathlib import Path; from toy import world, hooks; hooks.write_folder_once(Path('runs/options/val_images'), *world.concept_dataset('purple', 16, seed=1000))"
for seed in 0 1; do
  for variant in "base:" "min_snr:--min_snr_gamma=5" "debiased:--debiased_estimation=True" "huber:--loss_type=huber"; do
    name=${variant%%:*}; opts=${variant#*:}
    [ -f runs/options/${name}_s$seed/lora_final.safetensors ] && continue
    python train.py --steps 200 --seed $seed --validation_images runs/options/val_images --val_loss_every 50 \
      --cache runs/options/cache --out runs/options/${name}_s$seed $opts
  done
done
