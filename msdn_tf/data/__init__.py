"""Dataset readers, the dataset table, the demo generator and tf.data pipelines."""
