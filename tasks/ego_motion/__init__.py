"""Egocentric full-body motion recovery from a headset's head trajectory (MotionGRPO on an EgoAllo-style prior).

Grouped by pipeline stage: ``data`` (``bvh``/``convert``/``amass``/``windows``: mocap to training windows;
``aria``), ``body`` (``geometry``, ``body_model``: SMPL-H via smplx, ``build_body_model``), ``model``
(``condition``, ``motion``, ``network``, ``egoallo_checkpoint``, ``prior``), ``sampling`` (``sampler``,
``tto``), ``rewards`` (``registered``, ``perceptual``, ``critic_data``), ``physics`` (the MuJoCo physics
evaluator) and ``evaluation`` (``metrics``, ``render``); ``task`` is the Task adapter. Import
``tasks.ego_motion.rewards.registered`` to register the ``ego_*`` rewards. See docs/ego_motion_*.md.
"""
