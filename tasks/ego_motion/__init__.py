"""Egocentric full-body motion recovery from a headset's head trajectory (MotionGRPO on an EgoAllo-style prior).

Modules: ``geometry``, ``body`` (SMPL-H via smplx), ``bvh``/``convert``/``amass``/``data`` (mocap to
training windows), ``condition``, ``motion``, ``network``, ``prior``, ``task``, ``sampling``, ``tto``,
``metrics``, ``render``, ``perceptual``, ``rewards``. Import ``tasks.ego_motion.rewards`` to register
the ``ego_*`` rewards. See docs/ego_motion_*.md.
"""
