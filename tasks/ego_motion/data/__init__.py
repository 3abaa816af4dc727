"""Data stage: motion capture to training windows. ``bvh`` reads BVH clips, ``convert`` retargets them onto
the body model and writes AMASS-layout files (``python -m tasks.ego_motion.data.convert``), ``amass`` reads
and writes that layout, ``windows`` cuts the files into cached fixed-length training windows with the
head trajectory and body targets, and ``aria`` turns a Project Aria recording into a head trajectory."""
