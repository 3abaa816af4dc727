"""Task plugins for diffgrpo: ``shapes`` (small flow-matching example) and ``ego_motion`` (MotionGRPO)."""
