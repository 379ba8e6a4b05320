"""Privacy audit: the attacks an honest-but-curious server can run on what it receives.

One module per attack family; each takes plain torch tensors (what the server recorded,
the model it holds, the attacker's auxiliary data) and returns reconstructions or scores
that :mod:`graftfl.audit.metrics` turns into figures. Nothing here imports Flower, so the
``graftfl audit`` command, the recorder and the benchmarks can all call it.

- :mod:`~graftfl.audit.split_inversion` — inputs from cut activations (split, semisup).
- :mod:`~graftfl.audit.label_leakage` — labels from per-example gradients (ushaped, split).
- :mod:`~graftfl.audit.gradient_inversion` — inputs and labels from DSSGD uploads.
- :mod:`~graftfl.audit.membership` — membership inference on a final model (every protocol).
- :mod:`~graftfl.audit.features_inversion` — inputs and identities from autoencoder latents.
- :mod:`~graftfl.audit.metrics` — SSIM, PSNR, distance correlation, ROC AUC, TPR at low FPR.

See docs/audit.md for what each attack assumes and the figures measured so far.
"""
