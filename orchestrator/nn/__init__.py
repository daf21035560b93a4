"""Networks, plain PyTorch: the 3D ResNets, the mean model, augmentation, training and
evaluation, the scoring forward pass, auxiliary networks, checkpoints and one cycle's recipe.
No Ray. Imports data/ below it."""
