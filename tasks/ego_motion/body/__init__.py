"""Body stage: the SMPL-H body the task speaks in. ``geometry`` holds rotations, rigid transforms and the
skeleton constants, ``body_model`` the SMPL-H model with its fast joints-only forward kinematics, and
``build_body_model`` rebuilds the bundled openly licensed stand-in (``python -m
tasks.ego_motion.body.build_body_model``)."""
