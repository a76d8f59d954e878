"""The quality evaluator: shipped classifier, FID math, the shipped model, and a resumable tiny run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from app.eval.cache import EvalCache
from app.eval.classifier import WEIGHTS, accuracy, load_classifier
from app.eval.fid import GaussianStats, fid, frechet_distance, gaussian_stats, sqrtm_psd, trace_sqrt_product
from app.eval.quality import EvalConfig
from app.eval.run import EvalPaths, run_eval
from app.models import LoadedModel, load_model
from app.models.folder import random_model_folder
from app.sampling import draw, sample_generators, timestep_sequence
from app.sampling.loop import sample
from app.train.data import load_split, to_model_space
from tests.conftest import LINEAR_SCHEDULER

SHIPPED = Path(__file__).resolve().parents[2] / "model_store" / "fashion-mnist"
TINY_32 = {  # the classifier reads 1x32x32, so the smoke model must write it
    "sample_size": 32, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
    "layers_per_block": 1, "norm_num_groups": 4,
    "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
}


# -- the classifier -------------------------------------------------------------------------

@pytest.mark.dataset("fashion-mnist")
def test_shipped_classifier_is_small_and_accurate() -> None:
    assert WEIGHTS.stat().st_size < 1_000_000
    images, labels = load_split("test")
    acc = accuracy(load_classifier(), to_model_space(images[:2000], 32), labels[:2000])
    assert acc >= 0.90, acc


# -- FID math -------------------------------------------------------------------------------

def _stats(mu: list[float], sigma: np.ndarray) -> GaussianStats:
    return GaussianStats(mu=np.array(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64), n=0)


def test_identical_feature_sets_have_zero_distance() -> None:
    f = np.random.default_rng(0).normal(size=(300, 16))
    assert fid(f, f) == pytest.approx(0.0, abs=1e-7)


def test_one_dimensional_gaussians() -> None:
    # d^2 = (m1 - m2)^2 + (s1 - s2)^2
    d2 = frechet_distance(_stats([1.0], np.array([[4.0]])), _stats([-2.0], np.array([[9.0]])))
    assert d2 == pytest.approx(9.0 + 1.0)


def test_diagonal_covariances_add_up_per_dimension() -> None:
    a, b = np.array([1.0, 2.0, 0.5]), np.array([4.0, 0.5, 0.5])
    d2 = frechet_distance(_stats([0, 1, 2], np.diag(a)), _stats([1, 1, 0], np.diag(b)))
    assert d2 == pytest.approx(1 + 0 + 4 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


def test_non_commuting_covariances_match_the_2x2_closed_form() -> None:
    # for 2x2 PSD products: tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))
    s1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    expected = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-10)
    assert trace_sqrt_product(s2, s1) == pytest.approx(expected, rel=1e-10)
    d2 = frechet_distance(_stats([0, 0], s1), _stats([1, 2], s2))
    assert d2 == pytest.approx(5 + np.trace(s1) + np.trace(s2) - 2 * expected, rel=1e-10)


def test_sqrtm_of_singular_psd_matrix() -> None:
    v = np.random.default_rng(1).normal(size=(5, 3))
    a = v @ v.T  # rank 3
    r = sqrtm_psd(a)
    np.testing.assert_allclose(r @ r, a, atol=1e-10)
    np.testing.assert_allclose(r, r.T)


def test_sample_estimate_converges_to_the_gaussian_distance() -> None:
    rng = np.random.default_rng(2)
    s1, s2 = np.array([[1.0, 0.5], [0.5, 1.0]]), np.array([[2.0, 0.0], [0.0, 0.5]])
    fa = rng.multivariate_normal([0, 0], s1, size=50_000)
    fb = rng.multivariate_normal([1, 0], s2, size=50_000)
    exact = frechet_distance(_stats([0, 0], s1), _stats([1, 0], s2))
    assert fid(fa, fb) == pytest.approx(exact, abs=0.02)
    assert fid(fa, gaussian_stats(fb)) == pytest.approx(fid(fb, fa))


# -- the shipped model ----------------------------------------------------------------------

def test_shipped_model_loads_and_samples() -> None:
    unet = UNet2DModel.from_pretrained(SHIPPED, subfolder="unet")
    assert unet.config.sample_size == 32 and unet.config.in_channels == 1
    model = load_model(SHIPPED)
    assert model.sample_shape == (1, 32, 32)
    gens = sample_generators(0, 4)
    x = sample(model.eps, draw(gens, model.sample_shape), model.alphas_cumprod,
               timestep_sequence(10, model.num_train_timesteps), prediction_type=model.prediction_type,
               clip_denoised=model.clip_sample, generators=gens)
    assert x.shape == (4, 1, 32, 32) and x.dtype == torch.float32
    assert float(x.std()) > 0.05 and bool(torch.isfinite(x).all())


# -- the cache and the pipeline -------------------------------------------------------------

def test_cache_grows_by_batches_and_forgets_other_weights(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    c = EvalCache(path, "a")
    c.append("k", {"x": np.arange(3.0), "y": np.zeros((3, 2), np.float32)}, 1.0)
    c.append("k", {"x": np.arange(3.0, 5.0), "y": np.ones((2, 2), np.float32)}, 0.5)
    again = EvalCache(path, "a")
    assert again.count("k") == 5 and again.seconds("k") == 1.5
    np.testing.assert_array_equal(again.arrays("k")["x"], np.arange(5.0))
    assert again.arrays("k")["y"].dtype == np.float32 and again.arrays("k")["y"].shape == (5, 2)
    assert EvalCache(path, "b").count("k") == 0
    with pytest.raises(ValueError):
        c.append("k", {"x": np.zeros(1), "y": np.zeros(2)}, 0.0)


@pytest.fixture
def counted_eps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts image-network-evaluations of every LoadedModel."""
    calls: list[int] = []
    original = LoadedModel.eps

    def eps(self: LoadedModel, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return original(self, x, t)
    monkeypatch.setattr(LoadedModel, "eps", eps)
    return calls


@pytest.mark.dataset("fashion-mnist")  # FID-FMNIST and Table 2 read the training and test images
def test_tiny_eval_writes_report_and_resumes(tmp_path: Path, counted_eps: list[int]) -> None:
    store = tmp_path / "store"
    random_model_folder(store / "tiny32", TINY_32, {**LINEAR_SCHEDULER, "clip_sample": True}, seed=0)
    (store / "tiny32" / "training.json").write_text('{"step": 12, "wall_seconds": 60, "parameters": 1}')
    cfg = EvalConfig(n=3, n_long=2, n_recon=2, n_balance=4, batch_size=2, steps=(2, 3), long_steps=(4,),
                     recon_steps=(2, 3), grid_steps=(2, 4), grid_n=4, balance_steps=2, slerp_frames=3,
                     slerp_steps=2)
    paths = EvalPaths(model_dir=store / "tiny32", out=tmp_path / "docs" / "quality.md", cache=tmp_path / "c.json")

    first = run_eval(paths, cfg, threads=1, progress=False)
    gen = 5 * 3 * (2 + 3) + 2 * 2 * 4  # Table 1: five rows at S = 2, 3; two rows at S = 4
    other = 2 * 2 * (2 + 3) + 4 * 2 + 3 * 2  # Table 2 (invert + generate), class balance, slerp
    assert sum(counted_eps) == gen + other
    assert set(first.fid) == {(r, s) for r in ("eta=0.0", "eta=0.2", "eta=0.5", "eta=1.0", "sigma-hat")
                              for s in (2, 3)} | {("eta=0.0", 4), ("sigma-hat", 4)}
    assert all(np.isfinite(v) and v >= 0 for v in first.fid.values())
    assert first.class_counts.sum() == 4 and len(first.slerp) == 3 and first.grids[4].shape == (2, 32, 32)
    report = paths.out.read_text()
    assert "Table 1" in report and "Table 2" in report and "Our model therefore" in report
    assert "--n 3 --n-long 2" in report and "--steps 2,3 --long-steps 4" in report
    for name in ("grid_S2.png", "grid_S4.png", "slerp.png"):
        assert (tmp_path / "docs" / "img" / name).is_file()
    card = (store / "tiny32" / "README.md").read_text()
    assert "Optimiser steps: 12" in card and "block_out_channels" in card

    counted_eps.clear()  # a re-run computes nothing and reads the same numbers
    again = run_eval(paths, cfg, threads=1, progress=False)
    assert counted_eps == [] and again.fid == first.fid and again.recon == first.recon

    more = EvalConfig(**{**cfg.__dict__, "n": 4})  # one more sample per short cell: only that is computed
    grown = run_eval(paths, more, threads=1, progress=False)
    assert sum(counted_eps) == 5 * (2 + 3)
    assert grown.fid["eta=0.0", 4] == first.fid["eta=0.0", 4]


def test_cli_parses_eval_and_train_classifier() -> None:
    from app.cli import build_parser

    a = build_parser().parse_args(["eval"])
    assert (a.model, a.n, a.n_long, a.n_recon, a.batch_size, a.threads, a.out, a.card) == \
        ("fashion-mnist", 400, 64, 32, 128, 1, "docs/quality.md", True)
    assert (a.steps, a.long_steps, a.recon_steps) == ("10,20,50,100", "1000", "10,20,50,100,200,500,1000")
    c = build_parser().parse_args(["train-classifier"])
    assert WEIGHTS.as_posix().endswith(c.out) and c.threads == 1
