"""Body stage (the lowest layer of the ego wing): the SMPL-H body the task speaks in. ``geometry`` holds
rotations, rigid transforms and the skeleton constants (``NUM_BETAS``, ``FOOT_JOINTS``, ``NUM_METRIC_JOINTS``),
``body_model`` the SMPL-H model with its fast joints-only forward kinematics. The bundled openly licensed
stand-in is rebuilt from mocap by ``python -m tasks.ego_motion.data.build_body_model`` (the data stage)."""
