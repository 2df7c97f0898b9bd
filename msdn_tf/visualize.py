"""``python -m msdn_tf.visualize``: the command lives in :mod:`msdn_tf.cli.visualize`."""

if __name__ == "__main__":
    from msdn_tf.cli import run

    run("visualize")
