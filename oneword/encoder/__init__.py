"""The concept encoder: reference images -> pseudo-word embedding in one pass (``ti-encode``).

A frozen CLIP image tower embeds each reference image; a set mapper pools the features of any
number of images (order-invariant) and predicts, for each text encoder of the target model, an
offset that is added to the initializer word's embedding (E4T's "class word + offset"). The mapper is
trained with PyTorch Lightning (:mod:`oneword.encoder.lit`) on the core denoising loss.
"""
