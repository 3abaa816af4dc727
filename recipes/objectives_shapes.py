"""Side-by-side objectives on shapes: probe reward (train split) against training CPU seconds, one objective per call.

    python recipes/objectives_shapes.py OBJECTIVE ITERATIONS SEED OUTPUT_DIR     # e.g. nft 20 0 runs/objectives/nft

Needs the shapes prior in runs/shapes_prior (``recipes/shapes.py`` pretrains it when missing). Every objective runs
with the shapes recipe's GRPO defaults (B = 8, G = 8, learning rate 1e-4, the flow SDE at eta 0.7) and its own
defaults, untuned; the probe (16 train conditions x 4 noises, every 5 iterations) is drawn from the training
distribution, never the test split. Writes OUTPUT_DIR/result.json: the probe rewards and paired differences to the
prior (with intervals) at each probe, with the summed wall-clock iteration seconds (rollout + update) and the
process's CPU seconds (the earlier probes included) there.
"""
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from diffgrpo.chain import SamplingChain
from diffgrpo.config import GRPOConfig, OptimConfig, PerturbConfig, ProbeConfig, SamplerConfig
from diffgrpo.loss import LossConfig
from diffgrpo.trainer import LoopHooks, train_grpo
from tasks.shapes.model import load_prior
from tasks.shapes.task import ShapesTask, ShapesTaskConfig

torch.set_num_threads(1)
objective, iterations, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
model, kwargs = load_prior(Path("runs/shapes_prior"))
task = ShapesTask(ShapesTaskConfig(**kwargs))
chain = SamplingChain.of(task, SamplerConfig(eta=0.7, log_prob_reduction="mean"))
cfg = GRPOConfig(seed=seed, num_iterations=iterations, conditions_per_iteration=8, group_size=8, micro_batch_size=64,
                 perturb=PerturbConfig(name="none"), optim=OptimConfig(learning_rate=1e-4), rewards=("shapes_disc",),
                 checkpoint_every=0, loss=LossConfig(objective=objective),
                 probe=ProbeConfig(splits=("train",), conditions_per_split=16, noises_per_condition=4, eval_every=5))
start = time.process_time()
# CPU seconds of this process after each iteration's update (the probes before it included): wall-clock
# iteration times mislead on a shared machine, CPU time does not.
hooks = LoopHooks(after_update=lambda it, data, batch: {"time/process_seconds": time.process_time() - start})
history = train_grpo(task, model, cfg, accelerator=Accelerator(cpu=True), output_dir=out / "ckpt", chain=chain,
                     hooks=hooks)
seconds = [sum(history["time/iteration_seconds"][:int(i)]) for i in history["probe/iteration"]]
cpu = [0.0] + [history["time/process_seconds"][int(i) - 1] for i in history["probe/iteration"][1:]]
result = {"objective": objective, "seed": seed, "process_seconds": time.process_time() - start,
          "probe_iteration": history["probe/iteration"], "train_seconds_at_probe": seconds,
          "process_seconds_at_probe": cpu,
          "probe": {k: v for k, v in history.items() if k.startswith(("probe/reward", "probe_diff/reward"))}}
out.mkdir(parents=True, exist_ok=True)
(out / "result.json").write_text(json.dumps(result, indent=1))
print(json.dumps({"objective": objective, "secs": seconds, "probe": result["probe"].get("probe/reward/train/total")}))
