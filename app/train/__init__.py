"""Training of the bundled Fashion-MNIST eps-model and of the evaluator's classifier."""
