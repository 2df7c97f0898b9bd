"""Visualisation of what MSDN attends to (issue 6).

* :mod:`msdn_tf.viz.attention`: top-k attributes of an image and the attention
  maps of both sub-nets over its regions (the paper's Fig. 4);
* :mod:`msdn_tf.viz.embeddings`: attribute-score embeddings for the TensorBoard
  Embedding Projector and a static t-SNE (or PCA) figure (the paper's Fig. 5);
* :mod:`msdn_tf.viz.tensorboard`: evaluation hooks for
  :func:`msdn_tf.training.loop.run_training` that write attention images, seen/unseen
  confusion and per-class accuracy histograms;
* :mod:`msdn_tf.viz.run_figures`: both figures for a run directory (what the command calls).

The command line is ``python -m msdn_tf.visualize`` (see ``docs/visualize.md``).
Figures are drawn with matplotlib's Agg canvas directly (no pyplot, no display).
"""
