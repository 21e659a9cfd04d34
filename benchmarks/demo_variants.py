"""Ablation of the demo's quantizer learning rates on one seed (used to choose the DDQ defaults)."""

import sys
import time

import torch

from ddq import demo
from ddq.data import load_dataset

settings = demo.parse_args(sys.argv[1:])
data = demo.Dataset(load_dataset(settings.data, settings.data_dir), torch.device("cuda" if torch.cuda.is_available() else "cpu"))
fp = demo.pretrain(data, settings, 0)
for scale in ("none", "width", "steps"):
    settings.range_lr_scale = scale
    for name in ("lsq_w2a2", "ddq_w2a2", "ddq_w4a4", "ddq_mixed"):
        if name.startswith("lsq") and scale != "none":
            continue
        started = time.time()
        r = demo.run_qat(demo.RUNS[name], fp, data, settings, 0)
        print(f"range_lr_scale={scale} {name}: acc {r['accuracy']:.2f} init {r['accuracy_at_init']:.2f} "
              f"losses {[round(x, 4) for x in r['train_losses']]} bits {r['avg_weight_bits']:.2f}/{r['avg_act_bits']:.2f} "
              f"{time.time() - started:.0f}s", flush=True)
