"""Benchmark: joints-only forward kinematics vs a full smplx SMPL-H forward on a 6,890-vertex mesh.

Why: rewards, metrics and root-from-CPF recovery need joints for thousands of frames per GRPO
step; this measures how much skipping the mesh (and pose blend shapes) saves. The model file is
synthetic (random but valid, real SMPL-H sizes: 6,890 vertices, 16 betas, 459 pose blend shapes),
so the benchmark needs no licensed download. Timings are medians over ``--repeats`` runs, CPU,
float32, no autograd.

    python recipes/benchmarks/bench_body_fk.py --batch 1024 --output bench_body_fk.md
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tasks.ego_motion.body.body_model import load_body_model
from tasks.ego_motion.body.geometry import axis_angle_to_matrix, make_transform
from tasks.ego_motion.data.build_body_model import write_synthetic_smplh_npz

logger = logging.getLogger(__name__)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(batch: int, repeats: int, threads: int | None) -> str:
    if threads is not None:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_body_model(write_synthetic_smplh_npz(Path(tmp) / "smplh_synthetic.npz"))
    g = torch.Generator().manual_seed(0)
    betas = torch.randn(batch, 16, generator=g)
    aa = torch.randn(batch, 52, 3, generator=g) * 0.5
    transl = torch.randn(batch, 3, generator=g)
    R = axis_angle_to_matrix(aa)
    T_world_root = model.T_world_root_from_amass(R[:, 0], transl, betas)

    def smplx_forward():
        model.smplx_layer(
            betas=betas,
            global_orient=aa[:, 0],
            body_pose=aa[:, 1:22].reshape(batch, -1),
            left_hand_pose=aa[:, 22:37].reshape(batch, -1),
            right_hand_pose=aa[:, 37:].reshape(batch, -1),
            transl=transl,
        )

    def fk_rotmats():
        model.forward_kinematics(R[:, 1:], betas=betas, T_world_root=T_world_root)

    def fk_axis_angle():  # same input as smplx: includes Rodrigues and the root transform
        Rm = axis_angle_to_matrix(aa)
        T = make_transform(Rm[:, 0], transl + model.shaped_joints(betas)[:, 0])
        model.forward_kinematics(Rm[:, 1:], betas=betas, T_world_root=T)

    def head_chain():
        model.T_root_head(R[:, 1:22], betas)

    with torch.no_grad():
        t_smplx = _median_seconds(smplx_forward, repeats)
        rows = [
            ("smplx.SMPLH forward (6,890 vertices, joints + mesh)", t_smplx),
            ("BodyModel.forward_kinematics (rotation matrices in)", _median_seconds(fk_rotmats, repeats)),
            (
                "BodyModel.forward_kinematics (axis-angle in, incl. Rodrigues)",
                _median_seconds(fk_axis_angle, repeats),
            ),
            ("BodyModel.T_root_head (pelvis-to-head chain only)", _median_seconds(head_chain, repeats)),
        ]
    lines = [
        f"Batch {batch} frames, float32, CPU, {torch.get_num_threads()} threads, median of {repeats} runs.",
        "",
        "| method | time (ms) | speed-up vs smplx |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {t * 1e3:.2f} | {t_smplx / t:.1f}x |" for name, t in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args()
    table = run(args.batch, args.repeats, args.threads)
    print(table)
    if args.output is not None:
        args.output.write_text(table)


if __name__ == "__main__":
    main()
