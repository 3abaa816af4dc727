"""Pretrain the EgoAllo-style motion prior: the command line of ``tasks/ego_motion/pretrain.py``
(``Config`` there lists every flag; its module docstring shows the loop).

    accelerate launch recipes/pretrain_ego_motion.py                       # demo size, bundled CMU clips
    accelerate launch recipes/pretrain_ego_motion.py --preset reference --data-dir ~/amass   # the paper's size
    accelerate launch recipes/pretrain_ego_motion.py --resume               # continue the newest checkpoint
"""

from __future__ import annotations

import logging

import tyro

from tasks.ego_motion.pretrain import Config, main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main(tyro.cli(Config))
