"""How far the same seeds' outputs move with the batch they run in, and with the memory layout.

The bundled model samples seeds 0..n-1 (DDIM, eta = 0) as one batch of n in the contiguous layout (the
reference), then the same seeds each alone (batch 1), inside a batch of 2n (beside n other seeds), and as one
batch of n in the channels_last layout; in each dtype. Each is compared with the reference as 8-bit pixels (as
the PNGs carry them) and as latents. In one process, one configuration after another: no timing is involved.

    python -m benchmarks.studies.batch_composition [--n 8] [--steps 20] [--dtypes float32,bfloat16]

It writes benchmarks/studies/batch_composition.json, which `python -m benchmarks.report` renders.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Any

import torch

from app.images import to_uint8
from app.models import load_model
from app.models.fast import bf16_supported
from app.sampling import draw, sample_generators, timestep_sequence
from app.sampling.loop import sample
from benchmarks.studies import save_study

ROOT = Path(__file__).resolve().parents[2]


def run(model: Any, seeds: list[int], steps: int) -> torch.Tensor:
    gens = [g for s in seeds for g in sample_generators(s, 1)]
    x_T = draw(gens, model.sample_shape)
    seq = timestep_sequence(steps, model.num_train_timesteps)
    return sample(model.eps, x_T, model.alphas_cumprod, seq, prediction_type=model.prediction_type,
                  clip_denoised=model.clip_sample)


def compare(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    a, b = to_uint8(x).astype(int), to_uint8(ref).astype(int)
    return {"max_levels": int(abs(a - b).max()), "pixels_differing": float((a != b).mean()),
            "max_latent": float((x - ref).abs().max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--model", default=str(ROOT / "model_store" / "fashion-mnist"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "studies" / "batch_composition.json"))
    a = p.parse_args()
    folder, seeds, others = Path(a.model), list(range(a.n)), list(range(1000, 1000 + a.n))
    rows = []
    for dtype in a.dtypes.split(","):
        plain = load_model(folder, dtype=dtype)
        ref = run(plain, seeds, a.steps)
        alone = torch.cat([run(plain, [s], a.steps) for s in seeds])
        beside = run(plain, seeds + others, a.steps)[: a.n]
        layout = run(load_model(folder, dtype=dtype, channels_last=True), seeds, a.steps)
        for variant, x in (("each alone (batch 1)", alone), (f"in a batch of {2 * a.n}", beside),
                           (f"channels_last, batch {a.n}", layout)):
            rows.append({"dtype": dtype, "variant": variant, **compare(x, ref)})
            print(rows[-1], flush=True)
    save_study(vars(a), ROOT, model=folder.name, rows=rows, machine=f"{platform.machine()}, "
               f"AVX512-BF16/AMX: {bf16_supported(torch.device('cpu'))}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
