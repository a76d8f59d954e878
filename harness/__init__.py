"""What the tests and the benchmarks share: a real ddim-serve process on loopback (server); tiny random-weight
latent pipelines in diffusers' layout, SD 1.x, SD3 and DiT, and CLIP's real tokenizer, built offline (pipelines)."""
