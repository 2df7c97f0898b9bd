"""``python -m msdn_tf.train``: the command lives in :mod:`msdn_tf.cli.train`."""

if __name__ == "__main__":
    from msdn_tf.cli import run

    run("train")
