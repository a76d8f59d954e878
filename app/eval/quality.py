"""`ddim eval`: the DDIM paper's Table 1 and Table 2 for a Fashion-MNIST model, resumably.

Every piece of work is a cell (a key in the EvalCache) whose items are computed in batches:
generated samples by seed (features, classes, and images where a grid needs them), reconstruction
errors by test image, interpolation frames. Each finished batch is written to the cache, so an
interrupted run loses at most one batch and a re-run skips what is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from app.eval.cache import EvalCache
from app.eval.classifier import FMNISTClassifier, embed
from app.eval.fid import GaussianStats, fid, gaussian_stats
from app.images import to_uint8
from app.models import LoadedModel
from app.sampling import draw, sample_generators, slerp
from app.sampling.loop import EpsModel, run_plan
from app.train.data import load_split, to_model_space

BALANCE_SEED = 100_000  # the class-balance samples are not the table's samples
FLOOR_DRAWS = 5
REFERENCE_KEY = "reference/test"


@dataclass(frozen=True)
class Variant:
    """A row of Table 1: eta, or the "large" sigma-hat variance (whose mean is eta = 1's)."""

    label: str
    eta: float
    large: bool = False


ROWS = (Variant("eta=0.0", 0.0), Variant("eta=0.2", 0.2), Variant("eta=0.5", 0.5), Variant("eta=1.0", 1.0),
        Variant("sigma-hat", 1.0, large=True))
LONG_ROWS = ("eta=0.0", "sigma-hat")


@dataclass(frozen=True)
class EvalConfig:
    n: int = 400
    n_long: int = 64
    n_recon: int = 32
    n_balance: int = 500
    batch_size: int = 128
    steps: tuple[int, ...] = (10, 20, 50, 100)
    long_steps: tuple[int, ...] = (1000,)
    recon_steps: tuple[int, ...] = (10, 20, 50, 100, 200, 500, 1000)
    grid_steps: tuple[int, ...] = (10, 50, 1000)
    grid_n: int = 64
    balance_steps: int = 50
    slerp_seeds: tuple[int, int] = (0, 1)
    slerp_frames: int = 10
    slerp_steps: int = 50


@dataclass
class Results:
    fid: dict[tuple[str, int], float]  # (row, S) at n (short S) or n_long (long S) samples
    fid_at_long: dict[tuple[str, int], float]  # every cell on its first n_long samples
    samples: dict[tuple[str, int], int]
    floor: dict[int, tuple[float, float]]  # sample count -> (mean, sd) over FLOOR_DRAWS train subsets
    recon: dict[int, float]
    class_counts: np.ndarray
    grids: dict[int, np.ndarray]  # S -> uint8 [k, 32, 32]
    slerp: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    key: str
    need: int
    nfe: int  # network evaluations per item
    compute: Callable[[int, int], dict[str, np.ndarray]]  # items [i, j) -> arrays of length j - i


def gen_key(row: str, steps: int) -> str:
    return f"gen/{row}/S={steps}"


def balance_key(cfg: EvalConfig) -> str:
    return f"balance/S={cfg.balance_steps}/seed={BALANCE_SEED}"


def slerp_key(cfg: EvalConfig) -> str:
    return f"slerp/S={cfg.slerp_steps}/seeds={cfg.slerp_seeds[0]},{cfg.slerp_seeds[1]}"


def recon_indices(n: int) -> np.ndarray:
    """The test images Table 2 reconstructs: a fixed permutation's prefix."""
    return np.random.default_rng(0).permutation(10_000)[:n]


def counting(eps: EpsModel, bar: tqdm) -> EpsModel:
    """eps, ticking the progress bar by one per image per network evaluation."""
    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = eps(x, t)
        bar.update(len(x))
        return out
    return f


def generate(model: LoadedModel, eps: EpsModel, x_T: torch.Tensor, steps: int, variant: Variant,
             generators: list[torch.Generator]) -> torch.Tensor:
    return run_plan(eps, x_T.to(model.device), model.plan(steps, "uniform", "generate"), eta=variant.eta,
                    large=variant.large, prediction_type=model.prediction_type, clip_denoised=model.clip_sample,
                    generators=generators).cpu()


def from_seeds(model: LoadedModel, eps: EpsModel, steps: int, variant: Variant, first: int, n: int) -> torch.Tensor:
    """Samples of seeds first .. first + n - 1 (the seed contract: x_T, then per-step noise)."""
    gens = sample_generators(first, n)
    return generate(model, eps, draw(gens, model.sample_shape), steps, variant, gens)


def plan(model: LoadedModel, eps: EpsModel, clf: FMNISTClassifier, test_x: torch.Tensor,
         cfg: EvalConfig) -> list[Job]:
    """Every cell of the evaluation, cheapest first."""
    def gen_job(v: Variant, s: int, n: int, keep_images: bool, seed0: int = 0, key: str = "") -> Job:
        def compute(i: int, j: int) -> dict[str, np.ndarray]:
            x = from_seeds(model, eps, s, v, seed0 + i, j - i)
            e = embed(clf, x)
            out: dict[str, np.ndarray] = {"features": e.features.astype(np.float32),
                                          "classes": e.classes.astype(np.int16)}
            return out | ({"images": to_uint8(x)[..., 0]} if keep_images else {})
        return Job(key or gen_key(v.label, s), n, s, compute)

    def recon_job(s: int) -> Job:
        forward, back = model.plan(s, "uniform", "invert"), model.plan(s, "uniform", "generate")

        def compute(i: int, j: int) -> dict[str, np.ndarray]:
            x0 = test_x[recon_indices(j)[i:]].to(model.device)
            x_T = run_plan(eps, x0, forward, prediction_type=model.prediction_type)
            # decoded without clipping, as the inversion (Eq. 14 run backwards) never clips
            x_rec = run_plan(eps, x_T, back, prediction_type=model.prediction_type)
            err = ((x_rec.cpu().clamp(-1, 1) - x0.cpu()) / 2) ** 2  # pixels in [0, 1]
            return {"mse": err.flatten(1).mean(1).double().numpy()}
        return Job(f"recon/S={s}", cfg.n_recon, 2 * s, compute)

    def slerp_job() -> Job:
        ends = [draw(sample_generators(s, 1), model.sample_shape) for s in cfg.slerp_seeds]
        eta0 = ROWS[0]

        def compute(i: int, j: int) -> dict[str, np.ndarray]:
            alphas = [k / max(cfg.slerp_frames - 1, 1) for k in range(i, j)]
            x_T = torch.cat([slerp(ends[0], ends[1], a) for a in alphas])
            return {"images": to_uint8(generate(model, eps, x_T, cfg.slerp_steps, eta0, []))[..., 0]}
        return Job(slerp_key(cfg), cfg.slerp_frames, cfg.slerp_steps, compute)

    rows = {v.label: v for v in ROWS}
    jobs = [gen_job(v, s, cfg.n, v.eta == 0 and not v.large and s in cfg.grid_steps)
            for s in cfg.steps for v in ROWS]
    jobs += [slerp_job(), gen_job(rows["eta=0.0"], cfg.balance_steps, cfg.n_balance, False, BALANCE_SEED,
                                  balance_key(cfg))]
    jobs += [recon_job(s) for s in cfg.recon_steps]
    jobs += [gen_job(rows[r], s, cfg.n_long, r == "eta=0.0" and s in cfg.grid_steps)
             for s in cfg.long_steps for r in LONG_ROWS]
    return sorted(jobs, key=lambda j: j.nfe)  # stable: short cells finish (and are cached) first


def run_jobs(jobs: list[Job], cache: EvalCache, batch_size: int) -> None:
    for job in jobs:
        done = cache.count(job.key)
        while done < job.need:
            j = min(done + batch_size, job.need)
            t0 = time.monotonic()
            part = job.compute(done, j)
            cache.append(job.key, part, time.monotonic() - t0)
            done = j


def data_jobs(clf: FMNISTClassifier, test_x: torch.Tensor, cfg: EvalConfig, cache: EvalCache) -> list[Job]:
    """The reference statistics (all test images) and the data floor: FID of FLOOR_DRAWS random
    train subsets against them, at each sample count the tables use."""
    def reference(i: int, j: int) -> dict[str, np.ndarray]:
        ref = gaussian_stats(embed(clf, test_x).features)
        return {"mu": ref.mu[None], "sigma": ref.sigma[None]}

    def floor_job(n: int) -> Job:
        def compute(i: int, j: int) -> dict[str, np.ndarray]:
            images, _ = load_split("train")
            ref = reference_stats(cache)
            subsets = [np.random.default_rng(1000 + k).choice(len(images), n, replace=False) for k in range(i, j)]
            return {"fid": np.array([fid(embed(clf, to_model_space(images[s], 32)).features, ref) for s in subsets])}
        return Job(f"floor/n={n}", FLOOR_DRAWS, 0, compute)
    return [Job(REFERENCE_KEY, 1, 0, reference), *[floor_job(n) for n in sorted({cfg.n, cfg.n_long})]]


def reference_stats(cache: EvalCache) -> GaussianStats:
    a = cache.arrays(REFERENCE_KEY)
    return GaussianStats(mu=a["mu"][0], sigma=a["sigma"][0], n=10_000)


def evaluate(model: LoadedModel, clf: FMNISTClassifier, cfg: EvalConfig, cache: EvalCache,
             progress: bool = True) -> Results:
    """Fill every cell not yet in the cache, then assemble the tables from the cache."""
    if model.sample_shape != (1, 32, 32):
        raise ValueError(f"the Fashion-MNIST evaluator needs 1x32x32 samples; {model.name} makes "
                         f"{'x'.join(map(str, model.sample_shape))}")
    test_x = to_model_space(load_split("test")[0], 32)
    bar = tqdm(total=0, desc="eval", unit="nfe", unit_scale=True, dynamic_ncols=True, disable=not progress)
    jobs = data_jobs(clf, test_x, cfg, cache) + plan(model, counting(model.eps, bar), clf, test_x, cfg)
    bar.total = sum(max(job.need - cache.count(job.key), 0) * job.nfe for job in jobs)
    bar.refresh()
    try:
        run_jobs(jobs, cache, cfg.batch_size)  # in order: the floor cells read the reference cell
    finally:
        bar.close()

    ref = reference_stats(cache)
    a = {job.key: cache.arrays(job.key) for job in jobs}
    out: dict[tuple[str, int], float] = {}
    at_long: dict[tuple[str, int], float] = {}
    samples: dict[tuple[str, int], int] = {}
    cells = [(v.label, s, cfg.n) for s in cfg.steps for v in ROWS]
    cells += [(r, s, cfg.n_long) for s in cfg.long_steps for r in LONG_ROWS]
    for row, s, n in cells:
        feats = a[gen_key(row, s)]["features"]
        out[row, s], samples[row, s] = fid(feats[:n], ref), n
        at_long[row, s] = fid(feats[:cfg.n_long], ref)
    grids = {s: a[gen_key("eta=0.0", s)]["images"][:cfg.grid_n] for s in cfg.grid_steps
             if "images" in a.get(gen_key("eta=0.0", s), {})}
    return Results(
        fid=out, fid_at_long=at_long, samples=samples,
        floor={m: (float(a[f"floor/n={m}"]["fid"].mean()), float(a[f"floor/n={m}"]["fid"].std()))
               for m in sorted({cfg.n, cfg.n_long})},
        recon={s: float(a[f"recon/S={s}"]["mse"][:cfg.n_recon].mean()) for s in cfg.recon_steps},
        class_counts=np.bincount(a[balance_key(cfg)]["classes"][:cfg.n_balance].astype(np.int64), minlength=10),
        grids=grids, slerp=a[slerp_key(cfg)]["images"][:cfg.slerp_frames],
        seconds={job.key: cache.seconds(job.key) for job in jobs},
    )
