"""``python -m msdn_tf.custom``: the command lives in :mod:`msdn_tf.cli.custom`."""

if __name__ == "__main__":
    from msdn_tf.cli import run

    run("custom")
