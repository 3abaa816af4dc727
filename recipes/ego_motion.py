"""MotionGRPO: GRPO post-training of the ego-motion prior (the main job; the paper's Algorithm 1).

The job lives in ``tasks/ego_motion/grpo.py`` (its ``Config``, the perceptual model's hooks, the
evaluation before and after, the results), so that the ablation, RLPF, perceptual-negatives and
gradient-signal recipes run the very same job; the loop is ``diffgrpo.trainer.train_grpo``
(docs/architecture.md, "Where Algorithm 1 lives").

    accelerate launch recipes/ego_motion.py                               # the main job
    accelerate launch recipes/ego_motion.py --resume                      # continue a killed run
    accelerate launch --multi_gpu --num_processes 2 recipes/ego_motion.py # two ranks (CPU or GPU)
    accelerate launch recipes/ego_motion.py --prior egoallo_checkpoint_april13 --task.include-hands  # EgoAllo's
                                          # released prior on AMASS: docs/egoallo_checkpoint.md has the flags

Writes into ``--output-dir``: prior.safetensors (the post-trained denoiser; an EgoAllo prior becomes the
folder prior/), which ``--prior`` of every ego-motion recipe reads, e.g.
``python recipes/eval_ego_motion.py --prior runs/ego_motion/prior.safetensors --seeds 1234 --batch-size 32``
(the job's own held-out evaluation), results.json ({"base", "grpo", "base+tto", "grpo+tto", "prior",
"config"}), results.md, curves.png, history.json, checkpoints/ and TensorBoard logs/.
"""

from __future__ import annotations

import logging

from diffgrpo import cli
from tasks.ego_motion.grpo import Config, main, renamed_flags

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main(cli.parse(Config, renamed=renamed_flags()))
