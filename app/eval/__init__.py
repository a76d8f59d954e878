"""Sample-quality evaluation of Fashion-MNIST models: FID-FMNIST (Table 1), reconstruction (Table 2).

classifier.py  the shipped feature network standing in for Inception
fid.py         the Fréchet distance, numpy only
cache.py       the resumable per-cell cache
quality.py     the cells: what to sample, invert and measure
report.py      docs/quality.md and the model card
run.py         `ddim eval` end to end
"""
