"""Pretrain the shapes prior: the command line of ``tasks/shapes/pretrain.py`` (``Config`` there lists every flag).

    accelerate launch recipes/pretrain_shapes.py
"""

from __future__ import annotations

import logging

import tyro

from tasks.shapes.pretrain import Config, main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main(tyro.cli(Config))
